"""The ``fwsvd`` command line: a thin wrapper over :mod:`fwsvd.api`.

Human tables by default, one JSON object with ``--json``. A problem the user can fix prints one
line on stderr and exits with status 2; nothing already on disk is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from .version import __version__
from .errors import FwsvdError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        # "fwsvd: error:" for every command, like the errors raised while running one; under
        # torchrun every process meets the same error, and rank 0 alone prints it.
        from .calibration.distributed import env_rank

        self.exit(EXIT_USAGE, f"fwsvd: error: {message} (see {self.prog} --help)\n" if env_rank() == 0 else None)


def positive_int(text: str) -> int:
    """argparse type: a whole number ≥ 1 (``--batch-size 0`` is refused, not replaced by the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: pass a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def _help(cls: type, name: str) -> str:
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def _add_data_options(p: argparse.ArgumentParser, *, calibration: bool) -> None:
    from .config import CalibrationConfig

    p.add_argument("--max-length", type=positive_int, default=None, help=_help(CalibrationConfig, "max_length"))
    p.add_argument("--batch-size", type=positive_int, default=None, help="batch size: memory and speed only (calibration 16 rows or 4 causal-LM blocks, 1 with --low-memory; evaluation 32)")
    for name in ("text_column", "pair_column", "label_column"):
        p.add_argument("--" + name.replace("_", "-"), default=None, help=_help(CalibrationConfig, name))
    if calibration:
        p.add_argument("--samples", type=positive_int, default=None, help=_help(CalibrationConfig, "samples"))
        p.add_argument("--seed", type=int, default=0, help=_help(CalibrationConfig, "seed"))


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-pickle", action="store_true",
        help="accept a model folder whose weights are pickles (pytorch_model.bin; read with weights_only=True). "
        "Pickles can run code: use only for folders you trust",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log messages")


def build_parser() -> argparse.ArgumentParser:
    from .config import ALLOCATIONS, DEFAULT_ALLOCATION, DEFAULT_RANK_FLOOR, STORAGE_DTYPES, CompressConfig
    from .storage.int8 import QUANTIZED_FORMATS
    from .methods import METHODS
    from .storage.loading import TASKS

    parser = _Parser(prog="fwsvd", description="Low-rank compression of Hugging Face transformers (FWSVD, ASVD, SVD-LLM).")
    parser.add_argument("--version", action="version", version=f"fwsvd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="factorize a model's linear layers and save it", description="Factorize a model's linear layers and save it as a Hugging Face folder.")
    c.add_argument("model", metavar="MODEL", help="model folder (config.json + safetensors, or one .gguf) or hub id")
    c.add_argument("--out", required=True, help="output folder (written atomically)")
    c.add_argument("--method", choices=list(METHODS), default="fwsvd", help=_help(CompressConfig, "method"))
    c.add_argument("--keep", type=float, required=True, help=_help(CompressConfig, "keep"))
    c.add_argument("--data", default=None, help="calibration data: .tsv/.csv/.jsonl with labels, .txt for causal LMs, or a datasets hub name (default: --finetune-data when given)")
    _add_data_options(c, calibration=True)
    c.add_argument("--include", action="append", default=[], metavar="PATTERN", help=_help(CompressConfig, "include"))
    c.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help=_help(CompressConfig, "exclude"))
    c.add_argument("--fisher-reduction", choices=["auto", "out", "in", "both"], default="auto", help=_help(CompressConfig, "fisher_reduction"))
    c.add_argument("--fisher-whiten", choices=["auto", "on", "off"], default="auto", help=_help(CompressConfig, "fisher_whiten"))
    c.add_argument("--allocation", choices=list(ALLOCATIONS), default=DEFAULT_ALLOCATION, help=_help(CompressConfig, "allocation"))
    c.add_argument("--rank-floor", type=float, default=None, help=_help(CompressConfig, "rank_floor") + f" (default {DEFAULT_RANK_FLOOR:g})")
    c.add_argument("--dense-above", type=float, default=1.0, metavar="FRACTION", help=_help(CompressConfig, "dense_above"))
    c.add_argument("--rank-multiple", type=int, default=1, metavar="N", help=_help(CompressConfig, "rank_multiple"))
    c.add_argument("--asvd-alpha", type=float, default=0.5, help=_help(CompressConfig, "asvd_alpha"))
    c.add_argument("--damping", type=float, default=0.01, help=_help(CompressConfig, "damping"))
    c.add_argument("--dtype", choices=list(STORAGE_DTYPES), default=None, help=_help(CompressConfig, "dtype"))
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
    c.add_argument("--refit", action=argparse.BooleanOptionalAction, default=False, help="with --sequential: " + _help(CompressConfig, "refit"))
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    _add_compress_finetune_options(c)
    _add_output_options(c)

    e = sub.add_parser("eval", help="task metric (accuracy, F1, MCC, correlation) or perplexity", description="Evaluate a dense or compressed model.")
    e.add_argument("model", metavar="MODEL", help="model folder or hub id")
    e.add_argument(
        "--data", action="append", default=None, metavar="FILE",
        help="labelled .tsv/.csv/.jsonl, or .txt for causal-LM perplexity; several files comma-separated or repeated (results keyed by file name)",
    )
    e.add_argument(
        "--tasks", action="append", default=None, metavar="TASK[,TASK...]",
        help="zero-shot tasks of a causal LM, scored as lm-evaluation-harness does: piqa, arc_easy, winogrande, "
        "lambada_openai (read from --task-data DIR) or paths of .jsonl files (query/choices/gold, "
        "context_options/continuation/gold, or context/continuation)",
    )
    e.add_argument("--task-data", default=None, metavar="DIR", help="folder holding <name>.jsonl for the task names in --tasks")
    e.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N rows (N blocks of text; N examples of each zero-shot task)")
    e.add_argument("--task", choices=list(TASKS), default=None, help="model task (detected when omitted)")
    _add_data_options(e, calibration=False)
    _add_output_options(e)

    i = sub.add_parser("inspect", help="parameters, kept fraction and ranks of a model", description="Show a model's parameters and ranks.")
    i.add_argument("model", metavar="MODEL", help="model folder or hub id")
    i.add_argument("--task", choices=list(TASKS), default=None, help="model task (detected when omitted)")
    _add_output_options(i)
    _add_finetune_parser(sub)
    return parser


def _add_compress_finetune_options(c: argparse.ArgumentParser) -> None:
    from .training.finetune import DEFAULT_EPOCHS, DEFAULT_TOKENS, TRAINABLE, FinetuneConfig

    c.add_argument(
        "--finetune-data", default=None, metavar="TRAIN",
        help="after compressing, fine-tune on this data before saving (recovery; the factors train, ranks stay): labelled "
        f"training data for a classifier ({DEFAULT_EPOCHS['compressed']} epoch unless --finetune-epochs), a .txt file for a "
        f"causal LM ({DEFAULT_TOKENS:,} tokens of --max-length blocks unless --finetune-tokens/--finetune-epochs; the best "
        "state by the perplexity of held-out blocks is kept)",
    )
    c.add_argument("--finetune-epochs", type=positive_int, default=None, metavar="N", help="epochs of the recovery fine-tuning (needs --finetune-data)")
    c.add_argument("--finetune-tokens", type=positive_int, default=None, metavar="N", help=_help(FinetuneConfig, "tokens"))
    c.add_argument("--finetune-lr", type=float, default=None, metavar="LR", help=_help(FinetuneConfig, "lr"))
    c.add_argument("--finetune-batch-size", type=positive_int, default=None, metavar="N", help=_help(FinetuneConfig, "batch_size"))
    c.add_argument("--finetune-limit", type=positive_int, default=None, metavar="N", help=_help(FinetuneConfig, "limit"))
    c.add_argument(
        "--finetune-distill", action=argparse.BooleanOptionalAction, default=None,
        help=_help(FinetuneConfig, "distill") + "; the dense model is kept in memory during the run",
    )
    c.add_argument("--finetune-train", choices=list(TRAINABLE), default=None, help=_help(FinetuneConfig, "train"))


def _add_finetune_parser(sub: Any) -> None:
    from .training.finetune import TRAINABLE, FinetuneConfig

    f = sub.add_parser(
        "finetune", help="fine-tune a classifier or causal LM (dense or compressed), or add a head to a pretrained encoder",
        description="Fine-tune a sequence classifier on labelled data, or a causal LM on a text file, and save it. A pretrained "
        "encoder without a task head gets one (classes counted from the labels; one output for a regression task such as "
        "STS-B). A compressed model keeps its ranks and trains its low-rank factors; a causal LM keeps the state with the "
        "best perplexity on held-out blocks of its text.",
    )
    f.add_argument("model", metavar="MODEL", help="model folder: a classifier or causal LM (dense or compressed), or a pretrained encoder")
    f.add_argument("--data", required=True, metavar="TRAIN", help=_help(FinetuneConfig, "data"))
    f.add_argument("--out", required=True, help="output folder (written atomically)")
    f.add_argument("--eval-data", default=None, metavar="DEV", help="labelled data scored after each epoch; the best epoch by the headline metric is saved (else the last)")
    f.add_argument("--epochs", type=positive_int, default=None, help=_help(FinetuneConfig, "epochs"))
    f.add_argument("--tokens", type=positive_int, default=None, help=_help(FinetuneConfig, "tokens"))
    f.add_argument("--lr", type=float, default=None, help=_help(FinetuneConfig, "lr"))
    f.add_argument("--batch-size", type=positive_int, default=None, help=_help(FinetuneConfig, "batch_size"))
    f.add_argument("--max-length", type=positive_int, default=None, help=_help(FinetuneConfig, "max_length"))
    f.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None, help=_help(FinetuneConfig, "distill") + " (--teacher)")
    f.add_argument("--teacher", default=None, metavar="DENSE", help="causal LMs: the dense model folder to distil from (distillation is then on)")
    f.add_argument("--train", choices=list(TRAINABLE), default=None, help=_help(FinetuneConfig, "train"))
    f.add_argument("--seed", type=int, default=0, help=_help(FinetuneConfig, "seed"))
    f.add_argument("--limit", type=positive_int, default=None, help=_help(FinetuneConfig, "limit"))
    f.add_argument("--warmup", type=float, default=0.1, help=_help(FinetuneConfig, "warmup"))
    for name in ("text_column", "pair_column", "label_column"):
        f.add_argument("--" + name.replace("_", "-"), default=None, help=_help(FinetuneConfig, name))
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    _add_output_options(f)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    import transformers

    # transformers' own load-time chatter (unused weights, tied keys) is noise for this tool.
    transformers.logging.set_verbosity_error()
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        transformers.logging.disable_progress_bar()
        disable_progress_bars()


