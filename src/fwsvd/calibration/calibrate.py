"""One calibration pass: statistics for a method, in one process or many, resumable, or block by block."""

from __future__ import annotations

import contextlib
from dataclasses import asdict

import torch

from ..device import computing_in, model_device, place, resolve_device
from ..storage.loading import LoadedModel
from ..nn import find_targets
from .resume import Checkpointing
from .statistics import Statistics, collect_statistics
from ..config import CalibrationConfig
from .batches import calibration_batches, covariance_batches


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
    (:mod:`fwsvd.calibration.resume`), on any device.

    The model is moved to ``config.device`` (:func:`fwsvd.device.resolve_device`) and stays there, so
    that :func:`fwsvd.compress` factorizes there too; with ``config.low_memory`` only one block at a
    time goes there (the rest stays where it is). With ``config.compute_dtype`` bfloat16 or float16
    the passes run on copies of the weights in that dtype (the model's own weights are left as they
    are). The statistics are returned on the CPU.

    Raises:
        FwsvdError: for bad data, a non-finite loss or statistic, or a device this machine lacks.
    """
    from . import distributed

    device = resolve_device(config.device)
    targets = find_targets(loaded.model, include, exclude)
    names = [t.name for t in targets]
    need_labels = "fisher" in kinds
    batches, summary = calibration_batches(loaded, config, labels=need_labels)
    summary["task"] = loaded.task
    ctx = distributed.current()
    if ctx.active:
        summary["processes"] = ctx.world_size
    # Half precision: the model runs as copies in that dtype, its own float32 weights wait unchanged.
    half = config.compute_dtype != "float32"
    if half:
        summary["compute_dtype"] = config.compute_dtype
    dtype = getattr(torch, config.compute_dtype)
    if config.low_memory:
        from .streaming import stream_statistics_in_scratch

        # The copies stay where the weights are: the stream moves one block at a time to the device.
        home = model_device(loaded.model)
        with computing_in(loaded.model, home, dtype) if half else contextlib.nullcontext():
            # Under torchrun each process streams its share of the batches; each block's sums are added up.
            return stream_statistics_in_scratch(
                loaded.model, names, distributed.shard(batches), kinds, keep_full_fisher=keep_full_fisher, task=loaded.task,
                progress=progress, summary=summary, device=device, reduce=distributed.add_up if ctx.active else None,
            )
    mine = distributed.shard(batches)
    start = save = None
    if checkpoint is not None:
        from .resume import fingerprint

        resolved = asdict(config.resolved(loaded.task))
        # Where the sums are made does not change them; float32 is what checkpoints always assumed.
        # The --cov-samples pass runs after the checkpointed one and is not part of its sums.
        facts = fingerprint(
            model=loaded.model, source=loaded.source, task=loaded.task,
            calibration={k: v for k, v in resolved.items() if k not in ("device", "cov_samples") and (k != "compute_dtype" or half)},
            kinds=kinds, targets=names, keep_full_fisher=keep_full_fisher, ctx=ctx,
        )
        start, save = checkpoint.begin(facts, ctx, total=len(mine))
    with computing_in(loaded.model, device, dtype) if half else contextlib.nullcontext():
        if not half:
            place(loaded.model, device)
        statistics = collect_statistics(
            loaded.model, names, mine[start.batches if start is not None else 0 :], kinds, keep_full_fisher=keep_full_fisher,
            task=loaded.task, total=len(mine), progress=progress, summary=summary, start=start, checkpoint=save,
            reduce=distributed.reduce_sums, fisher_labels=config.fisher_labels,
        )
        extra = covariance_batches(loaded, config, batches) if "cov" in kinds else []
        if extra:
            share = distributed.shard(extra)
            add_covariance(statistics, collect_statistics(
                loaded.model, names, share, {"cov"}, task=loaded.task, total=len(share), progress=progress, reduce=distributed.reduce_sums,
            ))
    # The model stays on the device (in its own dtype), so that factorization runs there too.
    place(loaded.model, device)
    return statistics


def add_covariance(statistics: Statistics, extra: Statistics) -> None:
    """Add the input covariances of a forward-only pass (``--cov-samples``) to ``statistics``, in place,
    and record what they were taken over (``cov_samples``, ``cov_tokens``)."""
    for name, entry in extra.tensors.items():
        if "cov" in entry and "cov" in statistics.tensors.get(name, {}):
            statistics.tensors[name]["cov"] = statistics.tensors[name]["cov"] + entry["cov"]
    summary = statistics.summary
    summary["cov_samples"] = summary.get("samples", 0) + extra.summary.get("samples", 0)
    summary["cov_tokens"] = summary.get("tokens", 0) + extra.summary.get("tokens", 0)
    summary["seconds"] = round(summary.get("seconds", 0.0) + extra.summary.get("seconds", 0.0), 3)
