"""``fwsvd compress``: factorize a model's linear layers and save it."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import FwsvdError
from .common import add_data_options, add_device_option, add_output_options, check_out, field_help, finetune_line, fmt_int, memory_line, positive_int, table


def add_parser(sub: Any) -> None:
    """Add the ``compress`` command to the subparsers ``sub``."""
    from ..config import ALLOCATIONS, DEFAULT_ALLOCATION, DEFAULT_RANK_FLOOR, STORAGE_DTYPES, CalibrationConfig, CompressConfig
    from ..config import DENSE_CHOICE_OPTIONS
    from ..device import COMPUTE_DTYPES
    from ..methods import METHODS
    from ..storage.int8 import QUANTIZED_FORMATS
    from ..storage.loading import TASKS

    c = sub.add_parser("compress", help="factorize a model's linear layers and save it", description="Factorize a model's linear layers and save it as a Hugging Face folder.")
    c.add_argument("model", metavar="MODEL", help="model folder (config.json + safetensors, or one .gguf) or hub id")
    c.add_argument("--out", required=True, help="output folder (written atomically)")
    c.add_argument("--method", choices=list(METHODS), default="fwsvd", help=field_help(CompressConfig, "method"))
    c.add_argument("--keep", type=float, default=None, help=field_help(CompressConfig, "keep") + " (required unless --quantize)")
    c.add_argument("--data", default=None, help="calibration data: .tsv/.csv/.jsonl with labels, .txt for causal LMs, or a datasets hub name (default: --finetune-data when given)")
    add_data_options(c, calibration=True)
    c.add_argument("--include", action="append", default=[], metavar="PATTERN", help=field_help(CompressConfig, "include"))
    c.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help=field_help(CompressConfig, "exclude"))
    c.add_argument("--fisher-reduction", choices=["auto", "out", "in", "both"], default="auto", help=field_help(CompressConfig, "fisher_reduction"))
    c.add_argument("--fisher-whiten", choices=["auto", "on", "off"], default="auto", help=field_help(CompressConfig, "fisher_whiten"))
    c.add_argument("--allocation", choices=list(ALLOCATIONS), default=DEFAULT_ALLOCATION, help=field_help(CompressConfig, "allocation"))
    c.add_argument("--rank-floor", type=float, default=None, help=field_help(CompressConfig, "rank_floor") + f" (default {DEFAULT_RANK_FLOOR:g})")
    c.add_argument("--dense-above", type=float, default=1.0, metavar="FRACTION", help=field_help(CompressConfig, "dense_above"))
    c.add_argument("--dense-choice", choices=list(DENSE_CHOICE_OPTIONS), default=None, help=field_help(CompressConfig, "dense_choice"))
    c.add_argument("--rank-multiple", type=int, default=1, metavar="N", help=field_help(CompressConfig, "rank_multiple"))
    c.add_argument("--asvd-alpha", type=float, default=0.5, help=field_help(CompressConfig, "asvd_alpha"))
    c.add_argument("--damping", type=float, default=0.01, help=field_help(CompressConfig, "damping"))
    c.add_argument("--dtype", choices=list(STORAGE_DTYPES), default=None, help=field_help(CompressConfig, "dtype"))
    c.add_argument(
        "--quantize-factors", choices=list(QUANTIZED_FORMATS), default=None,
        help="store the low-rank factors as int8 with one float32 scale per row (a quarter of float32; other weights as --dtype "
        "says); the model computes in floating point with the rounded factors, here and after loading",
    )
    c.add_argument("--task", choices=list(TASKS), default=None, help="model task (detected from config.json when omitted)")
    c.add_argument("--save-stats", default=None, metavar="FILE", help="also write the calibration statistics to this .safetensors file")
    c.add_argument("--stats", default=None, metavar="FILE", help="reuse statistics saved with --save-stats instead of calibrating")
    c.add_argument(
        "--checkpoint-every", type=int, default=None, metavar="N",
        help="save the calibration's running sums every N batches to a hidden file beside --save-stats (else beside --out), "
        "so that the same command resumes after an interruption; removed on success. Default: every batch that ends 5 "
        "minutes after the last checkpoint (and ten times the last write's duration); 0: no checkpoints, no resuming",
    )
    c.add_argument(
        "--sequential", action="store_true",
        help="compress one transformer block at a time, each fitted to the inputs the compressed blocks before it produce "
        "(fwsvd's Fisher, and global allocation's prices, come from one pass over the dense model first)",
    )
    c.add_argument(
        "--low-memory", action="store_true",
        help="never hold the whole model: calibrate one transformer block at a time (the same statistics) and, for a "
        "safetensors model folder, read each block's weights from disk when it is needed and write its factors before the next "
        "(slower; peak memory about one block plus the embeddings)",
    )
    c.add_argument(
        "--correct", action="store_true",
        help="causal LMs: after factorizing, take one gradient step of the next-token loss on the factors (ranks stay), on the "
        "--samples blocks of --data that calibration uses, its length chosen on other blocks of that text and not taken "
        "unless it lowers their loss (training-free in ZS-SVD's sense: no optimizer, one gradient). With --stats, --data "
        "and --samples name the correction's text",
    )
    c.add_argument(
        "--correct-steps", type=int, default=None, metavar="N",
        help="with --correct: up to N gradient steps instead of one, each with a fresh gradient and line search, stopping at "
        "the first that does not lower the held-out loss (default 1)",
    )
    c.add_argument("--fisher-labels", choices=("data", "model"), default="data", help=field_help(CalibrationConfig, "fisher_labels"))
    c.add_argument("--refit", action=argparse.BooleanOptionalAction, default=False, help="with --sequential: " + field_help(CompressConfig, "refit"))
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    add_device_option(
        c, "; calibration and factorization run there, with --low-memory one block at a time (the weights wait on disk); "
        "--sequential runs on the CPU (auto picks it there)",
    )
    c.add_argument("--cov-samples", type=positive_int, default=None, metavar="N", help=field_help(CalibrationConfig, "cov_samples"))
    c.add_argument("--calibration-dtype", choices=list(COMPUTE_DTYPES), default="float32", help=field_help(CalibrationConfig, "compute_dtype"))
    _add_quantize_options(c)
    _add_recovery_options(c)
    add_output_options(c)


#: The options of --quantize, and those that apply only to factorization (refused with --quantize).
QUANTIZE_OPTIONS = ("group_size", "correction_rank", "budget_bytes", "correction_share")
FACTORIZE_ONLY = {
    "keep": None, "allocation": "auto", "rank_floor": None, "dense_above": 1.0, "dense_choice": None, "rank_multiple": 1, "sequential": False, "refit": False,
    "low_memory": False, "correct": False, "correct_steps": None, "quantize_factors": None, "dtype": None, "finetune_data": None,
}


def _add_quantize_options(c: argparse.ArgumentParser) -> None:
    """--quantize and its options: every targeted linear on a weight grid plus a low-rank correction of its error."""
    from ..config import QUANTIZE_SCHEMES, QuantizeConfig

    g = c.add_argument_group(
        "quantized weights",
        "instead of factorizing: round every targeted linear to a grid and add a low-rank correction of the rounding error, "
        "fitted by --method's weighting (fwsvd: Fisher per output over whitened inputs) with ranks shared across layers under one byte budget",
    )
    g.add_argument("--quantize", choices=list(QUANTIZE_SCHEMES), default=None, help=field_help(QuantizeConfig, "scheme"))
    g.add_argument("--group-size", type=positive_int, default=None, metavar="N", help=field_help(QuantizeConfig, "group_size"))
    g.add_argument("--correction-rank", type=int, default=None, metavar="R", help=field_help(QuantizeConfig, "correction_rank"))
    g.add_argument("--budget-bytes", type=float, default=None, metavar="F", help=field_help(QuantizeConfig, "budget_bytes"))
    g.add_argument("--correction-share", type=float, default=None, metavar="S", help=field_help(QuantizeConfig, "correction_share") + " (default 0.1)")
    c.add_argument(
        "--any-size", action="store_true",
        help="instead of one --keep: store every targeted layer's whole decomposition (float16 factors, in the method's order) with "
        "the price of every component, so that `fwsvd resize DIR --keep K` (or fwsvd.load(DIR, keep=K)) makes any size in seconds, "
        "as a direct compression at K would",
    )


def quantize_config(args: argparse.Namespace) -> Any:
    """The :class:`~fwsvd.config.QuantizeConfig` of --quantize (``None`` without it); refuses options that do not apply."""
    from ..config import DEFAULT_CORRECTION_SHARE, QuantizeConfig

    if args.quantize is None:
        given = [f"--{name.replace('_', '-')}" for name in QUANTIZE_OPTIONS if getattr(args, name) is not None]
        if given:
            raise FwsvdError(f"{'/'.join(given)} size the correction of --quantize: add --quantize int4 (or int8/int3), or drop them")
        if args.any_size:
            clash = [f"--{name.replace('_', '-')}" for name, default in FACTORIZE_ONLY.items()
                     if name not in ("allocation", "rank_floor", "dense_above", "dense_choice") and getattr(args, name) != default]
            if clash:
                raise FwsvdError(f"{'/'.join(clash)} {'applies' if len(clash) == 1 else 'apply'} to one size, not to --any-size: drop {'it' if len(clash) == 1 else 'them'} (resize the folder to a --keep later)")
            return None
        if args.keep is None:
            raise FwsvdError("--keep is required: the fraction of the targeted layers' parameters that stays, e.g. --keep 0.5 (or pass --quantize)")
        return None
    clash = [f"--{name.replace('_', '-')}" for name, default in FACTORIZE_ONLY.items() if getattr(args, name) != default]
    if args.any_size:
        clash.append("--any-size")
    if clash:
        raise FwsvdError(f"{'/'.join(clash)} {'applies' if len(clash) == 1 else 'apply'} to factorization, not to --quantize {args.quantize}: drop {'it' if len(clash) == 1 else 'them'}, or drop --quantize")
    if args.correction_share is not None and (args.correction_rank is not None or args.budget_bytes is not None):
        raise FwsvdError("--correction-share, --correction-rank and --budget-bytes each size the correction: pass one of them")
    return QuantizeConfig(
        scheme=args.quantize, group_size=args.group_size, correction_rank=args.correction_rank, budget_bytes=args.budget_bytes,
        correction_share=DEFAULT_CORRECTION_SHARE if args.correction_share is None else args.correction_share,
    )


def _add_recovery_options(c: argparse.ArgumentParser) -> None:
    """The --finetune-* options: recovery fine-tuning after compression."""
    from ..training.finetune import DEFAULT_EPOCHS, DEFAULT_TOKENS, TRAINABLE, FinetuneConfig

    c.add_argument(
        "--finetune-data", default=None, metavar="TRAIN",
        help="after compressing, fine-tune on this data before saving (recovery; the factors train, ranks stay): labelled "
        f"training data for a classifier ({DEFAULT_EPOCHS['compressed']} epoch unless --finetune-epochs), a .txt file for a "
        f"causal LM ({DEFAULT_TOKENS:,} tokens of --max-length blocks unless --finetune-tokens/--finetune-epochs; the best "
        "state by the perplexity of held-out blocks is kept)",
    )
    c.add_argument("--finetune-epochs", type=positive_int, default=None, metavar="N", help="epochs of the recovery fine-tuning (needs --finetune-data)")
    c.add_argument("--finetune-tokens", type=positive_int, default=None, metavar="N", help=field_help(FinetuneConfig, "tokens"))
    c.add_argument("--finetune-lr", type=float, default=None, metavar="LR", help=field_help(FinetuneConfig, "lr"))
    c.add_argument("--finetune-batch-size", type=positive_int, default=None, metavar="N", help=field_help(FinetuneConfig, "batch_size"))
    c.add_argument("--finetune-limit", type=positive_int, default=None, metavar="N", help=field_help(FinetuneConfig, "limit"))
    c.add_argument(
        "--finetune-distill", action=argparse.BooleanOptionalAction, default=None,
        help=field_help(FinetuneConfig, "distill") + "; the dense model is kept in memory during the run",
    )
    c.add_argument("--finetune-train", choices=list(TRAINABLE), default=None, help=field_help(FinetuneConfig, "train"))


def build_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The :class:`~fwsvd.config.CompressConfig` and :class:`~fwsvd.config.CalibrationConfig` the options ask for."""
    from .. import api
    from ..config import DEFAULT_RANK_FLOOR

    config = api.CompressConfig(
        # --quantize keeps every layer, so keep does not apply there (the default only fills the field).
        method=args.method, keep=0.5 if args.keep is None else args.keep, include=tuple(args.include), exclude=tuple(args.exclude),
        fisher_reduction=args.fisher_reduction, fisher_whiten=args.fisher_whiten, asvd_alpha=args.asvd_alpha, damping=args.damping,
        allocation=args.allocation, rank_floor=DEFAULT_RANK_FLOOR if args.rank_floor is None else args.rank_floor, dense_above=args.dense_above,
        dense_choice=args.dense_choice, rank_multiple=args.rank_multiple, refit=args.refit,
        # With recovery fine-tuning, correction or int8 factors the model is cast last, before saving.
        dtype=None if args.finetune_data is not None or args.correct or args.quantize_factors else args.dtype,
    )
    # Without --data, a recovery run's labelled training file also serves as calibration data.
    calibration = api.CalibrationConfig(
        data=args.data if args.data is not None else args.finetune_data,
        samples=args.samples, cov_samples=args.cov_samples, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        text_column=args.text_column, pair_column=args.pair_column, label_column=args.label_column, low_memory=args.low_memory,
        # --sequential runs on the CPU only: auto takes the CPU for it.
        device="cpu" if args.device == "auto" and args.sequential else args.device,
        compute_dtype=args.calibration_dtype,
        fisher_labels=args.fisher_labels,
    )
    return config, calibration