def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_compression(report: dict[str, Any]) -> str:
    rows = [
        [r["name"], f"{r['shape'][0]}x{r['shape'][1]}", r["rank"] if r["rank"] is not None else "dense", _fmt_int(r["parameters_before"]), _fmt_int(r["parameters_after"]), f"{r['seconds']:.3f}"]
        for r in report["layers"]
    ]
    out = [_table(["layer", "shape", "rank", "params before", "params after", "seconds"], rows), ""]
    summary = [
        ["targeted layers", _fmt_int(report["target_dense_parameters"]), _fmt_int(report["target_parameters"]), f"{report['target_keep']:.4f}"],
        ["whole model", _fmt_int(report["dense_parameters"]), _fmt_int(report["parameters"]), f"{report['model_keep']:.4f}"],
    ]
    out.append(_table(["", "params before", "params after", "kept"], summary))
    cal = report.get("calibration") or {}
    timing = f"method {report['method']}, keep {report['keep']:g}; factorization {report['seconds_factorize']:.2f} s"
    if report.get("statistics_file"):
        # No calibration ran: the summary is that of the run which saved the file.
        timing += f", statistics read from {report['statistics_file']} (saved by a calibration on {cal.get('samples')} samples, {cal.get('tokens')} tokens)"
    elif cal:
        timing += f", calibration {cal.get('seconds', 0):.2f} s on {cal.get('samples')} samples ({cal.get('tokens')} tokens)"
    out.append(timing)
    if report.get("correction"):
        c = report["correction"]
        out.append(
            f"gradient correction on {c['blocks']} blocks of {c['data']}: step {c['step']:g}"
            + (" (none lowered the held-out loss)" if not c["step"] else "")
            + f", held-out perplexity {c['heldout_perplexity_before']:.2f} -> {c['heldout_perplexity_after']:.2f} ({c['heldout_blocks']} blocks); {c['seconds']:.1f} s"
        )
    if report.get("finetune"):
        out.append(_finetune_line(report["finetune"]))
    if report.get("stored_dtype"):
        out.append(f"weights stored as {report['stored_dtype']}")
    if report.get("quantized_factors"):
        out.append(f"factors stored as {report['quantized_factors']} with one float32 scale per row")
    if report.get("out"):
        out.append(f"saved to {report['out']}")
    return "\n".join(out)


