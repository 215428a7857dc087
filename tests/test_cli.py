"""Tests for the ``fwsvd`` command line, run in-process through ``fwsvd.cli.main`` (plus one subprocess)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import folder_digest, make_bert, save_model
from conftest import run_cli as run

import fwsvd
from fwsvd.storage.loading import load_model
from fwsvd.nn import LowRankLinear

SMALL = ["--quiet", "--max-length", "16", "--batch-size", "8"]
CAUSAL = ["--quiet", "--max-length", "16", "--batch-size", "2", "--samples", "4"]
_BAR = re.compile(r"\d+%\|.*\|")  # a tqdm progress bar line


def error_lines(err: str) -> list[str]:
    """Non-empty stderr lines, progress bars stripped (there should be none with --quiet)."""
    lines = []
    for line in err.splitlines():
        line = line.split("\r")[-1].strip()
        if line and not _BAR.search(line):
            lines.append(line)
    return lines


def assert_one_line_error(status: int, err: str, *needles: str) -> None:
    assert status != 0
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("fwsvd: error:"), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])


# --- fixtures: broken inputs, written once ---------------------------------------------------------


@pytest.fixture(scope="module")
def bad(tmp_path_factory, sst2_tsv):
    """Folders and files that the CLI must reject with one line."""
    root = tmp_path_factory.mktemp("bad")
    paths = {"missing_model": root / "no-such-model"}

    unreadable = root / "unreadable"
    unreadable.mkdir()
    (unreadable / "config.json").write_text('{"architectures": ["BertForSequenceClassification"], ', encoding="utf-8")
    paths["unreadable_model"] = unreadable

    paths["no_blocks_model"] = save_model(make_bert(num_hidden_layers=0), root / "no-blocks")

    nan_model = make_bert()
    with torch.no_grad():
        nan_model.bert.encoder.layer[0].attention.self.query.weight[0, 0] = math.nan
    paths["nan_model"] = save_model(nan_model, root / "nan-model")

    def write(name: str, text: str) -> Path:
        path = root / name
        path.write_text(text, encoding="utf-8")
        return path

    rows = sst2_tsv.read_text(encoding="utf-8").splitlines()[1:]
    paths["empty_tsv"] = write("empty.tsv", "")
    paths["empty_txt"] = write("empty.txt", "")
    paths["unlabelled_tsv"] = write("unlabelled.tsv", "sentence\n" + "\n".join(r.split("\t")[0] for r in rows) + "\n")
    paths["label7_tsv"] = write("label7.tsv", "sentence\tlabel\n" + "".join(f"{r.split(chr(9))[0]}\t{7 if i == 3 else i % 2}\n" for i, r in enumerate(rows)))
    return paths


@pytest.fixture
def occupied_out(tmp_path) -> Path:
    """An existing, non-empty output folder whose contents must survive every failed run."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("do not touch", encoding="utf-8")
    (out / "sub").mkdir()
    (out / "sub" / "model.safetensors").write_bytes(b"\x00" * 64)
    return out


# --- end to end ----------------------------------------------------------------------------------------


