"""What the commands share: the one-line-error parser, argparse types and options, tables, the output checks."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        # "fwsvd: error:" for every command, like the errors raised while running one; under
        # torchrun every process meets the same error, and rank 0 alone prints it.
        from ..calibration.distributed import env_rank

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


def field_help(cls: type, name: str) -> str:
    """The help string of the dataclass field ``name`` of ``cls`` (the config objects document their options)."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def add_data_options(p: argparse.ArgumentParser, *, calibration: bool) -> None:
    """The data-reading options of compress (``calibration=True``: also --samples and --seed) and eval."""
    from ..config import CalibrationConfig

    p.add_argument("--max-length", type=positive_int, default=None, help=field_help(CalibrationConfig, "max_length"))
    p.add_argument("--batch-size", type=positive_int, default=None, help="batch size: memory and speed only (calibration 16 rows or 4 causal-LM blocks, 1 with --low-memory; evaluation 32)")
    for name in ("text_column", "pair_column", "label_column"):
        p.add_argument("--" + name.replace("_", "-"), default=None, help=field_help(CalibrationConfig, name))
    if calibration:
        p.add_argument("--samples", type=positive_int, default=None, help=field_help(CalibrationConfig, "samples"))
        p.add_argument("--seed", type=int, default=0, help=field_help(CalibrationConfig, "seed"))


def add_device_option(p: argparse.ArgumentParser, extra: str = "") -> None:
    """--device, which compress, eval and finetune take (resolved by :func:`fwsvd.device.resolve_device`)."""
    from ..device import DEVICE_HELP

    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}", help=DEVICE_HELP + extra + " (default auto)")


def memory_line(memory: dict[str, Any] | None) -> str:
    """One line on the device and each stage's seconds and peak memory (empty without a report)."""
    if not memory:
        return ""
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    parts = [
        f"{name} {s['seconds']:.1f} s, peak RSS {gib(s['peak_rss_bytes'])}" + (f", peak GPU {gib(s['peak_gpu_bytes'])}" if "peak_gpu_bytes" in s else "")
        for name, s in memory["stages"].items()
    ]
    return f"on {memory['device']}: " + "; ".join(parts)


def add_output_options(p: argparse.ArgumentParser) -> None:
    """--allow-pickle, --json and --quiet, which every command takes."""
    p.add_argument(
        "--allow-pickle", action="store_true",
        help="accept a model folder whose weights are pickles (pytorch_model.bin; read with weights_only=True). "
        "Pickles can run code: use only for folders you trust",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log messages")


def fmt_int(n: int | None) -> str:
    """``n`` with thousands separators, ``-`` for ``None``."""
    return "-" if n is None else f"{n:,}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned, a rule under the headers."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def finetune_line(summary: dict[str, Any]) -> str:
    """One line on a fine-tuning run (of ``fwsvd finetune``, or the recovery of ``fwsvd compress --finetune-data``)."""
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


def check_out(args: argparse.Namespace, model: str, *inputs: tuple[str, str | None]) -> Path:
    """Check ``--out`` before any work: it may not be, or hold, the input model or an input file.

    Raises:
        FwsvdError: see :func:`fwsvd.storage.atomic.check_output_dir`.
    """
    from ..storage.atomic import check_output_dir, refuse_busy_output
    from ..storage.loading import model_source

    source, _ = model_source(model)
    local = source if Path(source).exists() else None
    out = check_output_dir(args.out, args.overwrite, protect=[("input model folder", local), *inputs])
    refuse_busy_output(out, args.overwrite)
    return out