def cmd_compress(args: argparse.Namespace) -> dict[str, Any]:
    from . import api
    from .compression.factorize import refuse_compressed
    from .config import DEFAULT_RANK_FLOOR
    from .storage.loading import load_model

    config = api.CompressConfig(
        method=args.method, keep=args.keep, include=tuple(args.include), exclude=tuple(args.exclude),
        fisher_reduction=args.fisher_reduction, fisher_whiten=args.fisher_whiten, asvd_alpha=args.asvd_alpha, damping=args.damping,
        allocation=args.allocation, rank_floor=DEFAULT_RANK_FLOOR if args.rank_floor is None else args.rank_floor, dense_above=args.dense_above,
        rank_multiple=args.rank_multiple, refit=args.refit,
        # With recovery fine-tuning, correction or int8 factors the model is cast last, before saving.
        dtype=None if args.finetune_data is not None or args.correct or args.quantize_factors else args.dtype,
    )
    # Without --data, a recovery run's labelled training file also serves as calibration data.
    calibration = api.CalibrationConfig(
        data=args.data if args.data is not None else args.finetune_data,
        samples=args.samples, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        text_column=args.text_column, pair_column=args.pair_column, label_column=args.label_column, low_memory=args.low_memory,
    )
    from .calibration import distributed

    ctx = distributed.current()
    # Only rank 0 writes: on other nodes of a torchrun job the output's folder need not exist.
    out = Path(args.out).expanduser()
    if ctx.is_main:
        out = _check_out(args, args.model, ("statistics file", args.stats), ("--save-stats target", args.save_stats),
                         ("data file", args.data), ("fine-tuning data", args.finetune_data))
    from .storage.atomic import check_output_file
    from .storage.loading import TASKS
    if ctx.active and args.sequential:
        raise FwsvdError("--sequential runs in one process: launch it without torchrun, or drop --sequential to calibrate on all processes")
    if ctx.active and args.finetune_data is not None:
        raise FwsvdError("--finetune-data runs in one process: compress under torchrun without it, then run fwsvd finetune on the output")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise FwsvdError(f"--checkpoint-every {args.checkpoint_every} must be a number of batches (0: no checkpoints)")
    if args.stats and args.save_stats:
        raise FwsvdError("--stats and --save-stats together make no sense: --stats reuses a file, --save-stats writes one")
    if args.low_memory and args.quantize_factors:
        raise FwsvdError("--quantize-factors rounds the factors of the whole model before saving: drop --low-memory, or drop --quantize-factors")
    if args.low_memory and (args.sequential or args.stats or args.save_stats or args.finetune_data):
        raise FwsvdError("--low-memory never holds the whole model or all its statistics: drop --sequential/--stats/--save-stats/--finetune-data")
    if args.sequential and (args.stats or args.save_stats):
        raise FwsvdError("--sequential collects each block's statistics on the fly: drop --stats/--save-stats")
    if args.correct and (args.low_memory or ctx.active):
        raise FwsvdError("--correct needs the whole compressed model in one process: drop --low-memory and torchrun, or run without --correct")
    if args.correct and calibration.data is None:
        raise FwsvdError("--correct takes its gradient on calibration text: pass --data TEXT.txt")
    if args.stats and not args.correct and (args.data is not None or args.samples is not None):
        raise FwsvdError("--stats reuses saved statistics, so --data/--samples would be ignored: drop them, or drop --stats to recalibrate")
    if args.rank_floor is not None and config.resolved_allocation() != "global":
        raise FwsvdError(f"--rank-floor applies to global allocation, but {args.method} allocates {config.resolved_allocation()}: drop --rank-floor or pass --allocation global")
    if args.refit and not args.sequential:
        raise FwsvdError("--refit refits layers inside sequential compression: add --sequential, or drop --refit")
    if (args.save_stats or args.stats) and not any(config.needs(task) for task in TASKS):
        option = "--save-stats" if args.save_stats else "--stats"
        raise FwsvdError(f"method {args.method} needs no calibration statistics, so {option} would do nothing: drop {option} or choose another --method")
    if args.save_stats and ctx.is_main:
        check_output_file(args.save_stats, args.overwrite, "--save-stats", protect=[*_inputs(args), ("output folder", out)])
    recovery = _recovery_config(args)
    if args.low_memory:
        from .compression.lowmem import compress_low_memory, streamable

        if streamable(args.model):
            report, task = compress_low_memory(args.model, out, config, calibration, task=args.task, overwrite=args.overwrite, progress=not args.quiet)
            return {**report.to_dict(), **_dtype_result(args.dtype), "out": str(out), "task": task}
        logging.getLogger("fwsvd").warning(
            "%s is not a folder of safetensors weights: its weights are loaded whole, calibration still runs one block at a time", args.model
        )
    statistics = api.load_statistics(args.stats) if args.stats else None  # a bad file fails before the model loads
    loaded = load_model(args.model, args.task, allow_pickle=args.allow_pickle)
    refuse_compressed(loaded.model)
    if args.correct and loaded.task != "causal-lm":
        raise FwsvdError(f"--correct steps the next-token loss of causal LMs: {args.model} is a {loaded.task} model; drop --correct")
    teacher = None
    from .training.finetune import DEFAULT_DISTILL

    resolved_recovery = None if recovery is None else recovery.resolved(compressed=True, task=loaded.task)  # checked before any work
    if resolved_recovery is not None and (DEFAULT_DISTILL if resolved_recovery.distill is None else resolved_recovery.distill):
        import copy

        teacher = copy.deepcopy(loaded.model)  # the dense model, for distillation after compression
    needs = config.needs(loaded.task)
    checkpointing = None
    if args.checkpoint_every != 0:
        from .calibration.resume import Checkpointing, checkpoint_base

        checkpointing = Checkpointing(checkpoint_base(out, args.save_stats), every=args.checkpoint_every)
    if args.sequential:
        from .compression.sequential import compress_sequential

        report = compress_sequential(loaded, config, calibration, progress=not args.quiet)
    else:
        if statistics is None and needs:
            statistics = api.calibrate(
                loaded, calibration, needs, include=config.include, exclude=config.exclude, progress=not args.quiet, checkpoint=checkpointing,
            )
            if args.save_stats and ctx.is_main:
                from .storage.atomic import follow_umask

                statistics.save(args.save_stats)
                follow_umask(args.save_stats)
        report = api.compress(loaded.model, config, statistics, task=loaded.task, progress=not args.quiet)
    corrected = None
    if args.correct:
        from .compression.correction import correct_causal

        cal = calibration.resolved(loaded.task)
        assert cal.samples is not None and cal.max_length is not None
        assert calibration.data is not None
        corrected = correct_causal(loaded, calibration.data, samples=cal.samples, max_length=cal.max_length, seed=cal.seed, progress=not args.quiet)
    finetuned = None
    if recovery is not None:
        from .training.finetune import finetune

        finetuned = finetune(loaded, recovery, progress=not args.quiet, teacher=teacher)
        del teacher
    if args.quantize_factors:
        from .storage.int8 import quantize_factors

        quantize_factors(loaded.model, args.quantize_factors)
    if args.dtype is not None and config.dtype is None:
        api.cast_weights(loaded.model, args.dtype)
    if ctx.is_main:
        api.save(loaded.model, out, loaded.tokenizer, overwrite=args.overwrite)
        if checkpointing is not None:
            from .calibration.resume import remove_checkpoints

            remove_checkpoints(checkpointing.base)
    distributed.agree()  # the other processes wait here until rank 0 has written the output
    if checkpointing is not None:
        checkpointing.discard(ctx)  # on other nodes of a job, each process's own file
    result = report.to_dict()
    result.update(_dtype_result(args.dtype, args.quantize_factors))
    if corrected is not None:
        result["correction"] = corrected
    if finetuned is not None:
        result["finetune"] = finetuned
    if args.stats:
        result["statistics_file"] = str(args.stats)
    result["out"] = str(out)
    result["task"] = loaded.task
    return result