def check_options(args: argparse.Namespace, config: Any, calibration: Any, ctx: Any) -> Path:
    """Refuse, before any work, options that clash or do nothing; return the output folder.

    ``ctx`` is the :class:`~fwsvd.calibration.distributed` context: only rank 0 checks the output paths (on
    other nodes of a torchrun job the output's folder need not exist).

    Raises:
        FwsvdError: one line saying which options to change.
    """
    from ..storage.atomic import check_output_file
    from ..storage.loading import TASKS

    out = Path(args.out).expanduser()
    if ctx.is_main:
        out = check_out(args, args.model, ("statistics file", args.stats), ("--save-stats target", args.save_stats),
                        ("data file", args.data), ("fine-tuning data", args.finetune_data))
    if ctx.active and args.sequential:
        raise FwsvdError("--sequential runs in one process: launch it without torchrun, or drop --sequential to calibrate on all processes")
    if ctx.active and args.finetune_data is not None:
        raise FwsvdError("--finetune-data runs in one process: compress under torchrun without it, then run fwsvd finetune on the output")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise FwsvdError(f"--checkpoint-every {args.checkpoint_every} must be a number of batches (0: no checkpoints)")
    if args.stats and args.save_stats:
        raise FwsvdError("--stats and --save-stats together make no sense: --stats reuses a file, --save-stats writes one")
    if args.fisher_labels != "data" and (args.stats or not any("fisher" in config.needs(task) for task in TASKS)):
        why = "--stats reuses statistics calibrated before" if args.stats else f"method {args.method} uses no Fisher"
        raise FwsvdError(f"--fisher-labels chooses the labels of a Fisher calibration, but {why}: drop --fisher-labels")
    if args.low_memory and args.quantize_factors:
        raise FwsvdError("--quantize-factors rounds the factors of the whole model before saving: drop --low-memory, or drop --quantize-factors")
    if args.low_memory and (args.sequential or args.stats or args.save_stats or args.finetune_data):
        raise FwsvdError("--low-memory never holds the whole model or all its statistics: drop --sequential/--stats/--save-stats/--finetune-data")
    if args.sequential and (args.stats or args.save_stats):
        raise FwsvdError("--sequential collects each block's statistics on the fly: drop --stats/--save-stats")
    if args.calibration_dtype != "float32" and (args.sequential or args.stats):
        raise FwsvdError(f"--calibration-dtype {args.calibration_dtype} applies to the one-pass and --low-memory calibrations: drop it with --sequential/--stats")
    if args.sequential and calibration.device != "cpu":
        raise FwsvdError(f"--sequential runs on the CPU only: pass --device cpu (or auto), not --device {args.device}")
    if args.correct and (args.low_memory or ctx.active):
        raise FwsvdError("--correct needs the whole compressed model in one process: drop --low-memory and torchrun, or run without --correct")
    if args.correct_steps is not None and not args.correct:
        raise FwsvdError(f"--correct-steps {args.correct_steps} sets how many steps --correct takes: add --correct, or drop it")
    if args.correct_steps is not None and args.correct_steps < 1:
        raise FwsvdError(f"--correct-steps {args.correct_steps} must be at least 1")
    if args.correct and calibration.data is None:
        raise FwsvdError("--correct takes its gradient on calibration text: pass --data TEXT.txt")
    if args.cov_samples is not None and (args.stats or args.sequential or not any("cov" in config.needs(task) for task in TASKS)):
        why = ("--stats reuses statistics calibrated before" if args.stats else "--sequential collects each block's covariance on the fly"
               if args.sequential else f"method {args.method} uses no input covariance")
        raise FwsvdError(f"--cov-samples sizes the input covariance of a one-pass calibration, but {why}: drop --cov-samples")
    if args.stats and not args.correct and args.dense_choice != "auto" and (args.data is not None or args.samples is not None):
        raise FwsvdError("--stats reuses saved statistics, so --data/--samples would be ignored: drop them, or drop --stats to recalibrate")
    if args.dense_choice == "auto" and (args.low_memory or args.sequential or args.any_size or ctx.active):
        raise FwsvdError(
            "--dense-choice auto scores whole compressed models on held-out text, which --low-memory, --sequential, --any-size and "
            "torchrun do not build: pass --dense-choice break-even or loss"
        )
    if args.rank_floor is not None and config.resolved_allocation() != "global":
        raise FwsvdError(f"--rank-floor applies to global allocation, but {args.method} allocates {config.resolved_allocation()}: drop --rank-floor or pass --allocation global")
    if args.refit and not args.sequential:
        raise FwsvdError("--refit refits layers inside sequential compression: add --sequential, or drop --refit")
    if (args.save_stats or args.stats) and not any(config.needs(task) for task in TASKS):
        option = "--save-stats" if args.save_stats else "--stats"
        raise FwsvdError(f"method {args.method} needs no calibration statistics, so {option} would do nothing: drop {option} or choose another --method")
    if args.save_stats and ctx.is_main:
        check_output_file(args.save_stats, args.overwrite, "--save-stats", protect=[*_inputs(args), ("output folder", out)])
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``fwsvd compress``: check the options, load, calibrate, factorize, optionally correct, fine-tune,
    quantize and cast, then save (rank 0 only); return the report as a dict."""
    from ..calibration import distributed
    from ..device import StageMemory, place, resolve_device

    quant = quantize_config(args)
    config, calibration = build_configs(args)
    ctx = distributed.current()
    out = check_options(args, config, calibration, ctx)
    recovery = recovery_config(args)
    stages = StageMemory(resolve_device(calibration.device))
    if quant is not None:
        with stages.stage("compress"):
            result = _run_quantized(args, config, calibration, quant, out, ctx)
        return {**result, "memory": stages.to_dict()}
    if args.any_size:
        with stages.stage("compress"):
            result = _run_any_size(args, config, calibration, out, ctx)
        return {**result, "memory": stages.to_dict()}
    if args.low_memory:
        from ..compression.lowmem import compress_low_memory, streamable

        if streamable(args.model):
            with stages.stage("compress (low memory)"):
                report, task = compress_low_memory(args.model, out, config, calibration, task=args.task, overwrite=args.overwrite, progress=not args.quiet)
            return {**report.to_dict(), **_dtype_result(args.dtype), "out": str(out), "task": task, "memory": stages.to_dict()}
        logging.getLogger("fwsvd").warning(
            "%s is not a folder of safetensors weights: its weights are loaded whole, calibration still runs one block at a time", args.model
        )
    with stages.stage("load"):
        loaded, statistics, teacher = _load(args, recovery)
        if not args.low_memory:
            place(loaded.model, stages.device)  # also without calibration (--stats, svd): factorization runs there
    needs = config.needs(loaded.task)
    checkpointing = _checkpointing(args, out)
    report = _factorize(args, loaded, config, calibration, needs, statistics, checkpointing, ctx, stages)
    corrected = None
    if args.correct:
        with stages.stage("correction"):
            corrected = _correct(args, loaded, calibration)
    finetuned = None
    if recovery is not None:
        from ..training.finetune import finetune

        with stages.stage("finetune"):
            finetuned = finetune(loaded, replace(recovery, device=calibration.device), progress=not args.quiet, teacher=teacher)
    del teacher
    with stages.stage("save"):
        _store_as(args, loaded, config)
        _save(args, loaded, out, checkpointing, ctx)
    result = report.to_dict()
    result["memory"] = stages.to_dict()
    result.update(_dtype_result(args.dtype, args.quantize_factors))
    allocation = getattr(getattr(loaded.model.config, "quantization_config", None), "allocation", None)
    if allocation:
        result["allocation"] = dict(allocation)
    if corrected is not None:
        result["correction"] = corrected
    if finetuned is not None:
        result["finetune"] = finetuned
    if args.stats:
        # No calibration ran in this command: its summary is that of the run which saved the file.
        result["statistics_file"] = str(args.stats)
        result["seconds_calibration"] = 0.0
    result["out"] = str(out)
    result["task"] = loaded.task
    return result


def _run_quantized(args: argparse.Namespace, config: Any, calibration: Any, quant: Any, out: Path, ctx: Any) -> dict[str, Any]:
    """--quantize: load, calibrate what the correction's method needs, quantize with a correction, save."""
    from ..compression.quantized import compress_quantized
    from ..device import place

    loaded, statistics, _ = _load(args, None)
    place(loaded.model, calibration.device)  # also without calibration (--stats): the grids and corrections are made there
    checkpointing = _checkpointing(args, out)
    statistics = _calibrate(args, loaded, config, calibration, config.needs(loaded.task), statistics, checkpointing, ctx)
    report = compress_quantized(loaded.model, config, quant, statistics, task=loaded.task, progress=not args.quiet)
    _save(args, loaded, out, checkpointing, ctx)
    result = report.to_dict()
    if args.stats:
        result["statistics_file"] = str(args.stats)
    return {**result, "out": str(out), "task": loaded.task}


