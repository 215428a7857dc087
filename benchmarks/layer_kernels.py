"""Kernel benchmark: at which rank a low-rank layer stops being faster than its dense form, on this CPU.

    python benchmarks/layer_kernels.py            # SmolLM2-135M and MiniLM-L6 layer shapes (about 5 min on 2 cores)
    python benchmarks/layer_kernels.py --quick    # fewer repetitions

For every layer shape of the benchmark models and every workload (tokens per call: 1 and 8 for
decoding at batch 1 and 8, 512 for a prefill, 4096 for the encoder's 32 x 128 batch), the dense
product ``x W^T`` is timed against the two thin products ``(x B^T) A^T`` at ranks that are a
fraction of the shape's break-even rank ``out * in / (out + in)`` (where both hold the same
parameters). The weights of many copies of the layer are cycled through, more than the CPU's
caches hold, as in a real model whose weights stream from memory at every token. Times are
interleaved (dense, then each rank, round after round) and each speed-up is the median over the
rounds of dense time / low-rank time.

Two results feed the library:

* the **speed break-even**: the fraction of the break-even rank from which the low-rank form is
  slower than dense, the smallest over every workload and shape (rounded down to 0.05), which
  ``fwsvd compress --dense-above`` takes (global allocation keeps a matrix dense above it);
* whether ranks that are multiples of 8, 16, 32 or 64 run faster than their neighbours (the
  ``rank multiple`` table: time per unit of rank at ``r`` against ``r - 1`` ... ``r - 7``).

Writes ``benchmarks/results/kernels.{json,md}`` with the command, machine and date. Not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fwsvd.demo import machine_info  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STEM = "kernels"

#: (model, layer kind, out, in): the targeted shapes of the two benchmark models.
SHAPES = [
    ("SmolLM2-135M", "q/o", 576, 576),
    ("SmolLM2-135M", "k/v", 192, 576),
    ("SmolLM2-135M", "gate/up", 1536, 576),
    ("SmolLM2-135M", "down", 576, 1536),
    ("MiniLM-L6", "q/k/v/o", 384, 384),
    ("MiniLM-L6", "intermediate", 1536, 384),
    ("MiniLM-L6", "output", 384, 1536),
]
#: Tokens per call and what they stand for.
WORKLOADS = {1: "decode, batch 1", 8: "decode, batch 8", 512: "prefill 512", 4096: "encoder 32x128"}
FRACTIONS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
#: Bytes of weights cycled through per timing: well above the 32 MiB L3 of this machine.
STREAM_BYTES = 96 << 20


def _copies(out_f: int, in_f: int, rank: int | None) -> int:
    per = out_f * in_f * 4 if rank is None else rank * (out_f + in_f) * 4
    return max(2, STREAM_BYTES // per)


def _layer_time(x: torch.Tensor, weights: list[Any], calls: int) -> float:
    """Seconds per call of the layer, cycling through ``weights`` (dense W or (B, A) pairs)."""
    n = len(weights)
    with torch.inference_mode():
        start = time.perf_counter()
        for c in range(calls):
            w = weights[c % n]
            if isinstance(w, tuple):
                F.linear(F.linear(x, w[0]), w[1])
            else:
                F.linear(x, w)
        return (time.perf_counter() - start) / calls


def crossover(fractions: list[float], speedups: list[float]) -> float:
    """The fraction of the break-even rank at which the low-rank form becomes as slow as dense.

    The low-rank time is close to linear in the rank (two products whose cost grows with it, plus a
    fixed overhead), so ``dense / low-rank`` is modelled as ``1 / (a + b f)`` and the line
    ``a + b f`` is fitted to the measured time ratios by least squares; the crossover is where it
    reaches 1. A fit through every point rides over single noisy timings of a shared machine.
    Clamped to ``[0, 1.5]``; 1.5 when the time does not grow with the rank.
    """
    n = len(fractions)
    ratios = [1.0 / s for s in speedups]
    mf, mr = sum(fractions) / n, sum(ratios) / n
    var = sum((f - mf) ** 2 for f in fractions)
    b = sum((f - mf) * (r - mr) for f, r in zip(fractions, ratios)) / var
    a = mr - b * mf
    if b <= 0:
        return 1.5
    return min(1.5, max(0.0, (1 - a) / b))


def measure_shape(out_f: int, in_f: int, tokens: int, reps: int, budget_s: float) -> dict[str, Any]:
    even = out_f * in_f / (out_f + in_f)
    ranks = [max(1, int(f * even)) for f in FRACTIONS]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_f, generator=gen)
    dense = [torch.randn(out_f, in_f, generator=gen) for _ in range(_copies(out_f, in_f, None))]
    low = {r: [(torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)) for _ in range(_copies(out_f, in_f, r))] for r in ranks}
    # Calls per timing: enough for ~budget_s / (reps * variants) seconds each.
    probe = _layer_time(x, dense, 3)
    calls = max(3, int(budget_s / (reps * (len(ranks) + 1)) / max(probe, 1e-6)))
    _layer_time(x, dense, calls)  # warm-up
    times: dict[str, list[float]] = {"dense": [], **{str(r): [] for r in ranks}}
    for _ in range(reps):
        times["dense"].append(_layer_time(x, dense, calls))
        for r in ranks:
            times[str(r)].append(_layer_time(x, low[r], calls))
    speedups = [statistics.median(d / t for d, t in zip(times["dense"], times[str(r)])) for r in ranks]
    return {
        "out": out_f, "in": in_f, "tokens": tokens, "break_even_rank": round(even, 1), "ranks": ranks,
        "fractions": FRACTIONS, "speedups": [round(s, 3) for s in speedups], "calls": calls,
        "dense_us": round(1e6 * statistics.median(times["dense"]), 2),
        "crossover": round(crossover(FRACTIONS, speedups), 3),
        "times_us": {k: round(1e6 * statistics.median(v), 2) for k, v in times.items()},
    }


def measure_multiples(out_f: int, in_f: int, tokens: int, reps: int, base: int = 128) -> dict[str, Any]:
    """Seconds per unit of rank for ranks base-7 ... base+8: are multiples of 8/16/32/64 cheaper?"""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, in_f, generator=gen)
    ranks = list(range(base - 8, base + 9))
    low = {r: [(torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)) for _ in range(_copies(out_f, in_f, r))] for r in ranks}
    probe = _layer_time(x, low[base], 3)
    calls = max(3, int(20.0 / (reps * len(ranks)) / max(probe, 1e-6)))
    per: dict[int, list[float]] = {r: [] for r in ranks}
    for _ in range(reps):
        for r in ranks:
            per[r].append(_layer_time(x, low[r], calls) / r)
    unit = {r: statistics.median(v) for r, v in per.items()}
    others = statistics.median(unit[r] for r in ranks if r % 8)
    return {
        "out": out_f, "in": in_f, "tokens": tokens, "ranks": ranks, "us_per_rank": [round(1e6 * unit[r], 4) for r in ranks],
        # Per multiple: time per rank at the multiples of it, over that of the ranks that are not multiples of 8.
        "relative_to_odd": {m: round(statistics.median(unit[r] for r in ranks if r % m == 0) / others, 3) for m in (8, 16, 32, 64)},
    }


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "# Kernel benchmark: low-rank against dense, per layer shape",
        "",
        f"- `{record['command']}` — {record['date']}, load average {record['load_average_before']} at start, {record['load_average_after']} at the end",
        "",
        f"{record['machine']['processor']}, {record['machine']['cpu_count']} CPUs, torch {record['machine']['torch']}; "
        f"{record['threads']} thread(s); {record['seconds']:.0f} s.",
        "",
        "Speed-up of the two thin products over the dense one (median over interleaved rounds), at ranks that are a "
        "fraction of the break-even rank out·in/(out+in); crossover = where a line fitted to the time ratios "
        "(low-rank / dense against the fraction) reaches 1.",
        "",
        "| model | layer | shape | workload | " + " | ".join(f"{f:g}" for f in FRACTIONS) + " | crossover |",
        "|---|---|---|---|" + "---|" * len(FRACTIONS) + "---|",
    ]
    for row in record["shapes"]:
        lines.append(
            f"| {row['model']} | {row['kind']} | {row['out']}x{row['in']} | {WORKLOADS[row['tokens']]} | "
            + " | ".join(f"{s:.2f}" for s in row["speedups"]) + f" | {row['crossover']:.2f} |"
        )
    lines += ["", f"**Speed break-even: {record['speed_break_even']:.2f}** of the break-even rank "
              f"(the smallest crossover over the {record['rule_workloads']} rows, rounded down to 0.05).", ""]
    if record.get("multiples"):
        lines += ["Rank multiples: time per unit of rank at multiples of m over ranks that are not multiples of 8 (< 1: faster).", "",
                  "| shape | workload | m=8 | m=16 | m=32 | m=64 |", "|---|---|---|---|---|---|"]
        for row in record["multiples"]:
            rel = row["relative_to_odd"]
            lines.append(f"| {row['out']}x{row['in']} | {WORKLOADS[row['tokens']]} | " + " | ".join(f"{rel.get(m, rel.get(str(m))):.3f}" for m in (8, 16, 32, 64)) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 repetitions and shorter timings")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    budget = 2.0 if args.quick else 6.0
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for model, kind, out_f, in_f in SHAPES:
        for tokens in ((1, 8, 512) if model.startswith("SmolLM2") else (4096,)):
            row = {"model": model, "kind": kind, **measure_shape(out_f, in_f, tokens, reps, budget)}
            print(f"{model} {kind} {out_f}x{in_f} tokens {tokens}: speed-ups {row['speedups']} crossover {row['crossover']}", flush=True)
            rows.append(row)
    multiples = []
    for out_f, in_f in ((576, 576), (1536, 576)):
        for tokens in (1, 512):
            m = measure_multiples(out_f, in_f, tokens, reps)
            print(f"multiples {out_f}x{in_f} tokens {tokens}: {m['relative_to_odd']}", flush=True)
            multiples.append(m)
    record = {
        "command": "python " + " ".join([os.path.relpath(__file__, Path.cwd()) if Path(__file__).is_relative_to(Path.cwd()) else __file__, *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "threads": args.threads,
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - started, 1),
        "shapes": rows,
        "multiples": multiples,
        "rule_workloads": len(rows),
        "speed_break_even": math.floor(20 * min(r["crossover"] for r in rows)) / 20,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{STEM}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (args.out / f"{STEM}.md").write_text(markdown(record), encoding="utf-8")
    print(markdown(record))
    print(f"wrote {args.out / STEM}.{{json,md}} in {record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