def _dtype_result(dtype: str | None, quantized: str | None = None) -> dict[str, str]:
    """What ``--dtype`` stored: every weight (``stored_dtype``), so the factors too (``factor_dtype``, its older name),
    unless ``--quantize-factors`` stored the factors (``quantized_factors``)."""
    result = {} if dtype is None else {"stored_dtype": dtype, "factor_dtype": dtype}
    return result if quantized is None else {**result, "quantized_factors": quantized, "factor_dtype": quantized}


def _check_out(args: argparse.Namespace, model: str, *inputs: tuple[str, str | None]) -> Path:
    """Check ``--out`` before any work: it may not be, or hold, the input model or an input file.

    Raises:
        FwsvdError: see :func:`fwsvd.storage.atomic.check_output_dir`.
    """
    from .storage.atomic import check_output_dir, refuse_busy_output
    from .storage.loading import model_source

    source, _ = model_source(model)
    local = source if Path(source).exists() else None
    out = check_output_dir(args.out, args.overwrite, protect=[("input model folder", local), *inputs])
    refuse_busy_output(out, args.overwrite)
    return out


def _inputs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """Every input of a compress run, which no output may be or lie in: the model (its folder, or its
    one .gguf file), the data files and the statistics file."""
    from .storage.loading import model_source

    source, gguf = model_source(args.model)
    model: tuple[str, str | None]
    if gguf is not None:
        model = ("input model file", str(Path(source) / gguf))
    else:
        model = ("input model folder", source if Path(source).exists() else None)
    return [model, ("data file", args.data), ("statistics file", args.stats), ("fine-tuning data", args.finetune_data)]


