"""Encoder benchmark: SVD vs FWSVD (the paper's Fisher per output or per input feature; Fisher per
output with whitened inputs, with uniform or globally allocated ranks) vs SVD-LLM vs default FWSVD +
one recovery fine-tuning epoch, on MiniLM-L6 fine-tuned for SST-2, across keep ratios.

    python benchmarks/encoder.py [--shared ../shared] [--out benchmarks/results]

Uses ``<shared>/models/minilm-l6-sst2`` and ``<shared>/data/sst2/{train,dev}.tsv``; exits 0 with a
message when they are absent. Fisher and the input covariances are calibrated once (512 rows of
train.tsv, seed 0) and the statistics are reused for every ratio and method. Writes ``encoder-sst2.json`` (command, machine, date, every
row), ``encoder-sst2.md`` (the table) and ``encoder-sst2.png`` (dev accuracy against kept
parameters) into ``--out``. Not a test: nothing here asserts a number.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fwsvd.demo import machine_info
from fwsvd.storage.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = ROOT.parent / "shared"
KEEPS = (0.8, 0.6, 0.5, 0.4, 0.3, 0.2)
RECOVERY_KEEPS = (0.5, 0.4, 0.3, 0.2)
NAME = "encoder-sst2"

logger = logging.getLogger("benchmarks.encoder")


def _variants(keeps: list[float], recovery_keeps: list[float]) -> list[tuple[str, str, float, bool]]:
    """``(label, method spec, keep, recovery)`` in table order; a spec is ``method[:reduction:whiten[:allocation]]``."""
    out = []
    for keep in keeps:
        out += [
            ("svd", "svd", keep, False),
            ("fwsvd-out", "fwsvd:out:off", keep, False),  # the paper's FWSVD
            ("fwsvd-in", "fwsvd:in:off", keep, False),
            ("svd-llm", "svd-llm", keep, False),
            # Fisher per output + whitened inputs, ranks uniform or allocated globally.
            ("fwsvd-uniform", "fwsvd:auto:auto:uniform", keep, False),
            ("fwsvd-global", "fwsvd:auto:auto:global", keep, False),
        ]
        if keep in recovery_keeps:
            out.append(("fwsvd+ft", "fwsvd:auto:auto:default", keep, True))  # the command line's default + 1 epoch
    return out


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    shared = Path(args.shared)
    model_dir = shared / "models" / "minilm-l6-sst2"
    train = shared / "data" / "sst2" / "train.tsv"
    dev = shared / "data" / "sst2" / "dev.tsv"
    missing = [str(p) for p in (model_dir / "config.json", train, dev) if not p.exists()]
    if missing:
        print(f"skipping the encoder benchmark: {', '.join(missing)} not found (pass --shared PATH to the shared folder)")
        return None

    import fwsvd
    from fwsvd import api
    from fwsvd.config import DEFAULT_ALLOCATION
    from fwsvd.evaluation.evaluate import EvalConfig, evaluate
    from fwsvd.training.finetune import FinetuneConfig, finetune

    progress = not args.quiet
    started = time.perf_counter()
    dense = fwsvd.load_model(model_dir, need_tokenizer=True)
    dev_config = EvalConfig(data=str(dev), max_length=args.max_length)
    result = evaluate(dense, dev_config, progress=progress)
    dense_eval_s = result["seconds"]
    dense_params = api.count_parameters(dense.model)
    rows: list[dict[str, Any]] = [
        {"label": "dense", "method": "dense", "keep": 1.0, "target_keep": 1.0, "parameters": dense_params, "model_keep": 1.0,
         "accuracy": result["accuracy"], "f1": result.get("f1"), "seconds_eval": dense_eval_s, "eval_time_ratio": 1.0}
    ]
    print(f"dense: accuracy {result['accuracy']:.4f}", flush=True)

    calibration = api.CalibrationConfig(data=str(train), samples=args.samples, seed=args.seed, max_length=args.max_length)
    t0 = time.perf_counter()
    statistics = api.calibrate(dense, calibration, {"fisher", "cov"}, progress=progress)
    calib_s = time.perf_counter() - t0
    print(f"calibration (Fisher + covariances): {statistics.summary['samples']} rows, {statistics.summary['tokens']} tokens, {calib_s:.1f} s", flush=True)

    for label, spec, keep, recovery in _variants(args.keep, args.recovery_keep):
        method, reduction, whiten, allocation = ([*spec.split(":"), "auto", "auto", "default"])[:4]
        model = copy.deepcopy(dense.model)
        loaded = fwsvd.LoadedModel(model, dense.tokenizer, dense.task, dense.source)
        allocation = DEFAULT_ALLOCATION if allocation == "default" else allocation
        config = api.CompressConfig(method=method, keep=keep, fisher_reduction=reduction, fisher_whiten=whiten, allocation=allocation)
        report = api.compress(model, config, statistics if method != "svd" else None, task=dense.task, progress=False)
        row: dict[str, Any] = {
            "label": label, "method": method, "method_options": report.method_options, "allocation": allocation, "keep": keep,
            "target_keep": report.target_keep, "parameters": report.parameters_after, "model_keep": report.model_keep,
            "target_parameters": report.target_parameters_after, "seconds_svd": report.seconds_factorize,
            "seconds_calibration": round(calib_s, 3) if method != "svd" else 0.0,
        }
        if recovery:
            summary = finetune(loaded, FinetuneConfig(data=str(train), epochs=1, seed=args.seed, max_length=args.max_length), progress=progress)
            row["finetune"] = {k: summary[k] for k in ("epochs", "lr", "batch_size", "max_length", "rows", "steps", "seconds")}
            row["seconds_finetune"] = summary["seconds"]
        result = evaluate(loaded, dev_config, progress=progress)
        row.update(accuracy=result["accuracy"], f1=result.get("f1"), seconds_eval=result["seconds"], eval_time_ratio=result["seconds"] / dense_eval_s)
        rows.append(row)
        print(f"{label:9s} keep {keep:.1f}: accuracy {row['accuracy']:.4f}", flush=True)

    default_label = f"fwsvd-{api.CompressConfig(method='fwsvd').resolved_allocation()}"
    timing = next(r for r in rows if r["label"] == default_label and (r["keep"] == 0.3 or 0.3 not in args.keep))
    return {
        "benchmark": NAME,
        "default_allocation": api.CompressConfig(method="fwsvd").resolved_allocation(),
        "command": " ".join(["python", "benchmarks/encoder.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "model": str(model_dir),
        "calibration": dict(statistics.summary),
        "compress_timing": {
            "keep": timing["keep"],
            "calibration_seconds": round(calib_s, 3),
            "svd_seconds": timing["seconds_svd"],
            "note": "one fwsvd compress = one calibration pass (Fisher + covariances, reusable for every ratio) + the factorizations of the targeted layers",
        },
        "rows": rows,
        "seconds_total": round(time.perf_counter() - started, 1),
    }


def markdown(record: dict[str, Any]) -> str:
    m = record["machine"]
    lines = [
        "# Encoder benchmark: MiniLM-L6 / SST-2 dev (872 rows)",
        "",
        f"`{record['command']}` on {m['platform']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
        f"torch {m['torch']}, transformers {m['transformers']}, fwsvd {m['fwsvd']}; {record['date']}.",
        "",
        f"Fisher and input covariances calibrated once on {record['calibration']['samples']} rows of train.tsv (seed {record['calibration']['seed']}) "
        f"and reused for every ratio. One default fwsvd compress at keep {record['compress_timing']['keep']:g}: calibration "
        f"{record['compress_timing']['calibration_seconds']:.1f} s + factorization {record['compress_timing']['svd_seconds']:.1f} s. "
        "`fwsvd-out`: the paper's FWSVD (Fisher per output feature); `fwsvd-in`: Fisher per input feature; `svd-llm`: whitened inputs only; "
        "`fwsvd-uniform` / `fwsvd-global`: Fisher per output feature with whitened inputs, every layer keeping the same share / ranks allocated "
        f"over all layers by the Fisher loss estimate (`--allocation`; the default is {record.get('default_allocation', 'uniform')}); "
        "`fwsvd+ft`: default fwsvd + 1 recovery epoch on train.tsv.",
        "",
        "| method | keep | targeted kept | whole-model params | dev accuracy | dev F1 | eval time vs dense | build s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        build = r.get("seconds_svd", 0.0) + r.get("seconds_calibration", 0.0) + r.get("seconds_finetune", 0.0)
        f1 = "-" if r.get("f1") is None else f"{r['f1']:.4f}"
        lines.append(
            f"| {r['label']} | {r['keep']:g} | {r['target_keep']:.3f} | {r['parameters']:,} ({r['model_keep']:.2f}) | "
            f"{r['accuracy']:.4f} | {f1} | {r['eval_time_ratio']:.2f} | {build:.1f} |"
        )
    lines.append("")
    lines.append(f"Total {record['seconds_total']:.0f} s. Build s of calibrated rows counts the shared calibration pass; +ft rows add the fine-tuning.")
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    dense = record["rows"][0]
    styles = {
        "svd": ("tab:blue", "o", "-"),
        "fwsvd-out": ("tab:orange", "s", "-"),
        "fwsvd-in": ("tab:olive", "^", "-"),
        "svd-llm": ("tab:purple", "v", "-"),
        "fwsvd-uniform": ("tab:pink", "s", "-"),
        "fwsvd-global": ("tab:red", "s", "-"),
        "fwsvd+ft": ("tab:red", "D", "--"),
    }
    for label, (color, marker, line) in styles.items():
        points = sorted((r["target_keep"], r["accuracy"]) for r in record["rows"] if r["label"] == label)
        if points:
            ax.plot(*zip(*points), color=color, marker=marker, linestyle=line, label=label)
    ax.axhline(dense["accuracy"], color="black", linestyle=":", linewidth=1, label=f"dense ({dense['accuracy']:.3f})")
    ax.set_xlabel("kept fraction of the targeted parameters")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title("MiniLM-L6 SST-2: low-rank compression")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", default=str(DEFAULT_SHARED), help="the shared folder with models/ and data/ (default: ../shared beside the repo)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for encoder-sst2.{json,md,png}")
    p.add_argument("--keep", type=float, nargs="+", default=list(KEEPS), help="keep ratios")
    p.add_argument("--recovery-keep", type=float, nargs="*", default=list(RECOVERY_KEEPS), help="ratios that also get fwsvd + 1 recovery epoch")
    p.add_argument("--samples", type=int, default=512, help="calibration rows (Fisher and covariances)")
    p.add_argument("--seed", type=int, default=0, help="calibration and fine-tuning seed")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sentence")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing
    import transformers

    transformers.logging.set_verbosity_error()
    record = run(args)
    if record is None:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(record, indent=2) + "\n"), ("md", markdown(record))):
        atomic_write_text(out / f"{NAME}.{suffix}", text)
    plot(record, out / f"{NAME}.png")
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