def _run_any_size(args: argparse.Namespace, config: Any, calibration: Any, out: Path, ctx: Any) -> dict[str, Any]:
    """--any-size: load, calibrate what the method needs, keep every layer's whole decomposition, save."""
    from ..compression.any_size import compress_any_size
    from ..device import place

    loaded, statistics, _ = _load(args, None)
    place(loaded.model, calibration.device)  # also without calibration (--stats): the decompositions are made there
    checkpointing = _checkpointing(args, out)
    statistics = _calibrate(args, loaded, config, calibration, config.needs(loaded.task), statistics, checkpointing, ctx)
    summary = compress_any_size(loaded.model, config, statistics, task=loaded.task, progress=not args.quiet)
    _save(args, loaded, out, checkpointing, ctx)
    return {**summary, "any_size": True, "out": str(out), "task": loaded.task}


def _load(args: argparse.Namespace, recovery: Any) -> tuple[Any, Any, Any]:
    """The statistics of --stats (a bad file fails before the model loads), the model, and for distillation
    a copy of the dense model; refuses a compressed model and options that do not fit its task."""
    from .. import api
    from ..compression.factorize import refuse_compressed
    from ..storage.loading import load_model
    from ..training.finetune import DEFAULT_DISTILL

    statistics = api.load_statistics(args.stats) if args.stats else None
    loaded = load_model(args.model, args.task, allow_pickle=args.allow_pickle)
    refuse_compressed(loaded.model)
    if args.correct and loaded.task != "causal-lm":
        raise FwsvdError(f"--correct steps the next-token loss of causal LMs: {args.model} is a {loaded.task} model; drop --correct")
    teacher = None
    resolved_recovery = None if recovery is None else recovery.resolved(compressed=True, task=loaded.task)  # checked before any work
    if resolved_recovery is not None and (DEFAULT_DISTILL if resolved_recovery.distill is None else resolved_recovery.distill):
        import copy

        teacher = copy.deepcopy(loaded.model)  # the dense model, for distillation after compression
    return loaded, statistics, teacher