_RECOVERY_OPTIONS = ("epochs", "tokens", "lr", "batch_size", "limit", "distill", "train")


def _recovery_config(args: argparse.Namespace) -> Any:
    """The fine-tuning asked for by compress's --finetune-* flags, or ``None``."""
    from .training.finetune import FinetuneConfig

    if args.finetune_data is None:
        given = [f"--finetune-{name.replace('_', '-')}" for name in _RECOVERY_OPTIONS if getattr(args, f"finetune_{name}") is not None]
        if given:
            raise FwsvdError(f"{'/'.join(given)} need --finetune-data TRAIN: the data to fine-tune on")
        return None
    return FinetuneConfig(
        data=args.finetune_data, epochs=args.finetune_epochs, tokens=args.finetune_tokens, lr=args.finetune_lr,
        batch_size=args.finetune_batch_size, limit=args.finetune_limit, distill=args.finetune_distill, train=args.finetune_train,
        max_length=args.max_length, seed=args.seed, text_column=args.text_column, pair_column=args.pair_column, label_column=args.label_column,
    )


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from . import api
    from .evaluation.evaluate import EvalConfig
    from .training.finetune import FinetuneConfig, finetune, load_for_finetune

    config = FinetuneConfig(
        data=args.data, epochs=args.epochs, tokens=args.tokens, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
        seed=args.seed, limit=args.limit, warmup=args.warmup, train=args.train,
        # --teacher names the model to distil from, so it turns distillation on unless --no-distill says otherwise.
        distill=args.distill if args.distill is not None else (True if args.teacher is not None else None),
        text_column=args.text_column, pair_column=args.pair_column, label_column=args.label_column,
    )
    out = _check_out(args, args.model, ("training data", args.data), ("evaluation data", args.eval_data), ("teacher model", args.teacher))
    eval_config = None
    if args.eval_data is not None:
        eval_config = EvalConfig(
            data=args.eval_data, batch_size=max(args.batch_size or 32, 32), max_length=args.max_length,
            text_column=args.text_column, pair_column=args.pair_column, label_column=args.label_column,
        )
    loaded = load_for_finetune(args.model, config, allow_pickle=args.allow_pickle)
    resolved = config.resolved(compressed=True, task=loaded.task)  # settings checked before any work
    if args.teacher is not None and resolved.distill is False:
        raise FwsvdError("--teacher is the model to distil from: drop --no-distill, or drop --teacher")
    if resolved.distill and args.teacher is None:
        raise FwsvdError("--distill needs the dense model: pass --teacher DENSE_FOLDER")
    teacher = None
    if args.teacher is not None:
        from .storage.loading import load_model

        teacher = load_model(args.teacher, "causal-lm", allow_pickle=args.allow_pickle).model
    result = finetune(loaded, config, eval_config=eval_config, progress=not args.quiet, teacher=teacher)
    api.save(loaded.model, out, loaded.tokenizer, overwrite=args.overwrite)
    result["out"] = str(out)
    result["task"] = loaded.task
    result["parameters"] = api.count_parameters(loaded.model)
    return result