def test_help_and_version(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0 and "compress" in out and "eval" in out and "inspect" in out
    status, out, _ = run(capsys, "compress", "--help")
    assert status == 0 and "--keep" in out and "STAYS" in out  # help text reused from CompressConfig
    status, out, _ = run(capsys, "--version")
    assert status == 0 and fwsvd.__version__ in out


def test_usage_error_is_one_line(capsys):
    status, _, err = run(capsys, "compress", "model", "--keep", "abc", "--out", "x")
    assert status == 2 and "Traceback" not in err
    assert len(error_lines(err)) == 1 and "--keep" in err


def test_bert_compress_eval_inspect(capsys, tmp_path, bert_dir, sst2_tsv):
    out = tmp_path / "compressed"
    before = folder_digest(bert_dir)
    status, stdout, err = run(
        capsys, "compress", bert_dir, "--out", out, "--method", "fwsvd", "--keep", "0.5", "--data", sst2_tsv, "--samples", "16", "--json", *SMALL
    )
    assert status == 0, err
    assert error_lines(err) == []  # --quiet: nothing on stderr on success
    report = json.loads(stdout)
    assert report["method"] == "fwsvd" and report["task"] == "sequence-classification"
    assert abs(report["target_keep"] - 0.5) <= 0.05  # tiny layers: a rank is ~3-6 % of a layer
    assert report["parameters"] < report["dense_parameters"]
    assert Path(report["out"]) == out and (out / "config.json").is_file()
    assert folder_digest(bert_dir) == before  # the input model is never written to

    status, stdout, err = run(capsys, "eval", out, "--data", sst2_tsv, "--json", *SMALL)
    assert status == 0, err
    metrics = json.loads(stdout)
    assert {"accuracy", "f1", "mcc", "metric", "n"} <= metrics.keys()
    assert metrics["n"] == 40 and metrics["metric"] == "accuracy"
    assert 0 <= metrics["accuracy"] <= 1 and -1 <= metrics["mcc"] <= 1

    status, stdout, err = run(capsys, "inspect", out, "--json", "--quiet")
    assert status == 0, err
    info = json.loads(stdout)
    assert {"parameters", "dense_parameters", "target_keep", "ranks"} <= info.keys()
    assert info["parameters"] == report["parameters"] and info["dense_parameters"] == report["dense_parameters"]
    assert info["target_keep"] == pytest.approx(report["target_keep"])
    assert info["ranks"] == {row["name"]: row["rank"] for row in report["layers"] if row["rank"] is not None}

    # Human output: tables, not JSON.
    status, stdout, _ = run(capsys, "inspect", out, "--quiet")
    assert status == 0 and "target keep" in stdout and "bert.encoder.layer.0.attention.self.query" in stdout
    status, stdout, _ = run(capsys, "eval", bert_dir, "--data", sst2_tsv, *SMALL)
    assert status == 0 and "accuracy *" in stdout


def test_causal_compress_and_perplexity(capsys, tmp_path, llama_dir, corpus_txt):
    out = tmp_path / "llama"
    status, stdout, err = run(capsys, "compress", llama_dir, "--out", out, "--method", "svd-llm", "--keep", "0.4", "--data", corpus_txt, "--json", *CAUSAL)
    assert status == 0, err
    report = json.loads(stdout)
    assert report["task"] == "causal-lm" and report["calibration"]["samples"] == 4
    status, stdout, err = run(capsys, "eval", out, "--data", corpus_txt, "--json", "--quiet", "--max-length", "16")
    assert status == 0, err
    result = json.loads(stdout)
    assert result["metric"] == "perplexity" and result["n"] == 37  # 600 words / 16 tokens per block
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1
    assert result["nll"] == pytest.approx(math.log(result["perplexity"]), rel=1e-6)


def test_sequential_compress_reloads_with_same_ranks(capsys, tmp_path, llama_dir, corpus_txt):
    one_pass, sequential = tmp_path / "one", tmp_path / "seq"
    for out, extra in ((one_pass, ()), (sequential, ("--sequential",))):
        status, stdout, err = run(capsys, "compress", llama_dir, "--out", out, "--method", "svd-llm", "--keep", "0.4", "--data", corpus_txt, "--json", *CAUSAL, *extra)
        assert status == 0, err
    status, stdout, err = run(capsys, "inspect", sequential, "--json")
    assert status == 0, err
    seq = json.loads(stdout)
    status, stdout, _ = run(capsys, "inspect", one_pass, "--json")
    assert seq["ranks"] == json.loads(stdout)["ranks"] and seq["calibration"].get("sequential") is True
    status, stdout, err = run(capsys, "compress", llama_dir, "--out", tmp_path / "f", "--method", "fwsvd", "--keep", "0.4", "--data", corpus_txt,
                              "--sequential", "--refit", "--allocation", "global", "--json", *CAUSAL)
    assert status == 0, err
    record = json.loads(stdout)
    assert record["calibration"]["sequential"] is True and record["calibration"]["refit"]["layers"] > 0


def test_saved_statistics_are_reused(capsys, tmp_path, bert_dir, sst2_tsv):
    stats = tmp_path / "stats.safetensors"
    first, second = tmp_path / "a", tmp_path / "b"
    common = ["--method", "asvd", "--keep", "0.3", "--json", *SMALL]
    status, _, err = run(capsys, "compress", bert_dir, "--out", first, "--data", sst2_tsv, "--save-stats", stats, *common)
    assert status == 0, err
    assert stats.is_file()
    status, _, err = run(capsys, "compress", bert_dir, "--out", second, "--stats", stats, *common)
    assert status == 0, err
    a, b = fwsvd.load(first).state_dict(), fwsvd.load(second).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # same statistics, same factors, bit for bit


def test_fisher_whitening_flag_is_recorded_and_changes_the_factors(capsys, tmp_path, bert_dir, sst2_tsv):
    outs = {}
    for whiten in ("on", "off"):
        out = tmp_path / whiten
        status, text, err = run(capsys, "compress", bert_dir, "--out", out, "--method", "fwsvd", "--fisher-whiten", whiten,
                                "--keep", "0.3", "--data", sst2_tsv, "--allocation", "uniform", "--json", *SMALL)
        assert status == 0, err
        report = json.loads(text)
        assert report["method_options"]["whiten"] == whiten and report["method_options"]["reduction"] == "out"
        assert set(report["calibration"]["kinds"]) == ({"fisher", "cov"} if whiten == "on" else {"fisher"})
        outs[whiten] = fwsvd.load(out).state_dict()
    name = next(k for k in outs["on"] if k.endswith("intermediate.dense.weight_in"))
    assert not torch.allclose(outs["on"][name], outs["off"][name])


def test_fisher_labels_flag_is_recorded(capsys, tmp_path, bert_dir, sst2_tsv):
    out = tmp_path / "model-labels"
    status, text, err = run(capsys, "compress", bert_dir, "--out", out, "--method", "fwsvd", "--fisher-labels", "model",
                            "--keep", "0.5", "--data", sst2_tsv, "--samples", "16", "--json", *SMALL)
    assert status == 0, err
    assert json.loads(text)["calibration"]["fisher_labels"] == "model"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]["fisher_labels"] == "model"
    status, _, err = run(capsys, "compress", bert_dir, "--out", tmp_path / "x", "--fisher-labels", "true", *SMALL)
    assert status != 0 and "invalid choice" in err


