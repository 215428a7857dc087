"""Deploying a compressed encoder on a CPU: PyTorch eager against ONNX Runtime float32 and int8.

    python benchmarks/deploy.py            # the full run (~15 min on 2 shared cores)
    python benchmarks/deploy.py --quick    # development: 200 dev rows, 2 rounds, batch 8

MiniLM-L6 SST-2 (``../shared/models/minilm-l6-sst2``) dense and compressed by fwsvd at keep 0.5 and
0.3 as a deploying user would choose (the ``fast`` rows of docs/speed.md: global allocation,
``--dense-above 0.7``, ``--rank-multiple 8``; Fisher and covariances calibrated once on 512 rows of
train.tsv, seed 0, reused for both keeps), each run three ways: PyTorch eager, ONNX Runtime float32
and ONNX Runtime dynamic int8 (``fwsvd export --onnx OUT [--int8]``).

- Accuracy on SST-2 dev (872 rows), scored by ``fwsvd eval``'s code (exported folders through
  onnxruntime).
- Throughput: batch 32 x 128 and 1 x 128 tokens (real dev sentences padded to 128), 1 and 2
  threads (``torch.set_num_threads``; ORT ``intra_op_num_threads``, inter-op 1), the nine variants
  interleaved round by round, median of 5 rounds; speed-ups are medians over rounds of the ratio to
  dense PyTorch eager, and to the dense model in the same runtime.
- Bound (Amdahl, as issue 9 measured it): the share ``f`` of the dense model's time spent in the
  products of the targeted layers, per runtime, and ``1 / (1 - f + f * k)`` for a model keeping ``k``
  of those layers' parameters. Eager: hooks around each targeted ``nn.Linear``. ONNX Runtime: its
  profiler's per-node times, counting the matrix products whose inputs are a 3-D activation and a
  2-D weight (the targeted layers; attention's products are 4-D, pooler and classifier 2-D) plus,
  for int8, the dynamic quantization of their inputs, against the whole ``model_run`` time.

Writes ``benchmarks/results/deploy.{json,md,png}`` with the command, machine (CPU, cores, load
average before and after) and date. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Passive OpenMP waiting on a machine shared with other jobs (see speed.py); before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from fwsvd.cli import main as fwsvd_main  # noqa: E402
from fwsvd.demo import machine_info  # noqa: E402
from fwsvd.evaluation.evaluate import EvalConfig, evaluate  # noqa: E402
from fwsvd.export.onnx import export_onnx, load_onnx, session  # noqa: E402
from fwsvd.nn import find_targets  # noqa: E402
from fwsvd.storage.loading import load_model  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
MODEL = SHARED / "models" / "minilm-l6-sst2"
DATA = SHARED / "data" / "sst2"
RESULTS = HERE / "results"
KEEPS = (0.5, 0.3)
FAST = ["--allocation", "global", "--dense-above", "0.7", "--rank-multiple", "8"]
RUNTIMES = ("eager", "ort-fp32", "ort-int8")
LENGTH = 128

log = logging.getLogger("deploy-benchmark")


def build(work: Path, samples: int) -> dict[str, Path]:
    """The model folders: dense, and fwsvd keep 0.5 / 0.3 (cached in ``work``; one calibration for both)."""
    folders = {"dense": MODEL}
    stats = work / "stats.safetensors"
    for keep in KEEPS:
        out = work / f"keep{keep:g}"
        if not (out / "config.json").is_file():
            calib = ["--stats", str(stats)] if stats.is_file() else ["--data", str(DATA / "train.tsv"), "--samples", str(samples), "--save-stats", str(stats)]
            argv = ["compress", str(MODEL), "--out", str(out), "--keep", str(keep), *calib, *FAST, "--quiet", "--overwrite"]
            log.info("fwsvd %s", " ".join(argv))
            if fwsvd_main(argv) != 0:
                raise SystemExit(f"compress failed: {' '.join(argv)}")
        folders[f"keep {keep:g}"] = out
    return folders


def export_all(folders: dict[str, Path], work: Path) -> dict[tuple[str, str], Path]:
    """Every (model, runtime) -> the folder it runs from (exported folders cached in ``work``)."""
    paths = {}
    for name, folder in folders.items():
        paths[(name, "eager")] = folder
        for runtime, int8 in (("ort-fp32", False), ("ort-int8", True)):
            out = work / "onnx" / f"{name.replace(' ', '')}-{runtime}"
            if not (out / "model.onnx").is_file():
                result = export_onnx(folder, out, int8=int8, overwrite=True)
                log.info("exported %s %s: max |ORT - PyTorch| %.2e, %.1f MB", name, runtime, result["max_abs_diff"], result["bytes"] / 1e6)
            paths[(name, runtime)] = out
    return paths


def accuracies(paths: dict[tuple[str, str], Path], limit: int | None) -> dict[tuple[str, str], float]:
    config = EvalConfig(data=str(DATA / "dev.tsv"), limit=limit, batch_size=32, max_length=LENGTH)
    out = {}
    for key, folder in paths.items():
        loaded = load_model(folder, need_tokenizer=True) if key[1] == "eager" else load_onnx(folder)
        out[key] = evaluate(loaded, config, progress=False)["accuracy"]
        log.info("%s %s: accuracy %.4f", *key, out[key])
    return out


def batches(tokenizer: Any, sizes: list[int]) -> dict[str, dict[str, torch.Tensor]]:
    """``b x 128`` batches of dev sentences padded to 128 tokens."""
    from fwsvd.data import read_labelled

    texts = read_labelled(DATA / "dev.tsv", limit=max(sizes)).texts
    return {f"{b} x {LENGTH}": dict(tokenizer(texts[:b], padding="max_length", truncation=True, max_length=LENGTH, return_tensors="pt")) for b in sizes}


def runners(paths: dict[tuple[str, str], Path], threads: int) -> dict[tuple[str, str], Callable[[dict[str, torch.Tensor]], Any]]:
    """A callable per variant that runs one batch with ``threads`` threads."""
    out: dict[tuple[str, str], Callable[[dict[str, torch.Tensor]], Any]] = {}
    for key, folder in paths.items():
        if key[1] == "eager":
            model = load_model(folder).model.eval()
            out[key] = lambda batch, m=model: m(**batch)
        else:
            sess = session(folder / "model.onnx", threads)
            names = {i.name for i in sess.get_inputs()}
            out[key] = lambda batch, s=sess, n=names: s.run(None, {k: v.numpy() for k, v in batch.items() if k in n})
    return out


def timed(fn: Callable[[], Any]) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def throughput(paths: dict[tuple[str, str], Path], inputs: dict[str, dict[str, torch.Tensor]], threads: list[int], reps: int) -> list[dict[str, Any]]:
    """Median seconds per batch of every variant, interleaved round by round; speed-ups per round."""
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        run = runners(paths, count)
        for workload, batch in inputs.items():
            for fn in run.values():
                fn(batch)  # warm-up
            times: dict[tuple[str, str], list[float]] = {key: [] for key in run}
            for _ in range(reps):
                for key, fn in run.items():
                    times[key].append(timed(lambda: fn(batch)))
            base = times[("dense", "eager")]
            for key, values in times.items():
                same = times[("dense", key[1])]
                rows.append({
                    "workload": workload, "threads": count, "model": key[0], "runtime": key[1],
                    "seconds": round(statistics.median(values), 5), "seconds_all": [round(v, 5) for v in values],
                    "sequences_per_second": round(batch["input_ids"].shape[0] / statistics.median(values), 2),
                    "speedup_vs_dense_eager": round(statistics.median(b / v for b, v in zip(base, values)), 3),
                    "speedup_vs_dense_same_runtime": round(statistics.median(b / v for b, v in zip(same, values)), 3),
                })
            log.info("%s, %d thread(s): %s", workload, count, "  ".join(
                f"{r['model']}/{r['runtime']} {r['speedup_vs_dense_eager']:.2f}x" for r in rows[-len(times):]))
    return rows


def eager_share(folder: Path, batch: dict[str, torch.Tensor], reps: int) -> float:
    """Share of the dense model's eager time inside its targeted linears (hooks around each call)."""
    model = load_model(folder).model.eval()
    names = {info.name for info in find_targets(model)}
    inside, starts, handles = [0.0], [], []
    for name, module in model.named_modules():
        if name in names:
            handles.append(module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())))
            handles.append(module.register_forward_hook(lambda *_: inside.__setitem__(0, inside[0] + time.perf_counter() - starts.pop())))
    try:
        timed(lambda: model(**batch))
        shares = [_share_once(model, batch, inside) for _ in range(reps)]
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(shares)


