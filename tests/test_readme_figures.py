"""The README's figures are what its commands give: one encoder row, rerun through the command line.

Runs the README's encoder command (default fwsvd at keep 0.3 on the reference MiniLM-L6 SST-2
classifier, the command line's defaults for everything else) from scratch and checks that its dev
accuracy is the figure in ``benchmarks/results/encoder-sst2.json`` and in the README's table. Needs
the project's ``../shared`` folder (model and data); skips with a message without it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fwsvd.config import CompressConfig
from fwsvd.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "minilm-l6-sst2"
TRAIN = SHARED / "data" / "sst2" / "train.tsv"
DEV = SHARED / "data" / "sst2" / "dev.tsv"
KEEP = 0.3


@pytest.mark.skipif(not (MODEL / "config.json").is_file() or not DEV.is_file(), reason="needs ../shared (reference model and SST-2)")
def test_readme_encoder_row_matches_a_fresh_run(tmp_path, capsys):
    record = json.loads((ROOT / "benchmarks" / "results" / "encoder-sst2.json").read_text(encoding="utf-8"))
    row = next(r for r in record["rows"] if r["label"] == f"fwsvd-{CompressConfig(method='fwsvd').resolved_allocation()}" and r["keep"] == KEEP)
    out = tmp_path / "small"
    assert main(["compress", str(MODEL), "--out", str(out), "--method", "fwsvd", "--keep", str(KEEP), "--data", str(TRAIN), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(DEV), "--json", "--quiet"]) == 0
    accuracy = json.loads(capsys.readouterr().out)["accuracy"]
    # Deterministic up to float summation order: at most one of 872 sentences may flip.
    assert accuracy == pytest.approx(row["accuracy"], abs=1 / 872 + 1e-9)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(l for l in readme.splitlines() if re.match(rf"\|\s*{KEEP}\s*\|", l) and "**" in l)
    assert f"**{row['accuracy']:.3f}**" in line, line