def test_dead_neuron_compresses_to_finite_weights(capsys, tmp_path, sst2_tsv):
    model = make_bert()
    layer = model.bert.encoder.layer[1]
    with torch.no_grad():  # unit 5 of the FFN: zero in, zero out -> zero gradient, zero Fisher
        layer.intermediate.dense.weight[5].zero_()
        layer.intermediate.dense.bias[5] = 0.0
        layer.output.dense.weight[:, 5].zero_()
    source = save_model(model, tmp_path / "dead")
    out = tmp_path / "out"
    status, _, err = run(
        capsys, "compress", source, "--out", out, "--method", "fwsvd", "--fisher-reduction", "both", "--keep", "0.3", "--data", sst2_tsv, *SMALL
    )
    assert status == 0, err
    loaded = fwsvd.load(out)
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())
    for name, p in loaded.named_parameters():
        assert torch.isfinite(p).all(), name


# --- bad inputs: one line, non-zero exit, nothing on disk touched --------------------------------------

BAD_CASES = {
    # id: (model key or fixture name, extra args, words the message must contain)
    "missing-model": ("missing_model", ["--method", "svd"], ["does not exist"]),
    "unreadable-config": ("unreadable_model", ["--method", "svd"], ["config.json"]),
    "include-matches-nothing": ("bert", ["--method", "svd", "--include", "nothing.*"], ["no supported linear layers"]),
    "include-matches-nothing-fwsvd": ("bert", ["--method", "fwsvd", "--data", "@sst2", "--include", "nothing.*"], ["no supported linear layers"]),
    "model-without-blocks": ("no_blocks_model", ["--method", "svd"], ["no supported linear layers"]),
    "keep-0": ("bert", ["--method", "svd", "--keep", "0"], ["--keep 0"]),
    "keep-1.5": ("bert", ["--method", "svd", "--keep", "1.5"], ["--keep 1.5"]),
    "keep-nan": ("bert", ["--method", "svd", "--keep", "nan"], ["--keep nan"]),
    "empty-data": ("bert", ["--method", "fwsvd", "--data", "@empty_tsv"], ["empty"]),
    "no-label-column": ("bert", ["--method", "fwsvd", "--data", "@unlabelled_tsv"], ["label"]),
    "unknown-text-column": ("bert", ["--method", "fwsvd", "--data", "@sst2", "--text-column", "review"], ["review"]),
    "label-outside-classes": ("bert", ["--method", "fwsvd", "--data", "@label7_tsv"], ["label 7", "outside"]),
    "nan-weights-svd": ("nan_model", ["--method", "svd"], ["nan", "layer.0.attention.self.query"]),
    "nan-weights-fwsvd": ("nan_model", ["--method", "fwsvd", "--data", "@sst2"], ["nan"]),
    "empty-text-causal": ("llama", ["--method", "svd-llm", "--data", "@empty_txt"], ["empty"]),
    "fwsvd-without-data": ("bert", ["--method", "fwsvd"], ["--data"]),
    "whiten-with-input-fisher": ("bert", ["--method", "fwsvd", "--fisher-reduction", "in", "--fisher-whiten", "on", "--data", "@sst2"],
                                 ["--fisher-reduction out"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_and_touches_nothing(capsys, case, bad, model_dirs, sst2_tsv, occupied_out):
    model_key, extra, needles = BAD_CASES[case]
    model = model_dirs.get(model_key) or bad[model_key]
    files = {"sst2": sst2_tsv, **bad}
    extra = [str(files[a[1:]]) if a.startswith("@") else a for a in extra]
    if "--keep" not in extra:
        extra += ["--keep", "0.5"]
    model_before = folder_digest(model) if Path(model).is_dir() else None
    out_before = folder_digest(occupied_out)
    # --overwrite: the run is allowed to replace --out, so only its own error may stop it, and a
    # failed run must still leave the old folder exactly as it was (atomic write).
    status, stdout, err = run(capsys, "compress", model, "--out", occupied_out, "--overwrite", *extra, *SMALL)
    assert_one_line_error(status, err, *needles)
    assert stdout == ""
    assert folder_digest(occupied_out) == out_before
    assert sorted(p.name for p in occupied_out.parent.iterdir()) == ["out"]  # no temporary folders left
    if model_before is not None:
        assert folder_digest(model) == model_before


def test_existing_out_without_overwrite_is_refused(capsys, bert_dir, occupied_out):
    before = folder_digest(occupied_out)
    status, _, err = run(capsys, "compress", bert_dir, "--out", occupied_out, "--method", "svd", "--keep", "0.5", *SMALL)
    assert_one_line_error(status, err, "--overwrite")
    assert folder_digest(occupied_out) == before


def test_out_equal_to_model_folder_is_refused(capsys, bert_dir):
    before = folder_digest(bert_dir)
    status, _, err = run(capsys, "compress", bert_dir, "--out", bert_dir, "--method", "svd", "--keep", "0.5", "--overwrite", *SMALL)
    assert_one_line_error(status, err, "input model folder")
    assert folder_digest(bert_dir) == before


def test_overwrite_replaces(capsys, bert_dir, occupied_out):
    status, _, err = run(capsys, "compress", bert_dir, "--out", occupied_out, "--method", "svd", "--keep", "0.5", "--overwrite", *SMALL)
    assert status == 0, err
    names = {p.name for p in occupied_out.iterdir()}
    assert "precious.txt" not in names and "sub" not in names
    assert {"config.json", "model.safetensors"} <= names
    assert sorted(p.name for p in occupied_out.parent.iterdir()) == ["out"]  # the old copy is gone too
    assert any(isinstance(m, LowRankLinear) for m in fwsvd.load(occupied_out).modules())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data", "@missing"], "not found"),
        (["--data", "@sst2", "--text-column", "review"], "review"),
        (["--data", "@label7_tsv"], "outside the model's 2 classes"),
        (["--data", "@sst2", "--limit", "0"], "limit"),
    ],
)
def test_eval_bad_input_is_one_line(capsys, bert_dir, bad, sst2_tsv, tmp_path, args, needle):
    files = {"sst2": sst2_tsv, "missing": tmp_path / "missing.tsv", **bad}
    args = [str(files[a[1:]]) if a.startswith("@") else a for a in args]
    status, stdout, err = run(capsys, "eval", bert_dir, *args, *SMALL)
    assert_one_line_error(status, err, needle)
    assert stdout == ""


def test_subprocess_error_is_one_line(tmp_path):
    """The real console entry: logging and warnings go to stderr here, unlike in-process."""
    missing = tmp_path / "no-such-model"
    proc = subprocess.run(
        [sys.executable, "-m", "fwsvd.cli", "compress", str(missing), "--out", str(tmp_path / "out"), "--keep", "0.5", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("fwsvd: error:") and "does not exist" in lines[0]
    assert not (tmp_path / "out").exists()


def compress_and_inspect(capsys, out, llama_dir, corpus_txt, keep, *options):
    """``fwsvd compress`` of the tiny Llama with fwsvd at ``keep`` and ``options``, then ``fwsvd inspect --json`` of it."""
    status, _, err = run(capsys, "compress", llama_dir, "--out", out, "--method", "fwsvd", "--keep", keep, "--data", corpus_txt,
                         *options, "--quiet", *CAUSAL)
    assert status == 0, err
    status, stdout, err = run(capsys, "inspect", out, "--json")
    assert status == 0, err
    return json.loads(stdout)


def test_inspect_shows_ranks_by_layer_type_and_depth(capsys, tmp_path, llama_dir, corpus_txt):
    out = tmp_path / "global"
    info = compress_and_inspect(capsys, out, llama_dir, corpus_txt, "0.5", "--allocation", "global")
    assert info["allocation"]["mode"] == "global"
    table = info["rank_table"]
    assert set(table) == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    for kind, entry in table.items():
        assert entry["depths"] == [0, 1]
        for depth, rank in zip(entry["depths"], entry["ranks"]):
            assert info["ranks"].get(f"model.layers.{depth}.{kind}") == rank
    status, stdout, err = run(capsys, "inspect", out)
    assert status == 0, err
    assert "allocation        global" in stdout and "rank by depth" in stdout and "q_proj" in stdout


def test_dense_above_is_recorded_and_inspected(capsys, tmp_path, llama_dir, corpus_txt):
    out = tmp_path / "fast"
    info = compress_and_inspect(capsys, out, llama_dir, corpus_txt, "0.7", "--allocation", "global", "--dense-above", "0.6")
    # With --data the default dense choice is made on held-out text (tests/test_selection.py); the rules hold either way.
    chosen = {k: info["allocation"].pop(k) for k in ("dense_choice", "dense_choice_auto")}
    assert info["allocation"] == {"mode": "global", "rank_floor": 0.5, "dense_above": 0.6}
    assert chosen["dense_choice"] in ("break-even", "loss") and chosen["dense_choice_auto"]["heldout_blocks"] >= 1
    model = load_model(out).model
    for name, rank in info["ranks"].items():
        layer = model.get_submodule(name)
        assert rank <= 0.6 * layer.out_features * layer.in_features / (layer.out_features + layer.in_features)
    status, stdout, err = run(capsys, "inspect", out)
    assert "dense above 0.6 of break-even" in stdout
    status, _, err = run(capsys, "compress", llama_dir, "--out", tmp_path / "bad", "--keep", "0.5", "--dense-above", "0", *CAUSAL)
    assert status == 2 and "--dense-above 0.0 must be a fraction in (0, 1]" in err


def test_dense_choice_is_recorded_inspected_and_refused_without_global_allocation(capsys, tmp_path, llama_dir, corpus_txt):
    out = tmp_path / "priced"
    info = compress_and_inspect(capsys, out, llama_dir, corpus_txt, "0.6", "--dense-choice", "loss")
    assert info["allocation"] == {"mode": "global", "rank_floor": 0.5, "dense_choice": "loss"}
    status, stdout, err = run(capsys, "inspect", out)
    assert "dense where the loss estimate pays for it" in stdout
    status, _, err = run(capsys, "compress", llama_dir, "--out", tmp_path / "bad", "--keep", "0.5", "--method", "svd",
                         "--dense-choice", "loss", *CAUSAL)
    assert status == 2 and "--dense-choice loss applies to global allocation" in err and not (tmp_path / "bad").exists()