def _finetune_line(summary: dict[str, Any]) -> str:
    if summary.get("task") == "causal-lm":
        history = [h for h in summary["history"] if h["loss"] is not None]
        losses = f"{history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}" if history else "-"
        ppl = lambda v: "inf" if v is None else f"{v:.2f}"  # noqa: E731
        return (
            f"recovered on {summary['tokens']:,} tokens ({summary['steps']} steps of {summary['batch_size']} x {summary['max_length']}) "
            f"of {summary['data']} (lr {summary['lr']:g}, {summary['train']} trains{', distilled' if summary['distill'] else ''}): "
            f"training loss {losses}; held-out perplexity {ppl(summary['initial_perplexity'])} -> {summary['eval']['perplexity']:.2f} "
            f"(step {summary['best_step']} kept, {summary['heldout_blocks']} blocks); {summary['seconds']:.1f} s wall, {summary['cpu_seconds']:.1f} s CPU"
            + (f"; stopped early: {summary['stopped']}" if summary.get("stopped") else "")
        )
    losses = " -> ".join(f"{h['loss']:.4f}" for h in summary["history"])
    return (
        f"fine-tuned {summary['epochs']} epoch(s) on {summary['rows']} rows of {summary['data']} "
        f"(lr {summary['lr']:g}, batch {summary['batch_size']}): mean training loss {losses}; {summary['seconds']:.1f} s"
    )


