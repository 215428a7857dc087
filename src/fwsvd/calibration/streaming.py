"""Calibration one transformer block at a time: exact per-example Fisher without a whole-model backward.

:func:`fwsvd.calibration.statistics.collect_statistics` runs each micro-batch through the whole model with gradients,
so the activations of every block, the vocabulary-wide logits and every layer's covariance are in
memory together. :func:`stream_statistics` computes the very same statistics block by block:

1. **Capture** (:func:`fwsvd.compression.sequential.capture_block_calls`): what every block is called with, and
   the hidden states entering the first block, per micro-batch, with the blocks skipped (each
   returns its input; the arguments the model hands its blocks do not depend on their outputs).
2. **Forward, block-major.** Each block in turn runs every micro-batch from the states the block
   before produced, without gradients; its ``act``/``cov`` statistics are collected as it runs and
   handed over before the next block starts. The block-boundary states are kept (in memory, or in a
   scratch folder on disk with ``scratch``).
3. **Loss.** The model's own head runs on the last block's output (the blocks themselves are skipped:
   each returns what it is given) and each example's loss is taken as
   :func:`fwsvd.training.losses.example_losses` defines it. For a causal LM the logits are formed a few
   tokens at a time from the output embedding's input, so the vocabulary never holds more than a
   chunk: the gradient reaching the last block's output is accumulated chunk by chunk.
4. **Backward, block-major, from the top.** Each block recomputes its forward pass for one
   micro-batch with gradients, receives the gradient of the block above at its output, reduces its
   layers' per-example weight gradients at once (:class:`fwsvd.calibration.statistics.FisherHooks`, the reduction of
   the one-pass path) and hands the gradient at its input to the block below.

Peak memory is one block's activations and gradients for one micro-batch, one level of boundary
states or gradients for the calibration set, and (with ``scratch``) nothing else that grows with
depth. With ``weights`` (:class:`fwsvd.checkpoint.CheckpointWeights`) each block's weights are
read from disk when the block runs and dropped after, so the dense model is never resident whole.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..device import model_device
from ..errors import FwsvdError
from ..training.losses import IGNORE_INDEX, example_losses, next_token_labels
from ..nn import find_blocks
from ..blocks import BlockCall, StopForward, block_targets, capture_block_calls, check_single_stack, split_hidden
from .statistics import FISHER_GRANULARITY, STAT_KINDS, ActivationHooks, FisherHooks, Statistics, calibration_mode, task_of

logger = logging.getLogger(__name__)

__all__ = ["BlockWeights", "outside_blocks_on", "release_freed_memory", "return_large_blocks_at_once", "stream_statistics", "stream_statistics_in_scratch"]

#: Logit elements formed at once by the chunked causal-LM loss (16 MiB of float32; the softmax and
#: its gradient take as much again each): the vocabulary never dominates memory, whatever the batch
#: and sequence length.
LOGIT_CHUNK_ELEMENTS = 1 << 22


#: glibc ``mallopt`` parameters (``malloc.h``) and the size from which blocks are mapped on their own.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_OWN_MAPPING_BYTES = 1 << 20


def return_large_blocks_at_once() -> None:
    """Make glibc map every block of 1 MiB or more on its own, so that freeing it unmaps it at once.

    By default glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), after
    which tensors of a block's size come from the heap, and the heap stays as large as its
    high-water mark. Streaming allocates tensors of the same sizes block after block, so a fixed
    threshold keeps the resident size at what is in use (``--low-memory``; process-wide, a few more
    system calls). Elsewhere than glibc nothing happens.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _OWN_MAPPING_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _OWN_MAPPING_BYTES)
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Hand memory that was freed back to the system (glibc ``malloc_trim``; elsewhere nothing).

    Streaming allocates and frees tensors of the same few sizes block after block; glibc keeps
    freed chunks below its (adaptive) mmap threshold in its heaps, so without this the resident
    size creeps up to many blocks' worth of memory that is free but never returned.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class BlockWeights(Protocol):
    """Where a block's weights come from when they are not resident (see :mod:`fwsvd.checkpoint`)."""

    def load(self, prefix: str) -> None:
        """Make the parameters under module ``prefix`` real tensors."""

    def unload(self, prefix: str) -> None:
        """Drop the parameters under module ``prefix`` (back to the meta device)."""


