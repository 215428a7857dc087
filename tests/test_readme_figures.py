"""The README's figures are what its commands give, and its links lead somewhere.

Runs the README's encoder command (default fwsvd at keep 0.3 on the reference MiniLM-L6 SST-2
classifier, the command line's defaults for everything else) from scratch and checks that its dev
accuracy is the figure in ``benchmarks/results/encoder-sst2.json``, in the README's headline table
and in the full table of ``docs/encoders.md``. Needs the project's ``../shared`` folder (model and
data); skips with a message without it. Also checks that every relative link in the README and
``docs/*.md`` names a file or folder that exists.
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


def default_row() -> dict:
    """The default fwsvd row at ``KEEP`` of ``benchmarks/results/encoder-sst2.json``."""
    record = json.loads((ROOT / "benchmarks" / "results" / "encoder-sst2.json").read_text(encoding="utf-8"))
    return next(r for r in record["rows"] if r["label"] == f"fwsvd-{CompressConfig(method='fwsvd').resolved_allocation()}" and r["keep"] == KEEP)


def check_tables(accuracy: float) -> None:
    """The README's headline table and docs/encoders.md's full table show ``accuracy`` in bold at ``KEEP``."""
    for page in ("README.md", "docs/encoders.md"):
        text = (ROOT / page).read_text(encoding="utf-8")
        line = next((l for l in text.splitlines() if re.match(rf"\|\s*{KEEP}\s*\|", l) and "**" in l), None)
        assert line is not None, f"{page}: no table row for keep {KEEP} with a bold (default fwsvd) figure"
        assert f"**{accuracy:.3f}**" in line, (page, line)


def test_readme_and_docs_tables_show_the_results_file():
    check_tables(default_row()["accuracy"])


@pytest.mark.skipif(not (MODEL / "config.json").is_file() or not DEV.is_file(), reason="needs ../shared (reference model and SST-2)")
def test_readme_encoder_row_matches_a_fresh_run(tmp_path, capsys):
    row = default_row()
    out = tmp_path / "small"
    assert main(["compress", str(MODEL), "--out", str(out), "--method", "fwsvd", "--keep", str(KEEP), "--data", str(TRAIN), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(DEV), "--json", "--quiet"]) == 0
    accuracy = json.loads(capsys.readouterr().out)["accuracy"]
    # Deterministic up to float summation order: at most one of 872 sentences may flip.
    assert accuracy == pytest.approx(row["accuracy"], abs=1 / 872 + 1e-9)
    check_tables(row["accuracy"])


FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_relative_links_in_readme_and_docs_exist():
    broken, checked = [], 0
    for page in markdown_pages():
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
                continue  # http(s), mailto, … and anchors within the page
            path = target.split("#", 1)[0].split("?", 1)[0]
            checked += 1
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "broken relative links:\n" + "\n".join(broken)
    assert checked >= len(markdown_pages()), f"only {checked} relative links found: is the link pattern still right?"


def test_readme_quantization_row_is_the_results_file():
    """The README's --quantize headline row is benchmarks/results/quantized-smollm2.json, to the digits shown."""
    record = json.loads((ROOT / "benchmarks" / "results" / "quantized-smollm2.json").read_text(encoding="utf-8"))
    rows = {r["label"]: r for r in record["models"][0]["rows"]}
    labels = ["int4 RTN", "int4 + svd (10 %)", "int4 + svd-llm (10 %)", "int4 + fwsvd (10 %)"]
    expected = [f"{rows[l]['perplexity']:.2f} ({rows[l]['vs_dense']:.3f} ×)" for l in labels]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(l for l in readme.splitlines() if l.startswith("| 37") or l.startswith(f"| {expected[0]}"))
    cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
    assert cells == expected, (cells, expected)
    docs = (ROOT / "docs" / "quantization.md").read_text(encoding="utf-8")
    table = (ROOT / "benchmarks" / "results" / "quantized-smollm2.md").read_text(encoding="utf-8")
    assert table[table.index("| row"):].strip() in docs
