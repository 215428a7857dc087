"""Data-parallel calibration: ``fwsvd compress`` in one process against ``torchrun`` with N processes.

Runs the same compression (default method, keep 0.8, SmolLM2-135M, 16 blocks of 512 WikiText-2
tokens) once in one process and once under ``torchrun --nproc-per-node N`` (gloo on the CPU),
each process with one thread (``OMP_NUM_THREADS=1``), and records for each: wall time, the peak
resident memory of the whole process tree (sampled from /proc every 0.2 s, summed over the
processes) and of its largest process, the calibration statistics (saved with ``--save-stats``
and compared: largest difference relative to each tensor's largest magnitude), and the perplexity
of the output on WikiText-2 test blocks (``fwsvd eval --limit``). Writes
``benchmarks/results/scale-distributed.{json,md}`` with the commands, the machine and the date.

Run on an otherwise idle machine (the timings are wall clock)::

    python benchmarks/scale_distributed.py --model benchmarks/.cache/smollm2-135m \\
        --data data/wikitext-2/valid.txt --eval-data data/wikitext-2/test.txt
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fwsvd.demo import machine_info  # noqa: E402


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def run_sampled(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, peak summed RSS of its process tree and the largest single RSS (MiB)."""
    peak_sum = peak_one = 0
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_sum, peak_one
        while not stop.is_set():
            rss = [_rss_kb(p) for p in _tree(proc.pid)]
            peak_sum, peak_one = max(peak_sum, sum(rss)), max(peak_one, max(rss, default=0))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{err[-4000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_sum_mib": round(peak_sum / 1024), "peak_rss_largest_process_mib": round(peak_one / 1024), "stdout": out}


def compare_statistics(a: Path, b: Path) -> dict[str, Any]:
    """Largest difference of ``b``'s statistics from ``a``'s, relative to each tensor's largest magnitude."""
    from safetensors import safe_open

    worst, worst_key = 0.0, None
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return {"same_tensors": False}
        for key in fa.keys():
            x, y = fa.get_tensor(key).double(), fb.get_tensor(key).double()
            rel = float((x - y).abs().max() / x.abs().max().clamp_min(1e-300))
            if rel > worst:
                worst, worst_key = rel, key
        summaries = [json.loads(f.metadata()["summary"]) for f in (fa, fb)]
    return {
        "same_tensors": True,
        "max_relative_difference": worst,
        "worst_tensor": worst_key,
        "mean_loss": [s.get("mean_loss") for s in summaries],
        "tokens": [s.get("tokens") for s in summaries],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "benchmarks/.cache/smollm2-135m"))
    p.add_argument("--data", required=True, help="calibration text (WikiText-2 valid)")
    p.add_argument("--eval-data", required=True, help="perplexity text (WikiText-2 test)")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--method", default="fwsvd")
    p.add_argument("--limit", type=int, default=24, help="perplexity blocks")
    p.add_argument("--work", default=None, help="folder for the outputs (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/scale-distributed"))
    p.add_argument("--single-from", default=None, metavar="JSON",
                   help="take the single-process row (and its statistics file) from an earlier result instead of rerunning it")
    args = p.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="fwsvd-scale-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    common = ["compress", args.model, "--method", args.method, "--keep", str(args.keep), "--data", args.data,
              "--samples", str(args.samples), "--max-length", str(args.max_length), "--overwrite", "--quiet", "--json"]
    if args.method == "fwsvd":
        # Like for like under torchrun, which keeps the break-even rule (no held-out choice) and, here, the
        # covariance on the Fisher's blocks: what both modes did before the 2026-12-04 defaults.
        common += ["--cov-samples", str(args.samples), "--dense-choice", "break-even"]
    modes = {
        "single process": [sys.executable, "-m", "fwsvd"],
        f"torchrun {args.procs} processes": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.procs), "-m", "fwsvd"],
    }
    rows = []
    if args.single_from:
        earlier = json.loads(Path(args.single_from).read_text(encoding="utf-8"))
        rows.append({**earlier["modes"][0], "from_earlier_run": earlier["date"]})
        modes.pop("single process")
    for label, launcher in modes.items():
        slug = label.split()[0]
        out, stats = work / f"out-{slug}", work / f"stats-{slug}.safetensors"
        cmd = [*launcher, *common, "--out", str(out), "--save-stats", str(stats)]
        print(f"{label}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        measured = run_sampled(cmd, env)
        report = json.loads(measured.pop("stdout").strip().splitlines()[-1])
        ev = subprocess.run([sys.executable, "-m", "fwsvd", "eval", str(out), "--data", args.eval_data, "--limit", str(args.limit),
                             "--max-length", str(args.max_length), "--json", "--quiet"], env=os.environ | {"PYTHONPATH": env["PYTHONPATH"]},
                            capture_output=True, text=True, check=True)
        ppl = json.loads(ev.stdout)["perplexity"]
        row = {
            "mode": label, "command": shlex.join(cmd), **measured,
            "seconds_calibration": report["seconds_calibration"], "seconds_factorize": report["seconds_factorize"],
            "model_keep": round(report["model_keep"], 4), "perplexity": round(ppl, 4), "stats": str(stats),
        }
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    same = compare_statistics(Path(rows[0]["stats"]), Path(rows[1]["stats"]))
    result = {
        "benchmark": "scale-distributed",
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {k: getattr(args, k) for k in ("model", "data", "eval_data", "procs", "samples", "max_length", "keep", "method", "limit")},
        "threads_per_process": 1,
        "modes": rows,
        "statistics_vs_single_process": same,
        "speedup": round(rows[0]["seconds"] / rows[1]["seconds"], 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = [
        "| mode | wall s | calibration s | factorization s | peak RSS, all processes MiB | peak RSS, largest process MiB | perplexity |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['seconds']} | {r['seconds_calibration']:.1f} | {r['seconds_factorize']:.1f} | {r['peak_rss_sum_mib']} | {r['peak_rss_largest_process_mib']} | {r['perplexity']:.2f} |")
    m = result["machine"]
    lines += ["", f"`{result['command']}` — {result['date']}; {m['processor']}, {m['cpu_count']} CPUs, load {m['load_average_1min']}; "
              f"one thread per process. Statistics of the {args.procs}-process run vs one process: largest relative difference "
              f"{same.get('max_relative_difference', float('nan')):.2e} ({same.get('worst_tensor')})."]
    table = "\n".join(lines)
    Path(args.out + ".md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
