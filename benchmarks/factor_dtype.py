"""Smaller storage: folder size and perplexity of ``--dtype bfloat16`` / ``float16`` and ``--quantize-factors int8`` against float32.

    python benchmarks/factor_dtype.py [--keep 0.8] [--method fwsvd] [--samples 16] [--stats FILE]

SmolLM2-135M (``benchmarks/.cache/smollm2-135m``, made by ``benchmarks/decoder.py``) is compressed
once (calibration: ``--samples`` blocks of 512 tokens of WikiText-2 valid, seed 0; or statistics
saved by ``fwsvd compress --save-stats`` with that protocol, ``--stats``) and saved in float32; that
folder is loaded again and saved with every weight cast to bfloat16 (and float16), as ``--dtype``
stores it, and with the factors rounded to int8 (``--quantize-factors int8``: ``int8`` keeps the
other weights in float32, ``int8+bfloat16`` stores them in bfloat16). Each folder is loaded back as a user would (``fwsvd.load``: computing in float32) and
scored on the first 24 blocks × 512 tokens of WikiText-2 test; its weight files' size is compared
with the dense float32 folder's and with the whole-model kept fraction. Writes
``benchmarks/results/factor-dtype.{json,md}``. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import fwsvd  # noqa: E402
from fwsvd.demo import machine_info  # noqa: E402
from fwsvd.evaluation.evaluate import EvalConfig, evaluate
from fwsvd.storage.int8 import quantize_factors

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
DATA = SHARED / "data" / "wikitext-2"


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=HERE / ".cache" / "smollm2-135m")
    p.add_argument("--method", default="fwsvd")
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--stats", type=Path, default=None, help="statistics saved by fwsvd compress --save-stats (same protocol) instead of calibrating")
    p.add_argument("--blocks", type=int, default=24)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "int8", "int8+bfloat16"],
                   help="storage forms besides float32: a --dtype, int8 (int8 factors), or int8+DTYPE (int8 factors, the rest in DTYPE)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    machine = machine_info()
    load_before = os.getloadavg()
    lm = fwsvd.load_model(args.model, need_tokenizer=True)
    config = fwsvd.CompressConfig(method=args.method, keep=args.keep)
    stats = None
    if args.stats is not None:
        stats = fwsvd.api.load_statistics(args.stats)
    elif config.needs(lm.task):
        cal = fwsvd.CalibrationConfig(data=str(DATA / "valid.txt"), samples=args.samples, cov_samples=args.samples, max_length=512, seed=0)
        stats = fwsvd.calibrate(lm, cal, config.needs(lm.task), progress=False)
    report = fwsvd.compress(lm.model, config, stats, task=lm.task, progress=False)
    del stats
    rows = []
    with tempfile.TemporaryDirectory(prefix="fwsvd-dtype-") as tmp:
        dense_bytes = weight_bytes(args.model)
        float32_folder = fwsvd.save(lm.model, Path(tmp) / "float32", lm.tokenizer)
        del lm
        for dtype in ["float32", *args.dtypes]:
            folder = float32_folder
            if dtype != "float32":
                # What --quantize-factors / --dtype store: the float32 compressed model rounded / cast once.
                small = fwsvd.load_model(float32_folder)
                quantized, _, cast = dtype.partition("+") if dtype.startswith("int8") else ("", "", dtype)
                if quantized:
                    quantize_factors(small.model, quantized)
                if cast:
                    fwsvd.api.cast_weights(small.model, cast)
                folder = fwsvd.save(small.model, Path(tmp) / dtype, small.tokenizer)
                del small
            reloaded = fwsvd.load_model(folder)
            ppl = evaluate(reloaded, EvalConfig(data=str(DATA / "test.txt"), limit=args.blocks, max_length=512), progress=False)["perplexity"]
            size = weight_bytes(folder)
            rows.append({"stored_dtype": dtype, "computed_in": str(reloaded.model.dtype).removeprefix("torch."), "perplexity": ppl,
                         "folder_bytes": size, "folder_ratio": size / dense_bytes, "folder_ratio_over_model_keep": size / dense_bytes / report.model_keep})
            print(f"{dtype:9s} perplexity {ppl:.4f}  weights {size / 2**20:.1f} MiB  ({size / dense_bytes:.4f} of dense)", flush=True)
            del reloaded
    base = rows[0]
    for r in rows:
        r["perplexity_change"] = r["perplexity"] / base["perplexity"] - 1
        r["folder_ratio_vs_float32"] = r["folder_bytes"] / base["folder_bytes"]
    record = {
        "benchmark": "factor-dtype",
        "command": "python benchmarks/factor_dtype.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "model": str(args.model),
        "method": args.method,
        "keep": args.keep,
        "statistics": str(args.stats) if args.stats is not None else f"calibrated: {args.samples} x 512 tokens of WikiText-2 valid, seed 0",
        "model_keep": report.model_keep,
        "target_keep": report.target_keep,
        "dense_folder_bytes": dense_bytes,
        "rows": rows,
        "seconds_total": round(time.perf_counter() - started, 1),
        "load_average_1min": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "factor-dtype.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    lines = [
        "# Weights stored in half precision (`--dtype`) or with int8 factors (`--quantize-factors int8`)",
        "",
        f"`{record['command']}` — {record['date']}; {machine['processor']}, {machine['cpu_count']} CPUs, torch {machine['torch']}; "
        f"load average {record['load_average_1min']['start']:.1f} at the start, {record['load_average_1min']['end']:.1f} at the end.",
        f"SmolLM2-135M, {args.method} keep {args.keep:g} (whole-model kept fraction {report.model_keep:.4f}); statistics: {record['statistics']}; "
        f"perplexity on the first {args.blocks} × 512 tokens of WikiText-2 test, each folder loaded back with `fwsvd.load` "
        f"(computing in {rows[0]['computed_in']}). Dense float32 folder: {dense_bytes / 2**20:.1f} MiB of weights.",
        "",
        "| weights stored as | perplexity | change vs float32 | weights MiB | / dense folder | / kept fraction | / float32 folder |",
        "|---|---|---|---|---|---|---|",
    ]
    lines.insert(-2, "`int8`: factors as int8 with a float32 scale per row, other weights float32; `int8+bfloat16`: the other weights in bfloat16.\n")
    for r in rows:
        lines.append(f"| {r['stored_dtype']} | {r['perplexity']:.3f} | {r['perplexity_change'] * 100:+.2f} % | {r['folder_bytes'] / 2**20:.1f} | "
                     f"{r['folder_ratio']:.4f} | {r['folder_ratio_over_model_keep']:.4f} | {r['folder_ratio_vs_float32']:.4f} |")
    (args.out / "factor-dtype.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[-len(rows) - 2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