class _Resident:
    """The model's weights are in memory already: loading a block moves it to ``device`` (when given),
    unloading moves it back where it was; without a device both do nothing."""

    def __init__(self, model: nn.Module | None = None, device: torch.device | None = None) -> None:
        self.model = model
        self.device = device
        self._home: dict[str, torch.device] = {}

    def load(self, prefix: str) -> None:
        if self.model is not None and self.device is not None:
            block = self.model.get_submodule(prefix)
            home = model_device(block)
            if home != self.device:  # a block already there (a CPU run) is left untouched
                self._home[prefix] = home
                block.to(self.device)

    def unload(self, prefix: str) -> None:
        if prefix in self._home:
            assert self.model is not None
            self.model.get_submodule(prefix).to(self._home.pop(prefix))


@contextlib.contextmanager
def outside_blocks_on(model: nn.Module, block_names: list[str], device: torch.device | None) -> Iterator[None]:
    """The parameters and buffers outside the blocks on ``device`` for the duration, then back where they were.

    Parameters keep their identity (their ``data`` moves), so ties and the flags that
    :func:`calibration_mode` saved stay as they were. Nothing happens without a device, or for
    tensors already there or on the meta device (a low-memory skeleton's unread weights).
    """
    moved: list[tuple[Any, str, torch.Tensor]] = []
    if device is not None:
        inside = tuple(b + "." for b in block_names)
        for name, module in model.named_modules():
            if name in block_names or name.startswith(inside):
                continue
            for table in (module._parameters, module._buffers):
                for key, t in table.items():
                    if t is None or t.device == device or t.device.type == "meta":
                        continue
                    moved.append((table, key, t.data))
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.to(device)
                    else:
                        table[key] = t.to(device)
    try:
        yield
    finally:
        for table, key, original in moved:
            t = table[key]
            if isinstance(t, nn.Parameter):
                t.data = original
            else:
                table[key] = original


