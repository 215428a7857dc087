"""Statistics that methods need from calibration data, collected through hooks.

Everything collected lives in a :class:`Statistics` object keyed by module name, never on the
modules. Hooks are removed through their handles in ``finally`` blocks, and the model's training
mode, ``requires_grad`` flags and gradients are put back as they were found.

Kinds of statistics (a method names the ones it needs):

``fisher``
    Empirical Fisher information of the task loss: squared gradients of each targeted weight,
    one gradient per calibration example (of that example's own loss, so the result does not
    depend on the batch size), kept reduced to one value per output feature (``fisher_out``) and
    per input feature (``fisher_in``), so one pass serves both reductions.
    ``keep_full_fisher=True`` also keeps the elementwise ``[out, in]`` sum (``fisher_full``).
``act``
    Mean absolute input activation per input feature (``act_abs_mean``), over non-padding tokens.
``cov``
    Input covariance ``X^T X`` (``cov``, float64) over non-padding tokens. Modules that read the very
    same input tensor (q/k/v, gate/up) share one matrix.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..device import model_device
from ..errors import FwsvdError
from ..training.losses import FISHER_LABELS, example_losses, fisher_terms
from ..nn import linear_weight

logger = logging.getLogger(__name__)

__all__ = ["STAT_KINDS", "ActivationHooks", "FisherHooks", "PairedInputHooks", "RunningSums", "Statistics", "calibration_mode", "collect_statistics"]

STAT_KINDS = frozenset({"fisher", "act", "cov"})
#: The tensors each kind of statistic leaves per module.
STAT_KEYS = {"fisher": ("fisher_out", "fisher_in"), "act": ("act_abs_mean",), "cov": ("cov",)}
STATISTICS_FORMAT = "fwsvd-statistics/1"


@dataclass
class Statistics:
    """Calibration statistics keyed by module name.

    Attributes:
        tensors: ``{module name: {statistic name: tensor}}``.
        shared: ``{module name: owner module name}`` for modules whose covariance is stored under
            another module that reads the same input.
        summary: what the statistics were computed from (source, samples, tokens, batches, kinds,
            seconds); recorded in the compressed model's config.
    """

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def for_module(self, name: str, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """All statistics of one module, with a shared covariance resolved to its owner's (on ``device`` when given:
        where the weight is, so that its decomposition runs there)."""
        stats = dict(self.tensors.get(name, {}))
        owner = self.shared.get(name)
        if owner is not None and "cov" in self.tensors.get(owner, {}):
            stats.setdefault("cov", self.tensors[owner]["cov"])
        return stats if device is None else {key: t.to(device) for key, t in stats.items()}

    def uncovered(self, names: Iterable[str], kinds: Iterable[str]) -> list[str]:
        """Modules among ``names`` that lack a statistic of ``kinds`` (e.g. other --include patterns)."""
        keys = [key for kind in kinds for key in STAT_KEYS[kind]]
        return [n for n in names if any(key not in self.for_module(n) for key in keys)]

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self.summary.get("kinds", ()))

    def save(self, path: str | Path) -> None:
        """Write to one safetensors file (tensors plus JSON metadata); no pickle involved."""
        flat = {f"{name}::{key}": t.contiguous() for name, stats in self.tensors.items() for key, t in stats.items()}
        meta = {"format": STATISTICS_FORMAT, "shared": json.dumps(self.shared), "summary": json.dumps(self.summary)}
        from ..storage.atomic import atomic_file, follow_umask

        with atomic_file(path) as tmp:
            save_file(flat, str(tmp), metadata=meta)
            follow_umask(tmp)

    @classmethod
    def load(cls, path: str | Path) -> Statistics:
        """Read a file written by :meth:`save`.

        Raises:
            FwsvdError: when the file is missing or is not an fwsvd statistics file.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FwsvdError(f"statistics file {path} does not exist: run a calibration with --save-stats first")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATISTICS_FORMAT:
            raise FwsvdError(f"{path} is not an fwsvd statistics file (format {meta.get('format')!r})")
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in load_file(str(path)).items():
            name, _, stat = key.rpartition("::")
            tensors.setdefault(name, {})[stat] = t
        return cls(tensors, json.loads(meta["shared"]), json.loads(meta["summary"]))