def format_finetune(result: dict[str, Any]) -> str:
    if result.get("task") == "causal-lm":
        rows = [
            [h["step"], _fmt_int(h["tokens"]), "-" if h["loss"] is None else f"{h['loss']:.4f}",
             ("inf" if h["perplexity"] is None else f"{h['perplexity']:.3f}") + (" *" if h["step"] == result["best_step"] else "")]
            for h in result["history"]
        ]
        return "\n".join([
            _table(["step", "tokens", "train loss", "held-out perplexity"], rows), "", _finetune_line(result),
            f"kept step {result['best_step']} (* best held-out perplexity)",
            f"{'compressed' if result['compressed'] else 'dense'} model, {_fmt_int(result['parameters'])} parameters; saved to {result['out']}",
        ])
    metric = result.get("metric")
    rows = []
    for h in result["history"]:
        row = [h["epoch"], f"{h['loss']:.4f}"]
        if metric:
            value = h["eval"][h["eval"]["metric"]]
            row.append(f"{value:.4f}" + (" *" if h["epoch"] == result["best_epoch"] else ""))
        row.append(f"{h['seconds']:.1f}")
        rows.append(row)
    headers = ["epoch", "train loss"] + ([f"{metric} ({result['eval_data']})"] if metric else []) + ["seconds"]
    lines = [_table(headers, rows), "", _finetune_line(result)]
    if metric:
        lines.append(f"kept epoch {result['best_epoch']} (* best {metric})")
    lines.append(f"{'compressed' if result['compressed'] else 'dense'} model, {_fmt_int(result['parameters'])} parameters; saved to {result['out']}")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from .errors import ModelError
    from .evaluation.evaluate import EvalConfig, check_result_names, evaluate, evaluate_files, merge_named, split_list
    from .storage.loading import load_model
    from .evaluation.zeroshot import evaluate_zeroshot, resolve_tasks, unique_names

    files, task_specs = split_list(args.data), split_list(args.tasks)
    if not files and not task_specs:
        raise FwsvdError("nothing to evaluate: pass --data FILE (task metric or perplexity) and/or --tasks piqa,arc_easy,... --task-data DIR (zero-shot)")
    if args.task_data is not None and not task_specs:
        raise FwsvdError("--task-data is the folder of the --tasks files: add --tasks NAME[,NAME...]")
    # Task files are read and checked before the model loads, so a typo fails at once.
    tasks = resolve_tasks(task_specs, args.task_data, limit=args.limit) if task_specs else []
    check_result_names([*(unique_names(files, "data file") if len(files) > 1 else []), *(t.name for t in tasks)])
    loaded = load_model(args.model, args.task, need_tokenizer=True, allow_pickle=args.allow_pickle)
    if tasks and loaded.task != "causal-lm":
        raise ModelError(f"--tasks scores causal language models; {args.model} is a {loaded.task} model: evaluate it with --data")
    config = EvalConfig(
        data=files[0] if files else "", limit=args.limit, batch_size=args.batch_size or 32, max_length=args.max_length,
        text_column=args.text_column, pair_column=args.pair_column, label_column=args.label_column,
    )
    result: dict[str, Any] = {}
    if len(files) == 1:
        result = evaluate(loaded, config, progress=not args.quiet)
    elif files:
        result = merge_named(result, evaluate_files(loaded, config, files, progress=not args.quiet), "data")
    if tasks:
        scores = evaluate_zeroshot(loaded.model, loaded.tokenizer, tasks, batch_size=args.batch_size or 32, progress=not args.quiet)
        result = merge_named(result, scores, "tasks")
    result["task"] = loaded.task
    return result


def format_eval(result: dict[str, Any]) -> str:
    parts = []
    if "metric" in result:  # one --data file: its metrics at the top level
        parts.append(_metric_table(result))
    if result.get("data"):
        rows = [[name, result[name]["metric"], f"{result[name][result[name]['metric']]:.4f}", result[name]["n"]] for name in result["data"]]
        parts.append(_table(["data", "metric", "value", "n"], rows))
    if result.get("tasks"):
        def cell(scores: dict[str, Any], key: str) -> str:
            return f"{scores[key]:.4f}" if key in scores else "-"

        rows = [[name, *(cell(result[name], k) for k in ("acc", "acc_norm", "perplexity")), result[name]["n"]] for name in result["tasks"]]
        parts.append(_table(["task", "acc", "acc_norm", "perplexity", "n"], rows))
    if (result.get("data") or result.get("tasks")) and "wall_seconds" in result:
        parts[-1] += f"\n({result['wall_seconds']:.1f} s in all)"
    return "\n\n".join(parts)


def _metric_table(result: dict[str, Any]) -> str:
    keys = [k for k in ("accuracy", "f1", "mcc", "pearson", "spearman", "mse", "perplexity", "nll") if k in result]
    rows = [[k + (" *" if k == result.get("metric") else ""), f"{result[k]:.4f}"] for k in keys]
    rows.append(["n", str(result["n"])])
    return _table(["metric", "value"], rows) + f"\n(* headline metric; {result['seconds']:.1f} s)"


def cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    from . import api
    from .storage.loading import load_model

    loaded = load_model(args.model, args.task, allow_pickle=args.allow_pickle)
    result = api.inspect(loaded.model)
    result["task"] = loaded.task
    return result