class _States:
    """Block-boundary tensors per ``(level, batch)``: in memory, or as safetensors files in ``folder``."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.device = torch.device("cpu")  # where the states are made, and so read back to
        self._memory: dict[tuple[int, int], torch.Tensor] = {}

    def _path(self, level: int, batch: int) -> Path:
        assert self.folder is not None
        return self.folder / f"state-{level}-{batch}.safetensors"

    def put(self, level: int, batch: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if self.folder is None:
            self._memory[level, batch] = tensor
        else:
            self.device = tensor.device
            save_file({"t": tensor.contiguous().cpu()}, str(self._path(level, batch)))

    def get(self, level: int, batch: int) -> torch.Tensor:
        if self.folder is None:
            return self._memory[level, batch]
        return load_file(str(self._path(level, batch)), device=str(self.device))["t"]

    def drop(self, level: int, batches: int) -> None:
        for b in range(batches):
            if self.folder is None:
                self._memory.pop((level, b), None)
            else:
                self._path(level, b).unlink(missing_ok=True)


@contextlib.contextmanager
def _skipped_blocks(blocks: list[nn.Module], like: Any, last_output: torch.Tensor | None = None) -> Iterator[None]:
    """Run the model around its blocks: each block returns what it is given, the last ``last_output``
    (when given).

    ``like`` is one real output of a block (a tensor, or a tuple led by the hidden states), whose
    shape the stand-in outputs copy, so the model's own code between and after the blocks runs
    unchanged. The blocks' ``forward`` is replaced on the instance only and put back after.
    """

    def shaped(hidden: torch.Tensor) -> Any:
        return (hidden, *like[1:]) if isinstance(like, (tuple, list)) else hidden

    def make(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if index == len(blocks) - 1 and last_output is not None:
                return shaped(last_output)
            hidden, _ = split_hidden(args, kwargs)
            return shaped(hidden)

        return forward

    saved = [block.__dict__.get("forward") for block in blocks]
    try:
        for index, block in enumerate(blocks):
            block.forward = make(index)
        yield
    finally:
        for block, previous in zip(blocks, saved):
            del block.forward
            if previous is not None:
                block.forward = previous


class _Head:
    """The loss of each example from the last block's output, and the gradient it sends back.

    A causal LM whose logits are exactly its output embedding applied to that embedding's input
    (checked once, on a few tokens) gets its logits a chunk of tokens at a time; anything else (an
    encoder's pooler and classifier, a family that scales or caps its logits) runs the model's own
    head whole, whose logits are small or, for a causal LM, as large as the one-pass path's.
    """

    def __init__(self, model: nn.Module, task: str, blocks: list[nn.Module], like: Any) -> None:
        self.model = model
        self.task = task
        self.blocks = blocks
        self.like = like
        self.extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
        self.chunked: bool | None = None if task == "causal-lm" and model.get_output_embeddings() is not None else False

    def _run(self, inputs: Mapping[str, torch.Tensor], last: torch.Tensor, stop_at_head: bool) -> tuple[Any, torch.Tensor | None]:
        captured: list[torch.Tensor] = []
        head = self.model.get_output_embeddings() if stop_at_head else None

        def grab(module: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0])
            raise StopForward

        handle = head.register_forward_pre_hook(grab) if head is not None else None
        try:
            with _skipped_blocks(self.blocks, self.like, last):
                try:
                    out = self.model(**inputs, **self.extra)
                except StopForward:
                    return None, captured[0]
        finally:
            if handle is not None:
                handle.remove()
        if head is not None:
            raise FwsvdError("the model's forward pass did not reach its output embedding: run without --low-memory")
        return out, None

    def _check_chunkable(self, inputs: Mapping[str, torch.Tensor], last: torch.Tensor) -> bool:
        """Whether the model's logits are its output embedding of that embedding's input (a few tokens)."""
        head = self.model.get_output_embeddings()
        seen: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda m, a, o: seen.append(o))
        small = {k: v[:1, :8] for k, v in inputs.items()}
        try:
            with torch.no_grad():
                out, _ = self._run(small, last[:1, :8], stop_at_head=False)
        finally:
            handle.remove()
        same = len(seen) == 1 and seen[0].shape == out.logits.shape and torch.equal(seen[0], out.logits)
        if not same:
            logger.info("%s transforms its logits after the output embedding: the loss runs over the whole vocabulary at once", type(self.model).__name__)
        return same

    def __call__(self, batch: Mapping[str, torch.Tensor], last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(per-example losses [batch], gradient of their sum at the last block's output)``."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = batch["labels"]
        if self.chunked is None:
            self.chunked = self._check_chunkable(inputs, last)
        x = last.detach().requires_grad_(True)
        with torch.enable_grad():
            if not self.chunked:
                out, _ = self._run(inputs, x, stop_at_head=False)
                losses = example_losses(self.task, out.logits, labels, getattr(self.model, "config", None))
                del out
                _check_losses(losses)
                losses.sum().backward()
                return losses.detach(), _grad_or_zeros(x)
            _, features = self._run(inputs, x, stop_at_head=True)
            losses, grad = self._chunked_loss(features, labels)
            _check_losses(losses)
            features.backward(grad)
        return losses, _grad_or_zeros(x)

    def _chunked_loss(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example mean next-token loss and its gradient at the head's input, a chunk of tokens at a time.

        Example ``e``'s loss is ``sum_t CE(e, t) / n_e`` over its labelled positions (as
        :func:`fwsvd.training.losses.example_losses`), so each chunk's gradient is that of its own terms.
        """
        head = self.model.get_output_embeddings()
        targets = next_token_labels(labels)
        counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1).float()
        batch, tokens = targets.shape
        vocab = int(head.weight.shape[0])
        step = max(1, LOGIT_CHUNK_ELEMENTS // max(1, batch * vocab))
        sums = torch.zeros(batch, device=features.device)
        grad = torch.zeros_like(features)
        for start in range(0, tokens, step):
            piece = features[:, start : start + step].detach().requires_grad_(True)
            logits = head(piece).float()
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, vocab), targets[:, start : start + step].reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
            ).view(batch, -1).sum(dim=1)
            del logits
            (piece_grad,) = torch.autograd.grad((ce / counts).sum(), piece)
            grad[:, start : start + step] = piece_grad
            sums += ce.detach()
        return sums / counts, grad


def _check_losses(losses: torch.Tensor) -> None:
    if not torch.isfinite(losses).all():
        raise FwsvdError(f"calibration loss is {losses.tolist()}: check the labels and the model weights for NaN/inf")


def _grad_or_zeros(x: torch.Tensor) -> torch.Tensor:
    return x.grad if x.grad is not None else torch.zeros_like(x)


