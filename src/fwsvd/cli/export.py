"""``fwsvd export``: a dense or compressed model folder as an ONNX Runtime folder (float32 or dynamic int8)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_output_options, table


def add_parser(sub: Any) -> None:
    """Add the ``export`` command to the subparsers ``sub``."""
    x = sub.add_parser(
        "export", help="export a model folder to ONNX (onnxruntime), optionally int8",
        description="Export a dense or fwsvd-compressed encoder to an ONNX Runtime folder (model.onnx, tokenizer, config, "
        "fwsvd-export.json); low-rank layers become two MatMuls. `fwsvd eval` scores the folder through onnxruntime.",
    )
    x.add_argument("model", metavar="MODEL", help="model folder (config.json + safetensors) or hub id")
    x.add_argument("--onnx", required=True, metavar="OUT", help="output folder (written atomically)")
    x.add_argument("--int8", action="store_true", help="quantize every weight MatMul (dense and low-rank alike) with onnxruntime's dynamic int8 quantization")
    x.add_argument("--task", choices=["sequence-classification", "token-classification"], default=None, help="model task (detected when omitted)")
    x.add_argument("--opset", type=int, default=18, help="ONNX opset of the graph (default 18)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --onnx folder")
    add_output_options(x)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``fwsvd export``; return :func:`fwsvd.export.onnx.export_onnx`'s summary."""
    from ..export.onnx import export_onnx

    return export_onnx(args.model, args.onnx, int8=args.int8, task=args.task, opset=args.opset, overwrite=args.overwrite, allow_pickle=args.allow_pickle)


def format_result(result: dict[str, Any]) -> str:
    """The human summary of an export: what was written and how close it runs to PyTorch."""
    matmuls = ", ".join(f"{n} {k}" for k, n in sorted(result["matmuls"].items()))
    rows = [
        ["output", result["out"]],
        ["task", result["task"]],
        ["weights", "int8 (dynamic quantization)" if result["int8"] else "float32"],
        ["low-rank layers", f"{result['low_rank_layers']} (two MatMuls each)"],
        ["products", matmuls],
        ["model.onnx", f"{result['bytes'] / 1e6:.1f} MB"],
        ["max |ORT - PyTorch| logit", f"{result['max_abs_diff']:.2e}"],
        ["same prediction", f"{result['argmax_agreement']:.0%}"],
    ]
    return table(["export", ""], rows) + f"\n({result['seconds']:.1f} s)"