@dataclass
class RunningSums:
    """What a calibration has added up so far: every statistic as a plain sum over the batches seen.

    This is what a checkpoint holds (:mod:`fwsvd.calibration.resume`) and what the processes of a
    ``torchrun`` job add up (:mod:`fwsvd.calibration.distributed`): sums over disjoint sets of batches add up
    to the sums over all of them. :func:`collect_statistics` turns them into :class:`Statistics`
    (the only non-sum, ``act_abs_mean``, is divided out there).

    Attributes:
        tensors: ``{module name: {key: tensor}}`` with keys ``fisher_out``, ``fisher_in``,
            ``fisher_full``, ``act_abs_sum``, ``act_tokens`` (a 0-d int64 count) and ``cov``.
        shared: as :attr:`Statistics.shared`.
        batches, samples, tokens: counts of what was seen.
        loss_sum: sum of the per-example calibration losses (Fisher only).
    """

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0
    tokens: int = 0
    loss_sum: float = 0.0

    def counts(self) -> dict[str, Any]:
        return {"batches": self.batches, "samples": self.samples, "tokens": self.tokens, "loss_sum": self.loss_sum}


def _token_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` (flattened to ``[tokens, features]``) that belong to real, non-padding tokens."""
    if mask is not None and x.shape[:-1] == mask.shape:
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


class ActivationHooks:
    """Forward pre-hooks that accumulate ``act`` and ``cov`` for the targeted modules."""

    def __init__(self, model: nn.Module, names: list[str], kinds: frozenset[str]) -> None:
        self.model = model
        self.names = names
        self.want_act = "act" in kinds
        self.want_cov = "cov" in kinds
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.cov: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.shared: dict[str, str] = {}
        self.mask: torch.Tensor | None = None
        self.enabled = True  # False: calls pass unrecorded (e.g. a reference run through the block)
        # Inputs seen in the current batch: id -> (weak reference, owner module). The weak reference
        # guards against a freed tensor's id being reused by a different tensor.
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ActivationHooks:
        for name in self.names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def new_batch(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self._seen.clear()

    def sums(self, name: str) -> dict[str, torch.Tensor]:
        """The running sums of ``name``: ``act_abs_sum``, ``act_tokens``, ``cov`` (those it has)."""
        entry: dict[str, torch.Tensor] = {}
        if name in self.abs_sum:
            entry["act_abs_sum"] = self.abs_sum[name]
            entry["act_tokens"] = torch.tensor(self.tokens[name], dtype=torch.int64)
        if name in self.cov:
            entry["cov"] = self.cov[name]
        return entry

    def restore(self, sums: RunningSums) -> None:
        """Start from ``sums`` (a checkpoint) instead of zero."""
        for name, entry in sums.tensors.items():
            if "act_abs_sum" in entry:
                self.abs_sum[name] = entry["act_abs_sum"]
                self.tokens[name] = int(entry["act_tokens"])
            if "cov" in entry:
                self.cov[name] = entry["cov"]
        self.shared.update(sums.shared)

    def entries(self, name: str) -> dict[str, torch.Tensor]:
        """The ``act_abs_mean`` and ``cov`` collected for ``name`` (those it has)."""
        entry: dict[str, torch.Tensor] = {}
        if name in self.abs_sum:
            entry["act_abs_mean"] = self.abs_sum[name] / max(self.tokens[name], 1)
        if name in self.cov:
            entry["cov"] = self.cov[name]
        return entry

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self.enabled:
                return
            x = args[0].detach()
            rows = _token_mask(x, self.mask).float()
            if self.want_act:
                total = rows.abs().sum(dim=0)
                self.abs_sum[name] = self.abs_sum[name] + total if name in self.abs_sum else total
                self.tokens[name] = self.tokens.get(name, 0) + rows.shape[0]
            if self.want_cov:
                seen = self._seen.get(id(args[0]))
                if seen is not None and seen[0]() is args[0]:
                    owner = seen[1]
                    if owner != name:
                        self.shared[name] = owner
                        return
                self._seen[id(args[0])] = (weakref.ref(args[0]), name)
                # Accumulate in float64: sums over many tokens lose precision in float32.
                rows64 = rows.double()
                xtx = rows64.T @ rows64
                self.cov[name] = self.cov[name] + xtx if name in self.cov else xtx

        return hook


class PairedInputHooks:
    """Second moments of the inputs two runs over the same tokens hand the same modules.

    Used by layer-sequential compression with correction: the first run of a batch (``reference``)
    goes through the dense block on the dense model's hidden states, the second (``current``)
    through the same block on the hidden states that the already-compressed blocks produce. Per
    module, with ``X`` the reference inputs and ``X~`` the current ones (real tokens only):
    ``cross = X^T X~`` and ``dense_cov = X^T X`` (float64). Modules that read one input tensor
    share one entry (``shared`` maps them to its owner), as in :class:`ActivationHooks`.

    A batch started with ``held=True`` is held out: its moments go to ``held_cov`` (``X~^T X~``),
    ``held_cross`` and ``held_dense_cov`` instead, so that a correction fitted to the other
    batches can be judged on text it was not fitted to.
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.model = model
        self.names = names
        self.phase = "reference"
        self.mask: torch.Tensor | None = None
        self.cross: dict[str, torch.Tensor] = {}
        self.dense_cov: dict[str, torch.Tensor] = {}
        self.held: dict[str, dict[str, torch.Tensor]] = {"held_cov": {}, "held_cross": {}, "held_dense_cov": {}}
        self.holding = False
        self.shared: dict[str, str] = {}
        self._reference: dict[str, torch.Tensor] = {}
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> PairedInputHooks:
        for name in self.names:
            self._handles.append(self.model.get_submodule(name).register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reference.clear()
        self._seen.clear()

    def start(self, phase: str, mask: torch.Tensor | None, held: bool = False) -> None:
        """Begin the ``reference`` or the ``current`` run of one batch (``held``: a held-out batch)."""
        self.phase = phase
        self.mask = mask
        self.holding = held
        self._seen.clear()

    def entries(self, name: str) -> dict[str, torch.Tensor]:
        owner = self.shared.get(name, name)
        entry = {"cross": self.cross[owner], "dense_cov": self.dense_cov[owner]} if owner in self.cross else {}
        entry.update({key: sums[owner] for key, sums in self.held.items() if owner in sums})
        return entry

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            seen = self._seen.get(id(x))
            if seen is not None and seen[0]() is x and seen[1] != name:
                self.shared[name] = seen[1]
                return
            self._seen[id(x)] = (weakref.ref(x), name)
            rows = _token_mask(x.detach(), self.mask).double()
            if self.phase == "reference":
                self._reference[name] = rows
                return
            ref = self._reference.pop(name, None)
            if ref is None or ref.shape != rows.shape:
                raise FwsvdError(f"{name} saw different tokens in the dense and the compressed run: run without correction (--no-refit)")
            if self.holding:
                _add(self.held["held_cov"], name, rows.T @ rows)
                _add(self.held["held_cross"], name, ref.T @ rows)
                _add(self.held["held_dense_cov"], name, ref.T @ ref)
            else:
                _add(self.cross, name, ref.T @ rows)
                _add(self.dense_cov, name, ref.T @ ref)

        return hook


#: Elements of per-example weight gradients formed at once (64 MiB of float32): examples are
#: processed in chunks of this size, so a 7B model's widest layer never needs a batch's worth.
_EXAMPLE_CHUNK_ELEMENTS = 1 << 24
#: How Fisher is accumulated, recorded in the statistics summary (and so in the compression record).
FISHER_GRANULARITY = "example"


class FisherHooks:
    """Per-example squared weight gradients of every targeted module, reduced as they are formed.

    The empirical Fisher of FWSVD is a sum over examples of squared per-example gradients. For a
    linear layer ``y = x W^T`` the gradient of example ``e``'s loss is ``G_e = g_e^T x_e`` (output
    gradients times inputs over the example's tokens), so a forward hook keeps each call's input and
    registers a hook on its output that receives ``g`` during the backward pass; ``G_e`` is formed
    there a few examples at a time and reduced at once to the per-output and per-input sums. No
    weight gradient is ever stored, and the statistic does not depend on how examples are batched.
    """

    def __init__(self, model: nn.Module, names: list[str], keep_full: bool) -> None:
        self.model = model
        self.names = names
        self.keep_full = keep_full
        self.out: dict[str, torch.Tensor] = {}
        self.inp: dict[str, torch.Tensor] = {}
        self.full: dict[str, torch.Tensor] = {}
        self.batch_size = 0
        self.tokens = 0  # per example (padded), for inputs flattened to [batch * tokens, features]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FisherHooks:
        for name in self.names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(_require_grad))
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def entries(self, name: str, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """``fisher_out``/``fisher_in`` (and ``fisher_full``) of ``name``; zeros when the loss never reached it."""
        out_features, in_features = like.shape
        entry = {
            "fisher_out": self.out.get(name, torch.zeros(out_features)),
            "fisher_in": self.inp.get(name, torch.zeros(in_features)),
        }
        if self.keep_full:
            entry["fisher_full"] = self.full.get(name, torch.zeros(out_features, in_features))
        return entry

    def restore(self, sums: RunningSums) -> None:
        """Start from ``sums`` (a checkpoint) instead of zero."""
        for name, entry in sums.tensors.items():
            for key, acc in (("fisher_out", self.out), ("fisher_in", self.inp), ("fisher_full", self.full)):
                if key in entry:
                    acc[name] = entry[key]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            x = args[0].detach()
            if x.shape[0] != self.batch_size:
                if x.dim() == 2 and x.shape[0] == self.batch_size * self.tokens:
                    # Families such as OPT flatten [batch, tokens] before their MLP, in order.
                    x = x.view(self.batch_size, self.tokens, -1)
                else:
                    raise FwsvdError(
                        f"{name} reads a tensor of shape {tuple(x.shape)} that is not [batch={self.batch_size}, ..., features]: "
                        "per-example Fisher cannot tell its examples apart; exclude it with --exclude"
                    )
            output.register_hook(lambda grad: self._accumulate(name, x, grad))

        return hook

    def _accumulate(self, name: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        batch = x.shape[0]
        # [examples, tokens, features]; float32 for the products (inputs may be half precision).
        # The output gradient has the output's layout, which mirrors the input's.
        xs = x.reshape(batch, -1, x.shape[-1]).float()
        gs = grad.detach().reshape(batch, -1, grad.shape[-1]).float()
        chunk = max(1, _EXAMPLE_CHUNK_ELEMENTS // (xs.shape[-1] * gs.shape[-1]))
        for i in range(0, batch, chunk):
            g2 = torch.bmm(gs[i : i + chunk].transpose(1, 2), xs[i : i + chunk]).square_()  # [c, out, in]
            _add(self.out, name, g2.sum(dim=(0, 2)))
            _add(self.inp, name, g2.sum(dim=(0, 1)))
            if self.keep_full:
                _add(self.full, name, g2.sum(dim=0))


def _require_grad(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Let gradients reach this module's output although no parameter requires them.

    The first targeted layer reads an input that does not require grad (weights are frozen during
    Fisher calibration); a detached copy that does makes everything after it differentiable.
    """
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() and not args[0].requires_grad:
        return (args[0].detach().requires_grad_(True), *args[1:])
    return None


def _add(acc: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    acc[name] = acc[name] + value if name in acc else value


@contextlib.contextmanager
def calibration_mode(model: nn.Module, freeze: bool) -> Iterator[None]:
    """Evaluation mode (deterministic: no dropout) and, with ``freeze``, no parameter requiring grad.

    Every module's mode, every parameter's ``requires_grad`` flag and gradient are put back as they
    were found on the way out, whatever happens inside.
    """
    modes = {m: m.training for m in model.modules()}
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    saved_grads = {p: p.grad for p in model.parameters()}
    model.eval()
    try:
        if freeze:
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = saved_grads[p]


def collect_statistics(
    model: nn.Module,
    target_names: Iterable[str],
    batches: Iterable[Mapping[str, torch.Tensor]],
    kinds: Iterable[str],
    *,
    keep_full_fisher: bool = False,
    task: str | None = None,
    total: int | None = None,
    progress: bool = True,
    summary: Mapping[str, Any] | None = None,
    start: RunningSums | None = None,
    checkpoint: Callable[[RunningSums], None] | None = None,
    reduce: Callable[[RunningSums], RunningSums] | None = None,
    fisher_labels: str = "data",
) -> Statistics:
    """Run the calibration batches once and collect every statistic asked for.

    Args:
        model: the model; it is left as it was found (mode, ``requires_grad``, gradients).
        target_names: names of the linear modules to collect for.
        batches: model inputs; for ``fisher`` each batch carries the ``labels`` of the task loss.
        kinds: subset of :data:`STAT_KINDS`.
        keep_full_fisher: also keep the elementwise Fisher (``[out, in]`` per module; memory heavy).
        task: the model's task (see :func:`fwsvd.training.losses.example_losses`), which defines each
            example's loss for ``fisher``; detected from the model when ``None``.
        total: number of batches, for the progress bar.
        progress: show a tqdm bar.
        summary: extra facts recorded in :attr:`Statistics.summary` (source, samples, ...).
        start: sums of batches already seen (a resumed checkpoint); ``batches`` are the rest.
        checkpoint: called with the running sums after every batch (it decides whether to save).
        reduce: applied to the running sums once all batches are seen, before they become
            statistics (the sum over the processes of a distributed run).
        fisher_labels: ``"data"`` (the empirical Fisher, the data's labels) or ``"model"`` (the
            expectation over the model's own predictive distribution; see
            :func:`fwsvd.training.losses.fisher_terms`).

    Returns:
        The collected :class:`Statistics`.

    Raises:
        FwsvdError: when there is no batch, a batch lacks labels for Fisher, or the loss or a
            statistic is not finite.
    """
    kinds = frozenset(kinds)
    unknown = kinds - STAT_KINDS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(STAT_KINDS)}")
    names = list(target_names)
    want_fisher = "fisher" in kinds
    modules = {n: model.get_submodule(n) for n in names}
    for m in modules.values():
        _weight_param(m)
    if want_fisher and task is None:
        task = task_of(model)
    if fisher_labels not in FISHER_LABELS:
        raise FwsvdError(f"Fisher labels {fisher_labels!r} must be one of {', '.join(FISHER_LABELS)}")

    sums = RunningSums() if start is None else start
    start_time = time.perf_counter()
    sums = _run_batches(
        model, names, batches, kinds, sums, task=task, keep_full_fisher=keep_full_fisher, total=total, progress=progress, checkpoint=checkpoint,
        fisher_labels=fisher_labels,
    )
    if reduce is not None:
        sums = reduce(sums)
    if sums.batches == 0:
        raise FwsvdError("no calibration batches: the calibration data is empty; pass a file with at least one example")

    stats = Statistics()
    for n in names:
        stats.tensors[n] = _final_entry(n, modules[n], sums.tensors.get(n, {}), want_fisher, keep_full_fisher)
    stats.shared = dict(sums.shared)
    stats.summary = {
        **dict(summary or {}),
        "kinds": sorted(kinds),
        "batches": sums.batches,
        "samples": sums.samples,
        "tokens": sums.tokens,
        "seconds": round(time.perf_counter() - start_time, 3),
    }
    if want_fisher:
        # Per example, so the figure and the statistics do not depend on the batch size.
        stats.summary["mean_loss"] = sums.loss_sum / sums.samples
        stats.summary["fisher_granularity"] = FISHER_GRANULARITY
        stats.summary["fisher_labels"] = fisher_labels
    logger.info("calibrated %s on %d samples (%d tokens) in %.1f s", sorted(kinds), sums.samples, sums.tokens, stats.summary["seconds"])
    return stats


def _run_batches(
    model: nn.Module,
    names: list[str],
    batches: Iterable[Mapping[str, torch.Tensor]],
    kinds: frozenset[str],
    sums: RunningSums,
    *,
    task: str | None,
    keep_full_fisher: bool,
    total: int | None,
    progress: bool,
    checkpoint: Callable[[RunningSums], None] | None,
    fisher_labels: str = "data",
) -> RunningSums:
    """Run every batch through the hooked model, starting from ``sums``: the sums after the last one."""
    want_fisher = "fisher" in kinds
    counts = sums.counts()
    # No parameter gradient at all with Fisher: the Fisher hooks form per-example weight gradients
    # from activations and output gradients, which flow without any weight requiring grad.
    with calibration_mode(model, freeze=want_fisher):
        # Activation hooks first: they must see each module's original input tensor (the Fisher
        # pre-hook may hand on a copy), so that modules reading one input share one covariance.
        with ActivationHooks(model, names, kinds & {"act", "cov"}) as hooks, FisherHooks(
            model, names if want_fisher else [], keep_full_fisher
        ) as fisher:
            # The batches and any resumed sums go where the model is (on the CPU they stay as they are).
            device = model_device(model)
            resumed = RunningSums({n: {k: t.to(device) for k, t in e.items()} for n, e in sums.tensors.items()}, sums.shared)
            hooks.restore(resumed)
            fisher.restore(resumed)
            trim = {} if want_fisher else forward_only_options(model, names, task)
            bar = tqdm(batches, total=total, initial=counts["batches"], desc="calibrating", unit="batch", disable=not progress, leave=False)
            for batch in bar:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                _run_batch(model, batch, hooks, fisher if want_fisher else None, task, counts, bar, fisher_labels, trim)
                if checkpoint is not None:
                    checkpoint(_running_sums(names, hooks, fisher, counts))
            return _running_sums(names, hooks, fisher, counts)


def forward_only_options(model: nn.Module, names: Iterable[str], task: str | None) -> dict[str, Any]:
    """Keyword arguments that trim a forward-only pass to what the hooks read.

    A causal LM's head turns every position's hidden state into a vocabulary's logits: on
    SmolLM2-135M a fifth of the forward pass. A pass without Fisher reads only the targets' inputs,
    so where the head is not a target ``logits_to_keep=1`` (the transformers generation option)
    computes the logits of the last position alone. ``{}`` otherwise, or where the model's
    ``forward`` does not take the option.
    """
    if task != "causal-lm":
        return {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or any(model.get_submodule(n) is head for n in names):
        return {}
    try:
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if takes else {}


def _run_batch(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    hooks: ActivationHooks,
    fisher: FisherHooks | None,
    task: str | None,
    counts: dict[str, Any],
    bar: Any,
    fisher_labels: str = "data",
    forward_only: Mapping[str, Any] | None = None,
) -> None:
    """One batch through the model (with the backward pass of its losses when ``fisher``), counted in ``counts``."""
    mask = batch.get("attention_mask")
    hooks.new_batch(mask)
    rows = int(batch["input_ids"].shape[0])
    if fisher is not None:
        if "labels" not in batch:
            raise FwsvdError("Fisher calibration needs labelled data: the batch has no 'labels'")
        fisher.batch_size, fisher.tokens = (int(n) for n in batch["input_ids"].shape[:2])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.enable_grad():
            logits = model(**inputs).logits
            config = getattr(model, "config", None)
            losses = example_losses(task, logits, batch["labels"], config)
            terms = [losses] if fisher_labels == "data" else fisher_terms(task, logits, batch["labels"], config, fisher_labels)
            del logits
            if not torch.isfinite(losses).all():
                raise FwsvdError(f"calibration loss is {losses.tolist()}: check the labels and the model weights for NaN/inf")
            # The sum's gradient for each example is that of its own term; the Fisher hooks add up
            # the squared per-example gradients of every term (one per class for the true Fisher).
            for i, term in enumerate(terms):
                term.sum().backward(retain_graph=i < len(terms) - 1)
        counts["loss_sum"] += float(losses.detach().sum())
        bar.set_postfix(loss=f"{counts['loss_sum'] / (counts['samples'] + rows):.4f}")
    else:
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"}, **(forward_only or {}))
    counts["batches"] += 1
    counts["samples"] += rows
    counts["tokens"] += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def _running_sums(names: list[str], hooks: ActivationHooks, fisher: FisherHooks, counts: dict[str, Any]) -> RunningSums:
    """What the hooks have added up so far, with the counts, as :class:`RunningSums`."""
    tensors = {n: {**hooks.sums(n), **{k: acc[n] for k, acc in (("fisher_out", fisher.out), ("fisher_in", fisher.inp), ("fisher_full", fisher.full)) if n in acc}} for n in names}
    return RunningSums({n: t for n, t in tensors.items() if t}, dict(hooks.shared), **counts)


def _final_entry(name: str, module: nn.Module, acc: dict[str, torch.Tensor], want_fisher: bool, keep_full_fisher: bool) -> dict[str, torch.Tensor]:
    """One module's statistics from its sums (zero Fisher where the loss never reached it), checked finite."""
    entry: dict[str, torch.Tensor] = {}
    if want_fisher:
        out_features, in_features = linear_weight(module).shape
        entry["fisher_out"] = acc.get("fisher_out", torch.zeros(out_features))
        entry["fisher_in"] = acc.get("fisher_in", torch.zeros(in_features))
        if keep_full_fisher:
            entry["fisher_full"] = acc.get("fisher_full", torch.zeros(out_features, in_features))
    if "act_abs_sum" in acc:
        entry["act_abs_mean"] = acc["act_abs_sum"] / max(int(acc["act_tokens"]), 1)
    if "cov" in acc:
        entry["cov"] = acc["cov"]
    for key, t in entry.items():
        if not torch.isfinite(t).all():
            raise FwsvdError(f"statistic {key} of {name} is not finite: the model or data produce NaN/inf")
    # Statistics live on the CPU whatever device collected them (saved and checked there).
    return {key: t.cpu() for key, t in entry.items()}


def task_of(model: nn.Module) -> str:
    """The task of a transformers model, from its class (or its config's ``architectures``)."""
    from ..storage.loading import detect_task

    names = [type(model).__name__, *(getattr(getattr(model, "config", None), "architectures", None) or [])]
    return detect_task(SimpleNamespace(architectures=names))


def _weight_param(module: nn.Module) -> nn.Parameter:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise FwsvdError(f"{type(module).__name__} has no weight parameter to calibrate")
    return weight