def _factorize(
    args: argparse.Namespace, loaded: Any, config: Any, calibration: Any, needs: frozenset[str], statistics: Any, checkpointing: Any, ctx: Any,
    stages: Any,
) -> Any:
    """Calibrate the statistics kinds ``needs`` (unless --stats gave them, or there are none) and factorize, each a stage of
    ``stages`` (:class:`fwsvd.device.StageMemory`); the report."""
    from .. import api

    if args.sequential:
        from ..compression.sequential import compress_sequential

        with stages.stage("sequential"):
            return compress_sequential(loaded, config, calibration, progress=not args.quiet)
    if statistics is None and needs:  # a stage only when a calibration runs (not with --stats, nor for svd)
        with stages.stage("calibration"):
            statistics = _calibrate(args, loaded, config, calibration, needs, statistics, checkpointing, ctx)
    heldout = None
    if config.dense_choice == "auto":
        heldout = _heldout(loaded, config, calibration, statistics)
    elif config.dense_choice is None and statistics is not None and args.stats is None and not ctx.active:
        # The default chooses on held-out text where this one-pass calibration had some; else break-even.
        try:
            heldout = _heldout(loaded, config, calibration, statistics)
        except FwsvdError as err:
            logging.getLogger("fwsvd").warning("the default dense choice falls back to break-even: %s", err)
    with stages.stage("factorization"):
        return api.compress(loaded.model, config, statistics, task=loaded.task, heldout=heldout, progress=not args.quiet)