def _share_once(model: torch.nn.Module, batch: dict[str, torch.Tensor], inside: list[float]) -> float:
    inside[0] = 0.0
    total = timed(lambda: model(**batch))
    return inside[0] / total


def _is_layer_product(event: dict[str, Any]) -> bool:
    """A profiled ORT node that is (part of) a targeted layer: a product whose activation is 3-D and whose
    other operand is a weight (constant weights are not listed among the input shapes; attention's
    products multiply two 4-D activations, pooler and classifier a 2-D one), or int8's quantization
    of such an activation."""
    args = event.get("args", {})
    op = args.get("op_name", "")
    shapes = [list(s.values())[0] for s in args.get("input_type_shape", [])]
    if not shapes or len(shapes[0]) != 3:
        return False
    if op == "DynamicQuantizeLinear":
        return True
    return ("MatMul" in op or op == "Gemm") and not any(len(s) >= 3 for s in shapes[1:])


def ort_share(folder: Path, batch: dict[str, torch.Tensor], threads: int, reps: int) -> tuple[float, dict[str, float]]:
    """Share of an exported dense model's ``model_run`` time in the targeted layers' nodes (ORT's profiler),
    and the share of every operator type (medians over ``reps`` runs), which says where the rest goes."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="fwsvd-deploy-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.log_severity_level = 3
        sess = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        feed = {k: v.numpy() for k, v in batch.items() if k in {i.name for i in sess.get_inputs()}}
        for _ in range(reps + 1):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][1:]  # the first is the warm-up
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    shares, by_op = [], {}
    for run in runs:
        inside = [e for e in nodes if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]]
        shares.append(sum(e["dur"] for e in inside if _is_layer_product(e)) / run["dur"])
        for e in inside:
            key = "targeted-layer products" if _is_layer_product(e) else e["args"]["op_name"]
            by_op.setdefault(key, []).append(e["dur"] / run["dur"] / len(runs))
    ops = {k: round(sum(v), 4) for k, v in sorted(by_op.items(), key=lambda kv: -sum(kv[1]))}
    return statistics.median(shares), ops


def bounds(paths: dict[tuple[str, str], Path], inputs: dict[str, dict[str, torch.Tensor]], threads: list[int], reps: int,
           target_keep: dict[str, float]) -> list[dict[str, Any]]:
    """Per runtime, workload and thread count: the dense model's share in the targeted layers and each keep's bound."""
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        for workload, batch in inputs.items():
            for runtime in RUNTIMES:
                folder = paths[("dense", runtime)]
                share, ops = (eager_share(folder, batch, reps), None) if runtime == "eager" else ort_share(folder, batch, count, reps)
                bound = {name: round(1 / (1 - share + share * keep), 3) for name, keep in target_keep.items()}
                rows.append({"workload": workload, "threads": count, "runtime": runtime, "targeted_share": round(share, 4), "bound": bound,
                             **({"operator_shares": ops} if ops else {})})
                log.info("bound %s %s %d thread(s): share %.3f, %s", runtime, workload, count, share, bound)
    return rows


def _cell(rows: list[dict[str, Any]], model: str, runtime: str, workload: str, threads: int) -> dict[str, Any] | None:
    return next((r for r in rows if (r["model"], r["runtime"], r["workload"], r["threads"]) == (model, runtime, workload, threads)), None)


def targets(record: dict[str, Any]) -> list[str]:
    """Issue 26's done-when lines, measured."""
    rows, acc = record["throughput"], record["accuracy"]
    workload, lines = f"32 x {LENGTH}", []
    k5, d8 = _cell(rows, "keep 0.5", "ort-int8", workload, 2), _cell(rows, "dense", "ort-int8", workload, 2)
    k3 = _cell(rows, "keep 0.3", "ort-int8", workload, 2)
    if k5 and d8:
        ratio = statistics.median(d / v for d, v in zip(d8["seconds_all"], k5["seconds_all"]))
        lines.append(f"- keep 0.5 int8 vs dense int8 (ORT, {workload}, 2 threads): {ratio:.2f} x (target >= 1.5 x: {'met' if ratio >= 1.5 else 'missed'})")
    gap = acc["keep 0.5/ort-int8"] - acc["keep 0.5/eager"]
    lines.append(f"- keep 0.5 int8 accuracy {acc['keep 0.5/ort-int8']:.4f} vs PyTorch float32 {acc['keep 0.5/eager']:.4f}: {gap:+.4f} (target within 0.01: {'met' if abs(gap) <= 0.01 else 'missed'})")
    if k3:
        lines.append(f"- keep 0.3 int8 vs dense PyTorch eager ({workload}, 2 threads): {k3['speedup_vs_dense_eager']:.2f} x (target >= 3 x: {'met' if k3['speedup_vs_dense_eager'] >= 3 else 'missed'})")
    return lines