def format_inspect(result: dict[str, Any]) -> str:
    lines = [
        f"task              {result['task']}",
        f"compressed        {result['compressed']}" + (f" ({result['method']}, fwsvd {result['library_version']})" if result["compressed"] else ""),
        f"parameters        {_fmt_int(result['parameters'])}",
        f"dense parameters  {_fmt_int(result['dense_parameters'])}",
        f"model keep        {result['model_keep']:.4f}",
        f"target keep       {result['target_keep']:.4f}",
    ]
    if result.get("allocation"):
        alloc = result["allocation"]
        # Values from a config file anyone may have written: shown only when they are numbers.
        number = lambda key: isinstance(alloc.get(key), (int, float)) and not isinstance(alloc.get(key), bool)  # noqa: E731
        rules = [f"rank floor {alloc['rank_floor']:g}"] if number("rank_floor") else []
        if number("dense_above"):
            rules.append(f"dense above {alloc['dense_above']:g} of break-even")
        if number("rank_multiple"):
            rules.append(f"ranks in multiples of {alloc['rank_multiple']:g}")
        lines.append(f"allocation        {alloc.get('mode')}" + (f" ({', '.join(rules)})" if rules else ""))
    correction = result.get("correction")
    if isinstance(correction, dict) and isinstance(correction.get("step"), (int, float)) and not isinstance(correction.get("step"), bool):
        lines.append(f"correction        one gradient step of {correction['step']:g} per factor entry" + (" (none taken)" if not correction["step"] else ""))
    if result.get("quantized_factors"):
        lines.append(f"factors stored as {result['quantized_factors']} (one float32 scale per row), computing in {result.get('dtype') or 'float32'}")
    if result.get("stored_dtype"):
        lines.append(f"weights stored as {result['stored_dtype']}" + (f", computing in {result['dtype']}" if result.get("dtype") else ""))
    elif result.get("factor_dtype"):
        lines.append(f"factors stored as {result['factor_dtype']} (other weights in the model's dtype)")
    if result.get("rank_table"):
        # One row per layer type: its rank at each depth ('-' = dense), so the allocation shows.
        rows = []
        for kind, entry in result["rank_table"].items():
            kept = [r for r in entry["ranks"] if r is not None]
            median = sorted(kept)[len(kept) // 2] if kept else "-"
            by_depth = " ".join("-" if r is None else str(r) for r in entry["ranks"])
            rows.append([kind, str(len(entry["ranks"]) - len(kept)), str(median), by_depth])
        lines += ["", _table(["layer type", "dense", "median rank", "rank by depth ('-' dense)"], rows)]
    if result["ranks"]:
        lines += ["", _table(["layer", "rank"], sorted(result["ranks"].items(), key=lambda kv: kv[0]))]
    return "\n".join(lines)


COMMANDS = {
    "compress": (cmd_compress, format_compression),
    "eval": (cmd_eval, format_eval),
    "inspect": (cmd_inspect, format_inspect),
    "finetune": (cmd_finetune, format_finetune),
}


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C's :class:`KeyboardInterrupt`."""


def _terminate_like_interrupt() -> Any:
    """Make SIGTERM raise :class:`KeyboardInterrupt` like Ctrl-C, so cleanup runs; returns the previous handler.

    Only from the main thread (where Python delivers signals); ``None`` when not installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated

    return signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fwsvd`` console script; returns the exit status.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) ``compress`` runs data-parallel (see
    :mod:`fwsvd.calibration.distributed`): rank 0 alone prints, logs and writes, and an error on any process
    is printed once while every process exits non-zero.
    """
    from .calibration import distributed

    parser = build_parser()
    args = parser.parse_args(argv)
    launched = distributed.launched()
    main_rank = distributed.env_rank() == 0
    if not main_rank:
        args.quiet = True  # progress bars and messages once, from rank 0
    _setup_logging(args.quiet)
    if not main_rank:
        import warnings

        logging.getLogger().setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    run, fmt = COMMANDS[args.command]
    start = time.perf_counter()
    previous = _terminate_like_interrupt()
    try:
        if launched and args.command != "compress":
            raise FwsvdError(f"fwsvd {args.command} runs in one process: launch it without torchrun (only compress calibrates on several)")
        distributed.init_from_env()
        # Under --json stdout carries the one JSON object only: anything a library prints goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            result = run(args)
    except distributed.PeerFailed:
        return 1  # the failing process printed the error
    except FwsvdError as err:
        return _fail(f"fwsvd: error: {err}", EXIT_USAGE)
    except OSError as err:
        # Disk full, permission denied and the like: one line, the files already on disk untouched.
        return _fail(f"fwsvd: error: {err.strerror or err} ({err.filename or 'file system'})", 1)
    except KeyboardInterrupt as err:
        # Ctrl-C or SIGTERM: the finally blocks on the way up removed any temporary output folder.
        # torchrun hands the signal to every process: rank 0 says so.
        terminated = isinstance(err, _Terminated)
        if main_rank:
            print(f"fwsvd: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except Exception:
        distributed.report_failure()  # a bug: the others stop, this process shows its traceback
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        distributed.shutdown()
    result.setdefault("wall_seconds", round(time.perf_counter() - start, 3))
    if not main_rank:
        return 0
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(fmt(result))
    return 0


def _fail(line: str, status: int) -> int:
    """Print ``line`` on stderr unless another process of a torchrun job prints the error; return ``status``."""
    from .calibration import distributed

    if distributed.report_failure() if distributed.current().active else distributed.env_rank() == 0:
        print(line, file=sys.stderr)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