def _heldout(loaded: Any, config: Any, calibration: Any, statistics: Any) -> Any:
    """--dense-choice auto: blocks of the calibration text that the statistics' draws (those of --stats's file, else
    this command's) did not take."""
    from ..compression.selection import heldout_blocks

    if loaded.task != "causal-lm" or config.resolved_allocation() != "global":
        return None  # compress() refuses auto here with its own line
    if calibration.data is None or loaded.tokenizer is None:
        raise FwsvdError("--dense-choice auto scores each allocation on held-out blocks of the calibration text: pass --data TEXT.txt")
    made = dict(statistics.summary) if statistics is not None else {}
    cal = calibration.resolved(loaded.task)
    samples, seed = made.get("samples", cal.samples), made.get("seed", cal.seed)
    length = made.get("max_length", cal.max_length)
    drawn = (samples, made.get("cov_samples", cal.cov_samples or samples))
    return heldout_blocks(loaded.tokenizer, calibration.data, int(length), int(seed), tuple(int(k) for k in drawn))


def _checkpointing(args: argparse.Namespace, out: Path) -> Any:
    """The calibration's checkpoints beside --save-stats (else --out), unless --checkpoint-every 0."""
    if args.checkpoint_every == 0:
        return None
    from ..calibration.resume import Checkpointing, checkpoint_base

    return Checkpointing(checkpoint_base(out, args.save_stats), every=args.checkpoint_every)


