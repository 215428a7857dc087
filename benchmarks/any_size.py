"""Compress once, any size: SmolLM2-135M's any-size folder resized to several keeps, against direct compression.

    python benchmarks/any_size.py [--keeps 0.9,0.8,0.6]

Protocol of the decoder benchmark (``benchmarks/decoder.py``): SmolLM2-135M from
``benchmarks/.cache/smollm2-135m``, default fwsvd (Fisher per output over whitened inputs, global
ranks), calibration 16 x 512 tokens of WikiText-2 valid (seed 0) done ONCE and shared by every row,
perplexity on the first 24 x 512 tokens of WikiText-2 test. For each keep: a direct compression
(``fwsvd.compress``), and ``fwsvd.load(ANY, keep=K)`` of the one any-size folder (timed from the
folder on disk to the model in memory). Writes ``benchmarks/results/any-size-smollm2.{json,md}``
with the command, machine and date; the any-size and dense folders' sizes on disk. Not a test.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import fwsvd  # noqa: E402
from fwsvd.compression.any_size import compress_any_size  # noqa: E402
from fwsvd.config import CompressConfig  # noqa: E402
from fwsvd.demo import machine_info  # noqa: E402
from fwsvd.evaluation.evaluate import EvalConfig, evaluate  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
MODEL = HERE / ".cache" / "smollm2-135m"
VALID = SHARED / "data" / "wikitext-2" / "valid.txt"
TEST = SHARED / "data" / "wikitext-2" / "test.txt"
log = logging.getLogger("any_size")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


def _ppl(lm) -> float:
    return float(evaluate(lm, EvalConfig(data=str(TEST), limit=24, max_length=512), progress=False)["perplexity"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", default="0.9,0.8,0.6")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fwsvd").setLevel(logging.WARNING)
    if not (MODEL / "config.json").is_file():
        print(f"{MODEL} not found: run benchmarks/decoder.py once", file=sys.stderr)
        return 2
    keeps = [float(k) for k in args.keeps.split(",")]
    start_all = time.perf_counter()
    dense = fwsvd.load_model(MODEL)
    config = CompressConfig(method="fwsvd")
    t0 = time.perf_counter()
    stats = fwsvd.calibrate(dense, fwsvd.CalibrationConfig(data=str(VALID), samples=16, cov_samples=16, max_length=512, batch_size=4, seed=0),
                            config.needs(dense.task), progress=False)
    calibration_s = time.perf_counter() - t0
    dense_ppl = _ppl(dense)
    log.info("dense %.4f, calibration %.1f s", dense_ppl, calibration_s)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fwsvd-any-size-") as scratch:
        folder = Path(scratch) / "any"
        lm = copy.deepcopy(dense)
        t0 = time.perf_counter()
        summary = compress_any_size(lm.model, config, stats, task=lm.task, progress=False)
        fwsvd.save(lm.model, folder, lm.tokenizer)
        any_s = time.perf_counter() - t0
        del lm
        sizes = {"dense_folder_bytes": _folder_bytes(MODEL), "any_size_folder_bytes": _folder_bytes(folder)}
        log.info("any size: %.1f s, folder %.3f of dense", any_s, sizes["any_size_folder_bytes"] / sizes["dense_folder_bytes"])
        for keep in keeps:
            direct = copy.deepcopy(dense)
            t0 = time.perf_counter()
            report = fwsvd.compress(direct.model, CompressConfig(method="fwsvd", keep=keep), stats, task=direct.task, progress=False)
            direct_s = time.perf_counter() - t0
            direct_ppl = _ppl(direct)
            direct_ranks = {r.name: r.rank for r in report.layers}
            del direct
            t0 = time.perf_counter()
            resized = fwsvd.load_model(folder)
            from fwsvd.compression.any_size import resize

            resized_report = resize(resized.model, keep)
            resize_s = time.perf_counter() - t0
            resized_ppl = _ppl(resized)
            same = direct_ranks == {r.name: r.rank for r in resized_report.layers}
            rows.append({"keep": keep, "direct_perplexity": direct_ppl, "direct_seconds": round(direct_s, 1), "resized_perplexity": resized_ppl,
                         "resize_seconds": round(resize_s, 2), "relative_difference": resized_ppl / direct_ppl - 1, "same_ranks": same,
                         "target_keep": report.target_keep})
            log.info("keep %g: direct %.4f (%.1f s), resized %.4f (%.2f s), ranks equal %s", keep, direct_ppl, direct_s, resized_ppl, resize_s, same)
            del resized
    result = {
        "command": "python benchmarks/any_size.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
        "dense_perplexity": dense_ppl, "calibration_seconds": round(calibration_s, 1), "any_size_seconds": round(any_s, 1),
        "factorize_seconds": summary["seconds_factorize"], **sizes, "rows": rows, "seconds": round(time.perf_counter() - start_all, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "any-size-smollm2.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    m = result["machine"]
    lines = [
        f"# {__doc__.splitlines()[0]}", "",
        f"`{result['command'].strip()}` on {result['date']}, {m.get('processor', '')} x{m.get('cpu_count', '')} CPUs, torch {m.get('torch', '')}, {result['seconds']} s", "",
        f"Dense perplexity {dense_ppl:.4f}; any-size folder {sizes['any_size_folder_bytes']:,} bytes against the dense folder's "
        f"{sizes['dense_folder_bytes']:,} ({sizes['any_size_folder_bytes'] / sizes['dense_folder_bytes']:.3f} x), made in {any_s:.1f} s after a "
        f"{calibration_s:.1f} s calibration.", "",
        "| keep | direct compression | resized from the any-size folder | difference | resize time | same ranks |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['keep']:g} | {r['direct_perplexity']:.4f} ({r['direct_seconds']:.0f} s) | {r['resized_perplexity']:.4f} | "
                     f"{100 * r['relative_difference']:+.3f} % | {r['resize_seconds']:.2f} s | {r['same_ranks']} |")
    (out / "any-size-smollm2.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