def markdown(record: dict[str, Any]) -> str:
    rows, acc = record["throughput"], record["accuracy"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    threads = sorted({r["threads"] for r in rows})
    cols = [(w, t) for w in workloads for t in threads]
    lines = [
        "# Deploying MiniLM-L6 SST-2: PyTorch eager, ONNX Runtime float32 and int8", "",
        f"`{record['command']}` — {record['date']}; {record['machine']['processor']}, {record['machine']['cpu_count']} cores, "
        f"load average {record['load_average_before']} before, {record['load_average_after']} after (shared machine); "
        f"torch {record['machine']['torch']}, onnxruntime {record['versions']['onnxruntime']}.", "",
        f"Accuracy on SST-2 dev ({record['dev_rows']} rows). Throughput: median of {record['reps']} interleaved rounds; "
        "cells are sequences/s and, in brackets, the speed-up over dense PyTorch eager (median of per-round ratios).", "",
        "| model | runtime | accuracy | " + " | ".join(f"{w}, {t} thr" for w, t in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for model in record["models"]:
        for runtime in RUNTIMES:
            cells = []
            for w, t in cols:
                c = _cell(rows, model, runtime, w, t)
                cells.append("-" if c is None else f"{c['sequences_per_second']:.1f} ({c['speedup_vs_dense_eager']:.2f} ×)")
            lines.append(f"| {model} | {runtime} | {acc[f'{model}/{runtime}']:.4f} | " + " | ".join(cells) + " |")
    lines += ["", "Speed-up over the dense model in the same runtime, and the bound (Amdahl: the dense model's share `f` of time "
              "in the targeted layers, `1 / (1 - f + f k)` for target keep `k`):", "",
              "| runtime | workload | threads | share f | " + " | ".join(f"{m} (bound)" for m in record["target_keep"]) + " |",
              "|---|---|---|---|" + "---|" * len(record["target_keep"])]
    for b in record["bounds"]:
        cells = []
        for m in record["target_keep"]:
            c = _cell(rows, m, b["runtime"], b["workload"], b["threads"])
            cells.append(f"{c['speedup_vs_dense_same_runtime']:.2f} × ({b['bound'][m]:.2f} ×)" if c else "-")
        lines.append(f"| {b['runtime']} | {b['workload']} | {b['threads']} | {b['targeted_share']:.3f} | " + " | ".join(cells) + " |")
    for b in record["bounds"]:
        if b["runtime"] == "ort-int8" and b["threads"] == 2 and b["workload"].startswith("32") and b.get("operator_shares"):
            top = list(b["operator_shares"].items())[:8]
            lines += ["", f"Where the dense int8 model's time goes ({b['workload']}, 2 threads; ORT profiler, share of `model_run`): "
                      + ", ".join(f"{k} {v:.1%}" for k, v in top) + "."]
    lines += ["", "Targets (issue 26):", "", *targets(record), ""]
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["throughput"]
    panels = [(w, t) for w in dict.fromkeys(r["workload"] for r in rows) for t in sorted({r["threads"] for r in rows})]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), sharey=False)
    for ax, (w, t) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        for i, runtime in enumerate(RUNTIMES):
            values = [(_cell(rows, m, runtime, w, t) or {}).get("speedup_vs_dense_eager", 0) for m in record["models"]]
            ax.bar([j + (i - 1) * 0.27 for j in range(len(values))], values, width=0.27, label=runtime)
        ax.set_xticks(range(len(record["models"])), record["models"])
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_title(f"{w}, {t} thread(s)", fontsize=9)
    axes_list = list(axes) if len(panels) > 1 else [axes]
    axes_list[0].set_ylabel("speed-up over dense PyTorch eager")
    axes_list[0].legend(fontsize=8)
    fig.suptitle(f"MiniLM-L6 SST-2 on {record['machine']['processor']} ({record['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="development: 200 dev rows, 2 rounds, batch 8 instead of 32")
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds (median)")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    p.add_argument("--samples", type=int, default=512, help="calibration rows of train.tsv")
    p.add_argument("--work", type=Path, default=HERE / ".cache" / "deploy", help="folder for the compressed and exported models (reused)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import onnxruntime
    import transformers

    transformers.logging.set_verbosity_error()
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    reps = 2 if args.quick else args.reps
    threads = [int(t) for t in args.threads.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    folders = build(args.work, args.samples)
    paths = export_all(folders, args.work)
    target_keep = {name: json.loads((f / "config.json").read_text())["quantization_config"]["target_keep"] for name, f in folders.items() if name != "dense"}
    acc = accuracies(paths, 200 if args.quick else None)
    inputs = batches(load_model(MODEL, need_tokenizer=True).tokenizer, [8 if args.quick else 32, 1])
    rows = throughput(paths, inputs, threads, reps)
    bound_rows = bounds(paths, inputs, threads, reps, target_keep)
    record = {
        "command": "python benchmarks/deploy.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "versions": {"onnxruntime": onnxruntime.__version__},
        "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "models": list(folders), "compress_options": FAST, "target_keep": target_keep, "reps": reps,
        "dev_rows": 200 if args.quick else 872, "accuracy": {f"{k[0]}/{k[1]}": v for k, v in acc.items()},
        "throughput": rows, "bounds": bound_rows, "seconds_total": round(time.perf_counter() - start, 1),
    }
    record["targets"] = targets(record)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("deploy-quick" if args.quick else "deploy")
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(record), encoding="utf-8")
    plot(record, stem.with_suffix(".png"))
    print(markdown(record))


if __name__ == "__main__":
    main()