def _calibrate(
    args: argparse.Namespace, loaded: Any, config: Any, calibration: Any, needs: frozenset[str], statistics: Any, checkpointing: Any, ctx: Any,
) -> Any:
    """The statistics ``needs``: those of --stats when given, else one calibration (then --save-stats
    writes them, rank 0 only); ``None`` when the method needs none."""
    from .. import api

    if statistics is not None or not needs:
        return statistics
    statistics = api.calibrate(
        loaded, calibration, needs, include=config.include, exclude=config.exclude, progress=not args.quiet, checkpoint=checkpointing,
    )
    if args.save_stats and ctx.is_main:
        from ..storage.atomic import follow_umask

        statistics.save(args.save_stats)
        follow_umask(args.save_stats)
    return statistics


def _correct(args: argparse.Namespace, loaded: Any, calibration: Any) -> dict[str, Any]:
    """--correct: gradient steps of the next-token loss on the factors (one unless --correct-steps); its summary."""
    from ..compression.correction import correct_causal

    cal = calibration.resolved(loaded.task)
    assert cal.samples is not None and cal.max_length is not None
    assert calibration.data is not None
    return correct_causal(
        loaded, calibration.data, samples=cal.samples, max_length=cal.max_length, seed=cal.seed, rounds=args.correct_steps or 1,
        progress=not args.quiet,
    )


