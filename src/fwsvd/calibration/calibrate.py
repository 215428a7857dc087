"""One calibration pass: statistics for a method, in one process or many, resumable, or block by block."""

from __future__ import annotations

from dataclasses import asdict


from ..errors import FwsvdError
from ..storage.loading import LoadedModel
from ..nn import find_targets
from .resume import Checkpointing
from .statistics import Statistics, collect_statistics
from ..config import CalibrationConfig
from .batches import calibration_batches


def calibrate(
    loaded: LoadedModel,
    config: CalibrationConfig,
    kinds: set[str] | frozenset[str],
    *,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    keep_full_fisher: bool = False,
    progress: bool = True,
    checkpoint: Checkpointing | None = None,
) -> Statistics:
    """Collect the statistics ``kinds`` for the targeted layers in one pass over the calibration data.

    Under ``torchrun`` (see :mod:`fwsvd.calibration.distributed`) each process calibrates on its share of the
    batches and every process gets the sums over all of them. With ``checkpoint`` the running sums
    are saved every few batches, and a run with the same settings resumes from them
    (:mod:`fwsvd.calibration.resume`).
    """
    from . import distributed

    targets = find_targets(loaded.model, include, exclude)
    names = [t.name for t in targets]
    need_labels = "fisher" in kinds
    batches, summary = calibration_batches(loaded, config, labels=need_labels)
    summary["task"] = loaded.task
    ctx = distributed.current()
    if config.low_memory:
        if ctx.active:
            raise FwsvdError("--low-memory calibrates in one process: run it without torchrun")
        from .streaming import stream_statistics_in_scratch

        return stream_statistics_in_scratch(
            loaded.model, names, batches, kinds, keep_full_fisher=keep_full_fisher, task=loaded.task, progress=progress, summary=summary
        )
    if ctx.active:
        summary["processes"] = ctx.world_size
    mine = distributed.shard(batches)
    start = save = None
    if checkpoint is not None:
        from .resume import fingerprint

        facts = fingerprint(
            model=loaded.model, source=loaded.source, task=loaded.task, calibration=asdict(config.resolved(loaded.task)),
            kinds=kinds, targets=names, keep_full_fisher=keep_full_fisher, ctx=ctx,
        )
        start, save = checkpoint.begin(facts, ctx, total=len(mine))
    return collect_statistics(
        loaded.model,
        names,
        mine[start.batches if start is not None else 0 :],
        kinds,
        keep_full_fisher=keep_full_fisher,
        task=loaded.task,
        total=len(mine),
        progress=progress,
        summary=summary,
        start=start,
        checkpoint=save,
        reduce=distributed.reduce_sums,
        fisher_labels=config.fisher_labels,
    )
