"""benchmarks/gpu_check.py in its CI-sized form on the CPU: every check runs and the record is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_gpu_check_tiny_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu-check.json"
    # The MiniLM folder is absent here on purpose: the row says so instead of failing (and the test stays fast).
    record = module.main(["--device", "cpu", "--size", "tiny", "--out", str(out), "--minilm", str(tmp_path / "none")])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(record, default=str))
    assert out.with_suffix(".md").read_text().count("equality") == 1
    assert record["device"] == "cpu" and record["command"].startswith("gpu_check.py --device cpu") and record["machine"]["torch"] == torch.__version__
    rows = {r["check"]: r for r in record["rows"]}
    assert set(rows) == {"equality", "minilm", "stack", "kernels"} and all(name in printed for name in rows)
    assert record["complete"] is True
    # CPU against CPU: the very same computation.
    assert rows["equality"]["ok"] and rows["equality"]["ranks_equal"] and rows["equality"]["relative_gap"] == 0.0
    assert rows["minilm"]["ok"] is None and "not available" in rows["minilm"]["result"]
    stack = rows["stack"]
    assert stack["blocks"] == 4 and stack["calibration_seconds_per_block"] > 0 and stack["factorization_seconds_per_block"] > 0
    assert stack["extrapolated_llama2_7b_seconds"] > 0 and stack["peak_gpu_bytes"] is None
    kernels = rows["kernels"]["results"]
    # Every shape x workload x rank is timed, at the ranks the fractions of break-even name.
    assert len(kernels) == 3 * 2 * 3 and all(k["dense_us"] > 0 and k["low_rank_us"] > 0 and k["speedup"] > 0 for k in kernels)
    assert {(k["out"], k["in"]) for k in kernels} == {(64, 64), (172, 64), (64, 172)}
    assert all(k["rank"] == max(1, round(k["fraction_of_break_even"] * k["out"] * k["in"] / (k["out"] + k["in"]))) for k in kernels)
    assert "speed-up" in out.with_suffix(".md").read_text()