def _store_as(args: argparse.Namespace, loaded: Any, config: Any) -> None:
    """--quantize-factors and a --dtype cast left to the end (after correction or fine-tuning)."""
    from .. import api

    if args.quantize_factors:
        from ..storage.int8 import quantize_factors

        quantize_factors(loaded.model, args.quantize_factors)
    if args.dtype is not None and config.dtype is None:
        api.cast_weights(loaded.model, args.dtype)


def _save(args: argparse.Namespace, loaded: Any, out: Path, checkpointing: Any, ctx: Any) -> None:
    """Rank 0 writes the output and removes the checkpoints; every process waits for it, then drops its own."""
    from .. import api
    from ..calibration import distributed

    if ctx.is_main:
        try:
            api.save(loaded.model, out, loaded.tokenizer, overwrite=args.overwrite)
        except FwsvdError as err:
            # Another run wrote --out meanwhile: the calibration checkpoint stays, so that nothing is recalibrated.
            if checkpointing is not None and Path(checkpointing.base).is_file():
                raise FwsvdError(f"{err} (the calibration checkpoint {checkpointing.base} lets the same command resume without "
                                 "recalibrating; delete it if you will not)") from err
            raise
        if checkpointing is not None:
            from ..calibration.resume import remove_checkpoints

            remove_checkpoints(checkpointing.base)
    distributed.agree()  # the other processes wait here until rank 0 has written the output
    if checkpointing is not None:
        checkpointing.discard(ctx)  # on other nodes of a job, each process's own file


def _dtype_result(dtype: str | None, quantized: str | None = None) -> dict[str, str]:
    """What ``--dtype`` stored: every weight (``stored_dtype``), so the factors too (``factor_dtype``, its older name),
    unless ``--quantize-factors`` stored the factors (``quantized_factors``)."""
    result = {} if dtype is None else {"stored_dtype": dtype, "factor_dtype": dtype}
    return result if quantized is None else {**result, "quantized_factors": quantized, "factor_dtype": quantized}


def _inputs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """Every input of a compress run, which no output may be or lie in: the model (its folder, or its
    one .gguf file), the data files and the statistics file."""
    from ..storage.loading import model_source

    source, gguf = model_source(args.model)
    model: tuple[str, str | None]
    if gguf is not None:
        model = ("input model file", str(Path(source) / gguf))
    else:
        model = ("input model folder", source if Path(source).exists() else None)
    return [model, ("data file", args.data), ("statistics file", args.stats), ("fine-tuning data", args.finetune_data)]


RECOVERY_OPTIONS = ("epochs", "tokens", "lr", "batch_size", "limit", "distill", "train")


def recovery_config(args: argparse.Namespace) -> Any:
    """The fine-tuning asked for by compress's --finetune-* flags, or ``None``."""
    from ..training.finetune import FinetuneConfig

    if args.finetune_data is None:
        given = [f"--finetune-{name.replace('_', '-')}" for name in RECOVERY_OPTIONS if getattr(args, f"finetune_{name}") is not None]
        if given:
            raise FwsvdError(f"{'/'.join(given)} need --finetune-data TRAIN: the data to fine-tune on")
        return None
    return FinetuneConfig(
        data=args.finetune_data, epochs=args.finetune_epochs, tokens=args.finetune_tokens, lr=args.finetune_lr,
        batch_size=args.finetune_batch_size, limit=args.finetune_limit, distill=args.finetune_distill, train=args.finetune_train,
        max_length=args.max_length, seed=args.seed, text_column=args.text_column, pair_column=args.pair_column, label_column=args.label_column,
    )


def _statistics_text(report: dict[str, Any]) -> str:
    """Where a run's statistics came from: this run's calibration, or a --stats file (then no calibration ran
    now, and the summary is that of the run which saved it); empty for a method that needs none."""
    cal = report.get("calibration") or {}
    if report.get("statistics_file"):
        return f"statistics read from {report['statistics_file']} (saved by a calibration on {cal.get('samples')} samples, {cal.get('tokens')} tokens)"
    if cal:
        cov = f", covariance on {cal['cov_samples']}" if cal.get("cov_samples") else ""
        return f"calibration {cal.get('seconds', 0):.2f} s on {cal.get('samples')} samples ({cal.get('tokens')} tokens{cov})"
    return ""