def stream_statistics(
    model: nn.Module,
    target_names: list[str],
    batches: list[dict[str, torch.Tensor]],
    kinds: set[str] | frozenset[str],
    *,
    task: str | None = None,
    keep_full_fisher: bool = False,
    weights: BlockWeights | None = None,
    scratch: str | Path | None = None,
    on_block: Callable[[str, Statistics], Statistics | None] | None = None,
    progress: bool = True,
    summary: Mapping[str, Any] | None = None,
    device: torch.device | None = None,
    reduce: Callable[[list[torch.Tensor]], None] | None = None,
) -> Statistics:
    """The statistics of :func:`fwsvd.calibration.statistics.collect_statistics`, computed one transformer block at a time.

    Args:
        model: the model (left in its mode, ``requires_grad`` flags and gradients as found). Its
            parameters outside the blocks must be in memory; those inside may be on the meta device
            when ``weights`` loads them.
        target_names: linear modules to collect for; all must lie inside the transformer blocks.
        batches: model inputs (with ``labels`` for ``fisher``).
        kinds: subset of :data:`fwsvd.calibration.statistics.STAT_KINDS`.
        task: the task that defines each example's loss (detected from the model when ``None``).
        keep_full_fisher: also keep the elementwise Fisher.
        weights: loads and drops each block's weights around its use; ``None``: resident.
        scratch: a folder for the block-boundary states (``None``: kept in memory).
        on_block: called with each block's name and its ``act``/``cov`` statistics as soon as they
            are complete; what it returns (e.g. ``None`` after writing them to disk) is kept in
            their place. The Fisher vectors (two per layer) are always kept.
        progress: show progress bars.
        summary: extra facts for :attr:`Statistics.summary`.
        device: where the blocks run (``None``: where their weights are). The parameters outside the
            blocks go there for the pass and come back after; each block goes there when it runs
            (``weights`` then must read it there, as :class:`fwsvd.compression.lowmem.CheckpointWeights`
            with its ``device`` does) and leaves after. Statistics are returned on the CPU.
        reduce: sums tensors over the processes in place (:func:`fwsvd.calibration.distributed.add_up`),
            when each process streams its own share of the batches: each block's sums, the Fisher
            vectors and the counts are added up before they become statistics, so every process
            gets the statistics of all the batches.

    Returns:
        The :class:`~fwsvd.calibration.statistics.Statistics` (``summary["streamed"]`` is true).

    Raises:
        FwsvdError: no batch, a batch without labels for Fisher, targets outside the blocks, a
            model with several stacks of blocks, or a non-finite loss or statistic.
    """
    kinds = frozenset(kinds)
    task = _checked_inputs(model, batches, kinds, task)
    want_fisher = "fisher" in kinds
    block_names = find_blocks(model)
    what = "streamed calibration (--low-memory)"
    check_single_stack(model, block_names, what)
    run = _Pass(
        model=model,
        block_names=block_names,
        by_block=block_targets(block_names, list(target_names), what=what),
        blocks=[model.get_submodule(name) for name in block_names],
        batches=[{k: v.to(device) if device is not None and isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches],
        weights=weights or _Resident(model, device),
        states=_States(Path(scratch) if scratch is not None else None),
        progress=progress,
        reduce=reduce,
    )

    start = time.perf_counter()
    stats = Statistics()
    loss_sum = 0.0
    with calibration_mode(model, freeze=True), outside_blocks_on(model, block_names, device):
        like = _capture(run)
        _forward(run, stats, kinds & {"act", "cov"}, on_block, keep_states=want_fisher)
        if want_fisher:
            loss_sum = _losses(run, _Head(model, task, run.blocks, like))
            _backward(run, stats, keep_full_fisher)
            run.states.drop(0, len(batches))

    for target in target_names:
        stats.tensors[target] = {key: t.cpu() for key, t in stats.tensors.get(target, {}).items()}
    stats.summary = _stream_summary(batches, kinds, summary, start, loss_sum if want_fisher else None, reduce)
    logger.info(
        "calibrated %s block by block on %d samples (%d tokens) in %.1f s",
        sorted(kinds), stats.summary["samples"], stats.summary["tokens"], stats.summary["seconds"],
    )
    return stats


def _checked_inputs(model: nn.Module, batches: list[dict[str, torch.Tensor]], kinds: frozenset[str], task: str | None) -> str | None:
    """Refuse unknown kinds, no batch, or unlabelled batches for Fisher; the task that defines the loss."""
    unknown = kinds - STAT_KINDS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(STAT_KINDS)}")
    if not batches:
        raise FwsvdError("no calibration batches: the calibration data is empty; pass a file with at least one example")
    want_fisher = "fisher" in kinds
    if want_fisher and any("labels" not in b for b in batches):
        raise FwsvdError("Fisher calibration needs labelled data: the batch has no 'labels'")
    if want_fisher and task is None:
        task = task_of(model)
    return task


