"""``fwsvd resize``: materialise one size of an any-size folder (``compress --any-size``) in seconds."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_output_options, check_out


def add_parser(sub: Any) -> None:
    """Add the ``resize`` command to the subparsers ``sub``."""
    from ..config import CompressConfig
    from .common import field_help

    r = sub.add_parser(
        "resize", help="materialise one size of an any-size folder (no calibration)",
        description="Resize a folder written by `fwsvd compress --any-size` to one --keep: ranks as a direct compression "
        "at that keep would choose them, from the recorded decompositions.",
    )
    r.add_argument("model", metavar="DIR", help="an any-size folder (fwsvd compress --any-size)")
    r.add_argument("--keep", type=float, required=True, help=field_help(CompressConfig, "keep"))
    r.add_argument("--out", required=True, help="output folder (written atomically)")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    add_output_options(r)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``fwsvd resize``: load the any-size folder, resize it to --keep, save; the compression report."""
    from .. import api
    from ..compression.any_size import resize
    from ..config import CompressConfig
    from ..storage.loading import load_model

    CompressConfig(keep=args.keep)  # a bad --keep fails before anything loads
    out = check_out(args, args.model)
    loaded = load_model(args.model, allow_pickle=args.allow_pickle)
    report = resize(loaded.model, args.keep)
    api.save(loaded.model, out, loaded.tokenizer, overwrite=args.overwrite)
    return {**report.to_dict(), "out": str(out), "task": loaded.task}


def format_result(result: dict[str, Any]) -> str:
    """The same table as ``fwsvd compress``."""
    from .compress import format_result as compress_table

    return compress_table(result)