def format_quantized(report: dict[str, Any]) -> str:
    """The human table of a --quantize run: per-layer grid, correction rank and bytes, then the totals."""
    rows = [
        [r["name"], f"{r['shape'][0]}x{r['shape'][1]}", r["group_size"], r["rank"], fmt_int(r["dense_bytes"]), fmt_int(r["weight_bytes"]), fmt_int(r["correction_bytes"])]
        for r in report["layers"]
    ]
    out = [table(["layer", "shape", "group", "correction rank", "dense bytes", "grid bytes", "correction bytes"], rows), ""]
    summary = [
        ["targeted layers", fmt_int(report["target_dense_bytes"]), fmt_int(report["quantized_bytes"] + report["correction_bytes"]),
         f"{(report['quantized_bytes'] + report['correction_bytes']) / report['target_dense_bytes']:.4f}"],
        ["whole model", fmt_int(report["dense_bytes"]), fmt_int(report["model_bytes"]), f"{report['model_fraction']:.4f}"],
    ]
    out.append(table(["", "bytes before", "bytes after", "kept"], summary))
    line = f"{report['scheme']} + {report['method']} correction ({fmt_int(report['correction_bytes'])} bytes, {report['correction_bytes'] / max(report['quantized_bytes'], 1):.3f} of the grid's); {report['seconds']:.2f} s"
    statistics = _statistics_text(report)
    out.append(line + (f"; {statistics}" if statistics else ""))
    if report.get("out"):
        out.append(f"saved to {report['out']}")
    if memory_line(report.get("memory")):
        out.append(memory_line(report.get("memory")))
    return "\n".join(out)


def format_result(report: dict[str, Any]) -> str:
    """The human table of a compress run: per-layer ranks, the targeted and whole-model figures, one line per stage."""
    if "scheme" in report:
        return format_quantized(report)
    if report.get("any_size"):
        return (f"{report['method']}: every decomposition of {report['layers']} layers kept in {report['seconds_factorize']:.2f} s; "
                f"resize with: fwsvd resize {report['out']} --keep K --out DIR") + (f"\n{memory_line(report.get('memory'))}" if report.get("memory") else "")
    rows = [
        [r["name"], f"{r['shape'][0]}x{r['shape'][1]}", r["rank"] if r["rank"] is not None else "dense", fmt_int(r["parameters_before"]), fmt_int(r["parameters_after"]), f"{r['seconds']:.3f}"]
        for r in report["layers"]
    ]
    out = [table(["layer", "shape", "rank", "params before", "params after", "seconds"], rows), ""]
    summary = [
        ["targeted layers", fmt_int(report["target_dense_parameters"]), fmt_int(report["target_parameters"]), f"{report['target_keep']:.4f}"],
        ["whole model", fmt_int(report["dense_parameters"]), fmt_int(report["parameters"]), f"{report['model_keep']:.4f}"],
    ]
    out.append(table(["", "params before", "params after", "kept"], summary))
    timing = f"method {report['method']}, keep {report['keep']:g}; factorization {report['seconds_factorize']:.2f} s"
    statistics = _statistics_text(report)
    out.append(timing + (f", {statistics}" if statistics else ""))
    chosen = (report.get("allocation") or {}).get("dense_choice_auto")
    if isinstance(chosen, dict):
        scores = ", ".join(f"{rule} {ppl:.2f}" for rule, ppl in (chosen.get("heldout_perplexity") or {}).items())
        out.append(f"dense choice {report['allocation'].get('dense_choice')}: "
                   + (f"held-out perplexity {scores} ({chosen.get('heldout_blocks')} blocks)" if scores else "both rules gave the same ranks"))
    if report.get("correction"):
        c = report["correction"]
        out.append(
            f"gradient correction on {c['blocks']} blocks of {c['data']}: step {c['step']:g}"
            + (" (none lowered the held-out loss)" if not c["step"] else "")
            + f", held-out perplexity {c['heldout_perplexity_before']:.2f} -> {c['heldout_perplexity_after']:.2f} ({c['heldout_blocks']} blocks); {c['seconds']:.1f} s"
        )
    if report.get("finetune"):
        out.append(finetune_line(report["finetune"]))
    if report.get("stored_dtype"):
        out.append(f"weights stored as {report['stored_dtype']}")
    if report.get("quantized_factors"):
        out.append(f"factors stored as {report['quantized_factors']} with one float32 scale per row")
    if report.get("out"):
        out.append(f"saved to {report['out']}")
    if report.get("memory"):
        out.append(memory_line(report["memory"]))
    return "\n".join(out)