@dataclass
class _Pass:
    """What the block-major passes of one streamed calibration share."""

    model: nn.Module
    block_names: list[str]
    by_block: dict[str, list[str]]
    blocks: list[nn.Module]
    batches: list[dict[str, torch.Tensor]]
    weights: BlockWeights
    states: _States
    progress: bool
    reduce: Callable[[list[torch.Tensor]], None] | None = None
    calls: list[list[BlockCall]] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)


def _capture(run: _Pass) -> Any:
    """Record every block's calls and the states entering the first block (level 0); one real block output."""
    with torch.no_grad():
        like = _block_output(run.model, run.blocks, run.block_names[0], run.batches[0], run.weights)
        # What every block is called with, the blocks skipped (their arguments do not depend on
        # what the blocks before them return): no block's weights are needed for it.
        with _skipped_blocks(run.blocks, like):
            captured = capture_block_calls(run.model, run.blocks, run.batches)
    for b, hidden in enumerate(captured.hidden):
        run.states.put(0, b, hidden)
    captured.hidden = []
    run.calls, run.masks = captured.calls, captured.masks
    return like


def _forward(
    run: _Pass,
    stats: Statistics,
    act_kinds: frozenset[str],
    on_block: Callable[[str, Statistics], Statistics | None] | None,
    keep_states: bool,
) -> None:
    """Forward, one block at a time over every micro-batch: the act/cov of its layers into ``stats``.

    With ``keep_states`` (for the backward pass) every level of states stays; otherwise each is
    dropped once the block above has read it.
    """
    n = len(run.batches)
    bar = tqdm(list(zip(run.block_names, run.blocks)), desc="calibrating (forward)", unit="block", disable=not run.progress, leave=False)
    for index, (name, block) in enumerate(bar):
        run.weights.load(name)
        try:
            with torch.no_grad(), ActivationHooks(run.model, run.by_block[name], act_kinds) as hooks:
                for b, (call, mask) in enumerate(zip(run.calls[index], run.masks)):
                    hooks.new_batch(mask)
                    out = call.raw(block, run.states.get(index, b))
                    run.states.put(index + 1, b, out[0] if isinstance(out, (tuple, list)) else out)
                    del out
        finally:
            run.weights.unload(name)
            release_freed_memory()
        if act_kinds:
            if run.reduce is not None:
                _add_up_activations(run.reduce, run.by_block[name], hooks)
            _hand_over(name, run.by_block[name], hooks, stats, on_block)
        if not keep_states and index > 0:
            run.states.drop(index, n)
    if not keep_states:
        run.states.drop(len(run.blocks), n)
        run.states.drop(0, n)


def _add_up_activations(reduce: Callable[[list[torch.Tensor]], None], targets: list[str], hooks: ActivationHooks) -> None:
    """One block's act/cov sums and token counts added up over the processes, in place."""
    tokens = torch.tensor([hooks.tokens.get(t, 0) for t in targets], dtype=torch.float64)
    reduce([*(hooks.abs_sum[t] for t in targets if t in hooks.abs_sum), *(hooks.cov[t] for t in targets if t in hooks.cov), tokens])
    for t, n in zip(targets, tokens.tolist()):
        if t in hooks.tokens:
            hooks.tokens[t] = int(n)


def _hand_over(
    name: str,
    targets: list[str],
    hooks: ActivationHooks,
    stats: Statistics,
    on_block: Callable[[str, Statistics], Statistics | None] | None,
) -> None:
    """One block's act/cov statistics, checked finite, through ``on_block`` into ``stats``."""
    block_stats = Statistics(shared=dict(hooks.shared))
    for target in targets:
        block_stats.tensors[target] = _finite(target, hooks.entries(target))
    kept = on_block(name, block_stats) if on_block is not None else block_stats
    if kept is not None:
        for target, entry in kept.tensors.items():
            stats.tensors.setdefault(target, {}).update(entry)
    stats.shared.update(block_stats.shared)


def _losses(run: _Pass, head: _Head) -> float:
    """The loss of each example, and the gradient at the last block's output (replacing its states); the losses' sum."""
    loss_sum = 0.0
    top = len(run.blocks)
    for b, batch in enumerate(tqdm(run.batches, desc="calibrating (loss)", unit="batch", disable=not run.progress, leave=False)):
        losses, grad = head(batch, run.states.get(top, b))
        loss_sum += float(losses.sum())
        run.states.put(top, b, grad)  # the level's states are no longer needed: gradients take their place
        del losses, grad
        release_freed_memory()
    return loss_sum


