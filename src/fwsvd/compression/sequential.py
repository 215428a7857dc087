"""Layer-sequential calibration and compression: one transformer block at a time.

:func:`fwsvd.api.compress` works from statistics of the whole dense model, collected in one pass,
so every targeted layer's covariance is in memory at once and each layer is fitted to inputs that
the *dense* earlier layers produce. This mode instead (as GPTQ-style tools do):

1. runs the calibration batches once up to the transformer blocks and records what each block is
   called with (the hidden states entering the first block, and every block's other arguments:
   attention masks, rotary position embeddings and the like, which transformers computes once and
   passes to each block);
2. for each block in turn: collects that block's statistics (``act``/``cov``) from its current
   inputs, factorizes its targeted layers, drops the statistics, and runs the *compressed* block
   to produce the next block's inputs.

Peak memory holds one block's statistics plus the calibration hidden states, instead of every
layer's statistics plus a full forward pass with logits. Each block is fitted to the inputs that
the already-compressed earlier blocks produce, so it corrects part of their error (SVD-LLM's
sequential update, Wang et al. 2024). With correction (``refit``, off by default) the dense model's
hidden states travel alongside, and each layer's left factor is refit in closed form so that the
compressed layer, on the inputs it will see, reproduces the dense layer's outputs on the dense
inputs (SVD-LLM's parameter update, SAES-SVD's correction), as far as that lowers its error on
held-out calibration batches.

Statistics that need the whole model come first, from one pass over the dense model: FWSVD's
Fisher information (gradients of the whole model's loss; two vectors per layer), and with global
rank allocation whatever prices the components, so that the ranks are fixed before any block
changes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import CalibrationConfig, CompressConfig
from .report import CompressionReport, LayerReport
from .allocation import allocate, allocation_rules
from ..calibration.calibrate import calibrate
from ..calibration.batches import calibration_batches
from .factorize import compress, factorize_targets, record_compression, refuse_compressed, rounded_ranks
from ..nn import count_parameters
from ..errors import DataError, FwsvdError
from ..storage.loading import LoadedModel
from ..nn import LinearInfo, check_finite_weights, find_blocks, find_targets
from ..core import balance_factors, output_error, refit_left_factor, refit_step
from ..methods import Method
from ..calibration.statistics import ActivationHooks, PairedInputHooks, Statistics
from ..blocks import BlockCall, block_targets, capture_block_calls, check_single_stack

logger = logging.getLogger(__name__)

__all__ = ["REFIT_DAMPING", "REFIT_HOLD_OUT", "compress_sequential", "held_out_batches"]

#: Damping of the refit's normal equations, as a fraction of their mean diagonal: enough to keep
#: a rank-deficient calibration set solvable, small against any real signal.
REFIT_DAMPING = 1e-4
#: Every ``REFIT_HOLD_OUT``-th calibration batch is held out from the refit and judges it instead
#: (with at least 2 batches; one batch leaves only the in-sample check).
REFIT_HOLD_OUT = 4


def held_out_batches(count: int) -> frozenset[int]:
    """Indices of the calibration batches that judge the refit: every ``REFIT_HOLD_OUT``-th, the last if fewer."""
    if count < 2:
        return frozenset()
    held = frozenset(range(REFIT_HOLD_OUT - 1, count, REFIT_HOLD_OUT))
    return held or frozenset({count - 1})


def _block_statistics(
    model: nn.Module,
    block: nn.Module,
    names: list[str],
    kinds: frozenset[str],
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    masks: list[torch.Tensor | None],
    dense_hidden: list[torch.Tensor] | None = None,
    held: frozenset[int] = frozenset(),
) -> tuple[Statistics, list[torch.Tensor] | None]:
    """``act``/``cov`` of the block's targeted layers from its current inputs.

    With ``dense_hidden`` (the dense model's hidden states entering this block, for correction),
    each batch first runs through the still-dense block from those states, which yields the
    dense model's next hidden states (returned) and, per layer, ``cross``/``dense_cov`` against
    the current inputs (:class:`~fwsvd.calibration.statistics.PairedInputHooks`); the batches whose indices are in
    ``held`` count towards ``held_cov``/``held_cross``/``held_dense_cov`` instead (still towards
    ``cov``).
    """
    next_dense: list[torch.Tensor] | None = None
    with ActivationHooks(model, names, kinds) as hooks, contextlib.ExitStack() as stack:
        pairs = stack.enter_context(PairedInputHooks(model, names)) if dense_hidden is not None else None
        if pairs is not None and dense_hidden is not None:
            next_dense = []
            for index, (h, hd, call, mask) in enumerate(zip(hidden, dense_hidden, calls, masks)):
                # The activation hooks must not count the dense run: they are entered first, so
                # they see every call; their statistics are taken from the second run only.
                hooks.mask, hooks.enabled = mask, False
                pairs.start("reference", mask, held=index in held)
                next_dense.append(call.run(block, hd))
                hooks.new_batch(mask)
                hooks.enabled = True
                pairs.start("current", mask, held=index in held)
                call.run(block, h)
        else:
            for h, call, mask in zip(hidden, calls, masks):
                hooks.new_batch(mask)
                call.run(block, h)
    stats = Statistics(shared=dict(hooks.shared))
    for name in names:
        entry = hooks.entries(name)
        if pairs is not None:
            entry.update(pairs.entries(name))
        for key, t in entry.items():
            if not torch.isfinite(t).all():
                raise FwsvdError(f"statistic {key} of {name} is not finite: the model or data produce NaN/inf")
        stats.tensors[name] = entry
    stats.summary = {"kinds": sorted(kinds)}
    return stats, next_dense


class _Refit:
    """The per-layer correction of sequential mode: the left factor refit to the dense outputs.

    With held-out batches (``held_*`` statistics), the refit is fitted to the other batches and
    then moved towards only as far as it lowers the (row-weighted) output error on the held-out
    ones (:func:`fwsvd.core.refit_step`): a refit that merely memorises the calibration tokens is
    dropped. Without them, it is kept only where it lowers the error on the calibration tokens,
    so it can never make a layer worse on its own data.
    """

    def __init__(self, method: Method, damping: float) -> None:
        self.method = method
        self.damping = damping
        self.kept = 0
        self.tried = 0
        self.steps: list[float] = []

    def __call__(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "cross" not in stats:
            return a, b
        self.tried += 1
        cov, cross, dense_cov = stats["cov"], stats["cross"], stats["dense_cov"]
        row = self.method.row_weight(stats)
        if "held_cov" in stats:
            held_cov = stats["held_cov"]
            refit = refit_left_factor(weight, b, cov.double() - held_cov, cross, damping=self.damping)
            step = refit_step(weight, a, refit, b, held_cov, stats["held_cross"], row)
            self.steps.append(step)
            if step <= 0:
                return a, b
            self.kept += 1
            return balance_factors((a.double() + step * (refit.double() - a.double())).to(a.dtype), b)
        refit = refit_left_factor(weight, b, cov, cross, damping=self.damping)
        before = output_error(weight, a, b, cov, cross, dense_cov, row)
        after = output_error(weight, refit, b, cov, cross, dense_cov, row)
        if not after < before:
            return a, b
        self.kept += 1
        return balance_factors(refit, b)

    def summary(self, held_out_batches: int) -> dict[str, Any]:
        out: dict[str, Any] = {"kept": self.kept, "layers": self.tried, "held_out_batches": held_out_batches}
        if self.steps:
            out["mean_step"] = round(sum(self.steps) / len(self.steps), 4)
        return out


def compress_sequential(
    loaded: LoadedModel,
    config: CompressConfig,
    calibration: CalibrationConfig,
    *,
    statistics: Statistics | None = None,
    progress: bool = True,
) -> CompressionReport:
    """Calibrate and compress ``loaded.model`` in place, one transformer block at a time.

    Produces the same kind of compressed model and compression record as :func:`fwsvd.api.compress`
    (the record's calibration summary says ``"sequential": true``). Each block is fitted to the
    outputs of the already-compressed blocks before it, and with ``config.refit`` each layer's left
    factor is then refit in closed form to the *dense* model's outputs on those inputs
    (:func:`fwsvd.core.refit_left_factor`; taken as far as it lowers the layer's error on held-out calibration batches).

    Statistics that need the whole model are computed first, in one pass over the dense model:
    Fisher information for ``fwsvd`` (gradients of the whole model's loss, two vectors per layer),
    and for ``allocation="global"`` the statistics that price each layer's components, from which
    the ranks are chosen before any block changes. Everything else comes from each block's current
    inputs, so peak memory beyond that pass is one block's statistics plus the hidden states.

    Args:
        loaded: the dense model with its tokenizer and task.
        config: method, budget, allocation and correction. ``include`` may only select layers
            inside the transformer blocks.
        calibration: calibration data (labelled where the method needs Fisher).
        statistics: one-pass statistics of the dense model to reuse (their ``fisher`` and, for
            global allocation, what the method needs); calibrated here when ``None``.
        progress: show progress bars.

    Returns:
        A :class:`~fwsvd.api.CompressionReport`.

    Raises:
        FwsvdError: for an already-compressed model, targets outside the transformer blocks, an
            encoder-decoder model, or a model whose blocks cannot be replayed.
        DataError: for missing or empty calibration data.
    """
    model = loaded.model
    task = loaded.task
    refuse_compressed(model)
    method = config.build_method(task)
    needs = method.needs_for(task)
    block_kinds = frozenset(needs) & {"act", "cov"}
    if not block_kinds and "fisher" not in needs:
        # Nothing to calibrate (plain SVD): block order changes nothing, and no data is needed.
        return compress(model, config, None, task=task, progress=progress)
    targets = find_targets(model, config.include, config.exclude)
    check_finite_weights(model)
    block_names = find_blocks(model)
    check_single_stack(model, block_names, "sequential mode")
    info = {t.name: t for t in targets}
    by_block = {block: [info[name] for name in names] for block, names in block_targets(block_names, list(info), what="sequential mode").items()}

    global_kinds, statistics, ranks, seconds_global = _whole_model_statistics(loaded, config, calibration, method, needs, targets, statistics, progress)
    if config.refit:
        block_kinds |= {"cov"}  # the refit solves against the current inputs' covariance
    # Unlabelled from here on: blocks only need their inputs.
    batches, summary = calibration_batches(loaded, calibration, labels=False)
    if not batches:
        raise DataError("no calibration batches: the calibration data is empty; pass a file with at least one example")
    summary["task"] = task

    before = count_parameters(model)
    refit = _Refit(method, REFIT_DAMPING) if config.refit else None
    seconds = _Seconds(calibration=seconds_global)
    run = _BlockRun(model, method, config.keep, block_kinds, statistics, ranks, refit, seconds)
    rows, n_tokens, held = _compress_blocks(run, block_names, by_block, batches, progress)
    position = {t.name: i for i, t in enumerate(targets)}
    rows.sort(key=lambda r: position[r.name])

    _complete_summary(summary, block_kinds | global_kinds, batches, n_tokens, seconds, statistics, refit, held)
    logger.info("sequential %s: %d blocks calibrated in %.1f s, factorized in %.1f s", method.name, len(block_names), seconds.calibration, seconds.factorize)
    return record_compression(model, config, method, rows, parameters_before=before, calibration=summary, seconds=seconds.factorize)


@dataclass
class _Seconds:
    """Time spent so far: calibrating (whole-model statistics, block statistics, running blocks) and factorizing."""

    calibration: float = 0.0
    factorize: float = 0.0


def _whole_model_statistics(
    loaded: LoadedModel,
    config: CompressConfig,
    calibration: CalibrationConfig,
    method: Method,
    needs: frozenset[str],
    targets: list[LinearInfo],
    statistics: Statistics | None,
    progress: bool,
) -> tuple[frozenset[str], Statistics | None, dict[str, int | None] | None, float]:
    """Whole-model statistics first: Fisher, and what global allocation prices components with.

    Returns the kinds that came from the whole model, the statistics (calibrated here when
    ``statistics`` is ``None`` and any are needed), every target's rank (``None``: uniform) and
    the seconds spent.
    """
    model = loaded.model
    allocation = config.resolved_allocation()
    global_kinds = frozenset(needs & {"fisher"}) | (frozenset(needs) if allocation == "global" else frozenset())
    seconds_global = 0.0
    if global_kinds:
        t0 = time.perf_counter()
        if statistics is None:
            # Sequential compression runs on the CPU (its block passes move no tensor): so does this pass.
            statistics = calibrate(loaded, replace(calibration, device="cpu"), global_kinds, include=config.include, exclude=config.exclude, progress=progress)
        elif global_kinds - statistics.kinds:
            raise FwsvdError(
                f"the given statistics hold {sorted(statistics.kinds)} but sequential {method.name} also needs "
                f"{sorted(global_kinds - statistics.kinds)} from the whole model: recalibrate"
            )
        seconds_global = time.perf_counter() - t0
    ranks: dict[str, int | None] | None = None
    if allocation == "global":
        t0 = time.perf_counter()
        ranks, _ = allocate(model, targets, method, config.keep, statistics, **allocation_rules(config), progress=progress)
        seconds_global += time.perf_counter() - t0
    return global_kinds, statistics, rounded_ranks(targets, config, ranks), seconds_global


@dataclass
class _BlockRun:
    """What compressing each block needs besides the block and its inputs."""

    model: nn.Module
    method: Method
    keep: float
    kinds: frozenset[str]
    statistics: Statistics | None  # whole-model statistics, whose Fisher vectors each block reuses
    ranks: dict[str, int | None] | None
    refit: _Refit | None
    seconds: _Seconds


def _compress_blocks(
    run: _BlockRun,
    block_names: list[str],
    by_block: dict[str, list[LinearInfo]],
    batches: list[dict[str, torch.Tensor]],
    progress: bool,
) -> tuple[list[LayerReport], int, frozenset[int]]:
    """Capture the blocks' calls, then compress each block and run it to produce the next block's inputs.

    Returns the layers' reports (in block order), the calibration tokens, and the held-out batches.
    The model's training mode is put back as it was found, whatever happens.
    """
    model = run.model
    blocks = [model.get_submodule(name) for name in block_names]
    was_training = model.training
    model.eval()
    rows: list[LayerReport] = []
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            captured = capture_block_calls(model, blocks, batches)
            masks = captured.masks
            n_tokens = sum(int(m.sum()) if m is not None else int(h.shape[0] * h.shape[1]) for m, h in zip(masks, captured.hidden))
            # Only the current block's inputs stay alive: each block's outputs replace them. With
            # correction, the dense model's hidden states travel alongside.
            hidden, captured.hidden = captured.hidden, []
            dense_hidden = list(hidden) if run.refit is not None else None
            held = held_out_batches(len(hidden)) if run.refit is not None else frozenset()
            run.seconds.calibration += time.perf_counter() - t0
            bar = tqdm(list(zip(block_names, blocks)), desc=f"{run.method.name} keep={run.keep:g} (sequential)", unit="block", disable=not progress, leave=False)
            for index, (name, block) in enumerate(bar):
                calls = captured.calls[index]
                next_dense = None
                if by_block[name]:
                    next_dense = _compress_block(run, block, by_block[name], hidden, calls, masks, dense_hidden, held, rows)
                if index < len(blocks) - 1:
                    t0 = time.perf_counter()
                    if dense_hidden is not None:
                        # A block without targets is still dense: its outputs serve both streams.
                        dense_hidden = next_dense if next_dense is not None else [call.run(block, h) for h, call in zip(dense_hidden, calls)]
                    # The next block sees what the compressed block produces.
                    hidden = [call.run(block, h) for h, call in zip(hidden, calls)]
                    run.seconds.calibration += time.perf_counter() - t0
    finally:
        model.train(was_training)
    return rows, n_tokens, held


def _compress_block(
    run: _BlockRun,
    block: nn.Module,
    infos: list[LinearInfo],
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    masks: list[torch.Tensor | None],
    dense_hidden: list[torch.Tensor] | None,
    held: frozenset[int],
    rows: list[LayerReport],
) -> list[torch.Tensor] | None:
    """Factorize one block's targets (their reports appended to ``rows``) from its current inputs.

    Returns the dense model's hidden states after the block (with correction; else ``None``).
    """
    # The whole block's statistics at once, from its current inputs. Refitting the
    # output projections to the block's own compressed q/k/v (and down to gate/up)
    # was measured too, and was slightly worse on SmolLM2 (keep 0.8: 62.9 against
    # 59.4; keep 0.6: 124.7 against 121.9) at twice the passes.
    t0 = time.perf_counter()
    stats, next_dense = _block_statistics(run.model, block, [t.name for t in infos], run.kinds, hidden, calls, masks, dense_hidden, held)
    if run.statistics is not None:
        for t in infos:
            for key in ("fisher_out", "fisher_in"):
                if key in run.statistics.tensors.get(t.name, {}):
                    stats.tensors[t.name][key] = run.statistics.tensors[t.name][key]
    run.seconds.calibration += time.perf_counter() - t0
    t0 = time.perf_counter()
    rows.extend(factorize_targets(run.model, infos, run.method, run.keep, stats, ranks=run.ranks, correct=run.refit, progress=False))
    run.seconds.factorize += time.perf_counter() - t0
    del stats
    return next_dense


def _complete_summary(
    summary: dict[str, Any],
    kinds: frozenset[str],
    batches: list[dict[str, torch.Tensor]],
    n_tokens: int,
    seconds: _Seconds,
    statistics: Statistics | None,
    refit: _Refit | None,
    held: frozenset[int],
) -> None:
    """Add what the sequential run calibrated on (and the refit's outcome) to the calibration ``summary``."""
    summary.update(
        {
            "kinds": sorted(kinds),
            "batches": len(batches),
            "samples": sum(int(b["input_ids"].shape[0]) for b in batches),
            "tokens": n_tokens,
            "seconds": round(seconds.calibration, 3),
            "sequential": True,
        }
    )
    if statistics is not None and "fisher_granularity" in statistics.summary:
        summary["fisher_granularity"] = statistics.summary["fisher_granularity"]
        summary["fisher_labels"] = statistics.summary.get("fisher_labels", "data")
    if refit is not None:
        summary["refit"] = refit.summary(len(held))