def _backward(run: _Pass, stats: Statistics, keep_full_fisher: bool) -> None:
    """Backward, one block at a time from the top: each block's Fisher into ``stats``, and the gradient below it."""
    n = len(run.batches)
    bar = tqdm(list(zip(run.block_names, run.blocks))[::-1], desc="calibrating (backward)", unit="block", disable=not run.progress, leave=False)
    for offset, (name, block) in enumerate(bar):
        index = len(run.blocks) - 1 - offset
        run.weights.load(name)
        try:
            with FisherHooks(run.model, run.by_block[name], keep_full_fisher) as fisher:
                for b, (call, batch) in enumerate(zip(run.calls[index], run.batches)):
                    fisher.batch_size, fisher.tokens = (int(s) for s in batch["input_ids"].shape[:2])
                    grad_out = run.states.get(index + 1, b)
                    with torch.enable_grad():
                        x = run.states.get(index, b).requires_grad_(True)
                        out = call.run(block, x)
                        out.backward(grad_out)
                    run.states.put(index, b, _grad_or_zeros(x))
                    del out, x, grad_out
        finally:
            run.weights.unload(name)
            release_freed_memory()
        run.states.drop(index + 1, n)
        entries = {target: fisher.entries(target, _weight_shape(run.model.get_submodule(target))) for target in run.by_block[name]}
        if run.reduce is not None:
            run.reduce([t for entry in entries.values() for t in entry.values()])
        for target, entry in entries.items():
            stats.tensors.setdefault(target, {}).update(_finite(target, entry))


def _stream_summary(
    batches: list[dict[str, torch.Tensor]],
    kinds: frozenset[str],
    summary: Mapping[str, Any] | None,
    start: float,
    loss_sum: float | None,
    reduce: Callable[[list[torch.Tensor]], None] | None = None,
) -> dict[str, Any]:
    """:attr:`Statistics.summary` of a streamed calibration (``loss_sum``: the Fisher pass's, else ``None``;
    with ``reduce``, the counts of every process's batches)."""
    n_rows = sum(int(b["input_ids"].shape[0]) for b in batches)
    n_tokens = sum(int(b["attention_mask"].sum()) if b.get("attention_mask") is not None else int(b["input_ids"].numel()) for b in batches)
    n_batches = len(batches)
    if reduce is not None:
        counts = torch.tensor([n_batches, n_rows, n_tokens, loss_sum or 0.0], dtype=torch.float64)
        reduce([counts])
        n_batches, n_rows, n_tokens = (int(c) for c in counts[:3].tolist())
        loss_sum = None if loss_sum is None else float(counts[3])
    out = {
        **dict(summary or {}),
        "kinds": sorted(kinds),
        "batches": n_batches,
        "samples": n_rows,
        "tokens": n_tokens,
        "seconds": round(time.perf_counter() - start, 3),
        "streamed": True,
    }
    if loss_sum is not None:
        out["mean_loss"] = loss_sum / n_rows
        out["fisher_granularity"] = FISHER_GRANULARITY
    return out


def stream_statistics_in_scratch(*args: Any, **kwargs: Any) -> Statistics:
    """:func:`stream_statistics` with the block-boundary states in a temporary folder, removed after.

    The folder lies in the system's temporary directory (``TMPDIR``); it holds the states entering
    every block: ``(blocks + 1) x samples x tokens x hidden`` values of the model's dtype.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fwsvd-states-") as scratch:
        return stream_statistics(*args, scratch=scratch, **kwargs)


def _block_output(model: nn.Module, blocks: list[nn.Module], first: str, batch: Mapping[str, torch.Tensor], weights: BlockWeights) -> Any:
    """One real output of the first block (its shape: a tensor, or a tuple led by the hidden states)."""
    captured = capture_block_calls(model, blocks[:1], [dict(batch)])
    weights.load(first)
    try:
        return _detached(captured.calls[0][0].raw(blocks[0], captured.hidden[0]))
    finally:
        weights.unload(first)


def _finite(name: str, entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for key, t in entry.items():
        if not torch.isfinite(t).all():
            raise FwsvdError(f"statistic {key} of {name} is not finite: the model or data produce NaN/inf")
    return entry


def _weight_shape(module: nn.Module) -> torch.Tensor:
    """A meta tensor of the module's ``[out, in]`` weight shape (for zero Fisher of unreached layers)."""
    from ..nn import linear_weight

    return torch.empty(linear_weight(module).shape, device="meta")


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value
