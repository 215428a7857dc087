"""Release blockers (issue 21): each case a new user met gives one line and exit 2, or now works;
nothing is lost and nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import folder_digest, make_bert, make_llama, save_model
from safetensors.torch import load_file, save_file
from test_trust import SMALL, assert_refused, run, subprocess_env, variant

import fwsvd
from fwsvd.storage.atomic import atomic_dir, check_output_file, scratch_dir
from fwsvd.errors import FwsvdError
from fwsvd.calibration.statistics import Statistics

COMMON = ["--keep", "0.5", "--quiet", "--max-length", "16", "--batch-size", "8", "--samples", "16"]


@pytest.fixture(scope="module")
def svd_dir(tmp_path_factory, bert_dir) -> Path:
    loaded = fwsvd.load_model(bert_dir)
    fwsvd.compress(loaded.model, fwsvd.CompressConfig(method="svd", keep=0.5), progress=False)
    return fwsvd.save(loaded.model, tmp_path_factory.mktemp("release") / "bert-svd", loaded.tokenizer)


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory, bert_dir, sst2_tsv) -> Path:
    root = tmp_path_factory.mktemp("stats")
    stats = root / "stats.safetensors"
    assert fwsvd.cli.main(["compress", str(bert_dir), "--out", str(root / "out"), "--data", str(sst2_tsv), "--method", "fwsvd",
                           "--save-stats", str(stats), *COMMON]) == 0
    return stats


# --- --save-stats goes through the output guard ------------------------------------------------------


@pytest.mark.parametrize("target", ["model.safetensors", "tokenizer.json", "new-inside.safetensors"])
def test_save_stats_never_writes_into_the_input_model(capsys, tmp_path, bert_dir, sst2_tsv, target):
    model = save_model(make_bert(), tmp_path / "model")
    before = folder_digest(model)
    status, out, err = run(capsys, "compress", model, "--out", tmp_path / "out", "--data", sst2_tsv, "--save-stats", model / target, "--overwrite", *COMMON)
    assert_refused(status, out, err, "--save-stats", "input model folder")
    assert folder_digest(model) == before and not (tmp_path / "out").exists()


def test_save_stats_never_replaces_the_data_or_lands_in_the_output(capsys, tmp_path, bert_dir, sst2_tsv):
    data = tmp_path / "train.tsv"
    data.write_bytes(sst2_tsv.read_bytes())
    status, out, err = run(capsys, "compress", bert_dir, "--out", tmp_path / "out", "--data", data, "--save-stats", data, "--overwrite", *COMMON)
    assert_refused(status, out, err, "--save-stats", "data file")
    assert data.read_bytes() == sst2_tsv.read_bytes()
    status, out, err = run(capsys, "compress", bert_dir, "--out", tmp_path / "out", "--data", data, "--save-stats", tmp_path / "out" / "s.safetensors", *COMMON)
    assert_refused(status, out, err, "--save-stats", "replacing it would delete it")


def test_save_stats_replaces_an_existing_file_only_with_overwrite(capsys, tmp_path, bert_dir, sst2_tsv):
    stats = tmp_path / "notes.safetensors"
    stats.write_text("my notes", encoding="utf-8")
    status, out, err = run(capsys, "compress", bert_dir, "--out", tmp_path / "out", "--data", sst2_tsv, "--save-stats", stats, *COMMON)
    assert_refused(status, out, err, "--save-stats", "exists", "--overwrite")
    assert stats.read_text(encoding="utf-8") == "my notes" and not (tmp_path / "out").exists()
    status, _, err = run(capsys, "compress", bert_dir, "--out", tmp_path / "out", "--data", sst2_tsv, "--save-stats", stats, "--overwrite", *COMMON)
    assert status == 0, err
    assert Statistics.load(stats).tensors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.safetensors", "out"], "no temporary file is left beside it"


def test_output_file_guard_refuses_folders_and_unwritable_places(tmp_path):
    with pytest.raises(FwsvdError, match="is a folder"):
        check_output_file(tmp_path, True, "--save-stats")
    with pytest.raises(FwsvdError, match="does not accept new files|not writable|read-only") as info:
        check_output_file("/proc/fwsvd-test/stats.safetensors", False, "--save-stats")
    assert "No such file" not in str(info.value)


def test_out_in_proc_says_why_in_words(capsys, tmp_path, bert_dir):
    status, out, err = run(capsys, "compress", bert_dir, "--out", "/proc/x", "--method", "svd", *COMMON)
    line = assert_refused(status, out, err, "/proc")
    assert "No such file" not in line and "does not accept new files" in line


# --- options that do not apply -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--method", "svd", "--save-stats", "{tmp}/s.safetensors"], ["svd", "--save-stats"]),
        (["--method", "svd", "--stats", "{tmp}/s.safetensors"], ["svd", "--stats"]),
        (["--method", "fwsvd", "--dense-above", "0.7", "--allocation", "uniform"], ["--dense-above", "global"]),
        (["--method", "svd", "--dense-above", "0.7"], ["--dense-above", "global"]),
        (["--method", "svd", "--rank-floor", "0.3"], ["--rank-floor", "global"]),
        (["--method", "svd", "--refit"], ["--refit", "--sequential"]),
        (["--method", "svd-llm", "--fisher-labels", "model"], ["--fisher-labels", "svd-llm"]),
        (["--method", "fwsvd", "--fisher-labels", "model", "--stats", "{tmp}/s.safetensors"], ["--fisher-labels", "--stats"]),
    ],
)
def test_options_that_do_not_apply_are_refused(capsys, tmp_path, bert_dir, sst2_tsv, extra, needles):
    (tmp_path / "s.safetensors").write_bytes(b"")  # for --stats: refused before it is read
    argv = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    status, out, err = run(capsys, "compress", bert_dir, "--out", tmp_path / "out", *argv, *COMMON)
    assert_refused(status, out, err, *needles)
    assert not (tmp_path / "out").exists()


def test_dense_above_is_applied_and_recorded_with_global_allocation(capsys, tmp_path, bert_dir):
    status, _, err = run(capsys, "compress", bert_dir, "--out", tmp_path / "out", "--method", "svd", "--allocation", "global",
                         "--dense-above", "0.7", *COMMON)
    assert status == 0, err
    record = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert record["allocation"] == {"mode": "global", "rank_floor": 0.5, "dense_above": 0.7}


# --- the record, field by field ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda r: r.update(method="awq"), "awq"),
        (lambda r: r.update(method_options={"damping": "NaN"}), "damping"),
        (lambda r: r.update(method_options={"colour": "blue"}), "colour"),
        (lambda r: r.update(allocation={"mode": "global", "rank_floor": "x"}), "rank_floor"),
        (lambda r: r.update(allocation={"mode": "global", "dense_above": -5}), "dense_above"),
        (lambda r: r.update(allocation={"mode": "sideways"}), "mode"),
        (lambda r: r.update(allocation={"mode": "uniform", "speed": 1}), "speed"),
    ],
)
def test_record_fields_are_checked_by_type_and_range(capsys, tmp_path, svd_dir, edit, needle):
    bad = variant(svd_dir, tmp_path / "bad", record=edit)
    for command in ("inspect", "eval"):
        argv = [command, bad, "--quiet"] + (["--data", str(tmp_path / "none.tsv")] if command == "eval" else [])
        status, out, err = run(capsys, *argv)
        assert_refused(status, out, err, "quantization_config", needle)
    with pytest.raises(fwsvd.ModelError, match=needle):
        fwsvd.load(bad)


def test_method_options_of_a_real_record_pass(svd_dir, tmp_path, bert_dir, sst2_tsv):
    for method in ("fwsvd", "asvd", "svd-llm"):
        out = tmp_path / method
        assert fwsvd.cli.main(["compress", str(bert_dir), "--out", str(out), "--data", str(sst2_tsv), "--method", method, *COMMON]) == 0
        assert fwsvd.load(out) is not None


# --- stored tensors: dtypes, scales, finiteness ------------------------------------------------------


def _first_factor(weights: dict[str, torch.Tensor]) -> str:
    return sorted(k for k in weights if k.endswith(".weight_in"))[0]


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_integer_factors_without_an_int8_record_are_refused(capsys, tmp_path, svd_dir, sst2_tsv, dtype):
    def to_int(weights):
        key = _first_factor(weights)
        weights[key] = weights[key].round().to(dtype)

    bad = variant(svd_dir, tmp_path / "bad", tensors=to_int)
    for argv in (["inspect", bad], ["eval", bad, "--data", sst2_tsv], ["finetune", bad, "--data", sst2_tsv, "--out", tmp_path / "ft"]):
        status, out, err = run(capsys, *argv, "--quiet")
        assert_refused(status, out, err, "weight_in", "not floating point")
    with pytest.raises(fwsvd.ModelError, match="not floating point"):
        fwsvd.load(bad)
    assert not (tmp_path / "ft").exists()


def test_a_missing_int8_scale_is_named_as_missing(capsys, tmp_path, bert_dir):
    loaded = fwsvd.load_model(bert_dir)
    fwsvd.compress(loaded.model, fwsvd.CompressConfig(method="svd", keep=0.5), progress=False)
    fwsvd.quantize_factors(loaded.model)
    folder = fwsvd.save(loaded.model, tmp_path / "int8", loaded.tokenizer)

    def drop_scale(weights):
        del weights[sorted(k for k in weights if k.endswith("_scale"))[0]]

    bad = variant(folder, tmp_path / "bad", tensors=drop_scale)
    status, out, err = run(capsys, "inspect", bad, "--quiet")
    line = assert_refused(status, out, err, "lack", "_scale")
    assert "positive finite scales" not in line


def test_nan_in_a_factor_is_an_error_at_eval_with_the_tensor_named(capsys, tmp_path, svd_dir, sst2_tsv):
    key: list[str] = []

    def poison(weights):
        key.append(_first_factor(weights))
        weights[key[0]][0, 0] = float("nan")

    bad = variant(svd_dir, tmp_path / "bad", tensors=poison)
    status, out, err = run(capsys, "eval", bad, "--data", sst2_tsv, "--quiet")
    assert_refused(status, out, err, key[0], "NaN")
    status, out, err = run(capsys, "finetune", bad, "--data", sst2_tsv, "--out", tmp_path / "ft", "--quiet")
    assert_refused(status, out, err, key[0])
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("low_memory", [False, True])
def test_nan_in_a_layer_norm_is_an_error_at_compress(capsys, tmp_path, low_memory):
    model = make_bert()
    with torch.no_grad():
        model.bert.encoder.layer[0].output.LayerNorm.weight[3] = float("inf")
    folder = save_model(model, tmp_path / "nan-model")
    status, out, err = run(capsys, "compress", folder, "--out", tmp_path / "out", "--method", "svd",
                           *(["--low-memory"] if low_memory else []), *COMMON)
    assert_refused(status, out, err, "LayerNorm.weight", "NaN or infinite")
    assert not (tmp_path / "out").exists()


# --- statistics files --------------------------------------------------------------------------------


def _edit_stats(source: Path, dest: Path, stat: str, edit) -> Path:
    tensors = load_file(source)
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as f:
        meta = f.metadata()
    key = sorted(k for k in tensors if k.endswith("::" + stat))[0]
    tensors[key] = edit(tensors[key].clone())
    save_file(tensors, dest, metadata=meta)
    return dest


@pytest.mark.parametrize(
    ("stat", "edit", "needle"),
    [
        ("fisher_out", lambda t: t - 2 * t.max(), "negative"),
        ("cov", lambda t: t + torch.triu(torch.ones_like(t), 1) * t.abs().max(), "not symmetric"),
        ("cov", lambda t: t.to(torch.int32), "not floating point"),
        ("fisher_out", lambda t: t.fill_(float("nan")), "NaN"),
    ],
)
def test_bad_statistics_files_are_one_line(capsys, tmp_path, bert_dir, stats_file, stat, edit, needle):
    bad = _edit_stats(stats_file, tmp_path / "bad.safetensors", stat, edit)
    status, out, err = run(capsys, "compress", bert_dir, "--out", tmp_path / "out", "--method", "fwsvd", "--stats", bad, "--keep", "0.5", "--quiet")
    assert_refused(status, out, err, stat, needle)


def test_an_indefinite_covariance_is_refused_where_it_is_decomposed(capsys, tmp_path, bert_dir, stats_file):
    def indefinite(t):
        # Symmetric, the same diagonal, yet an eigenvalue of about -lambda_max / 2 along the all-ones direction.
        n, top = t.shape[0], torch.linalg.eigvalsh(t.double())[-1].item()
        c = 2 * top
        return (t.double() + (c / n) * torch.eye(n, dtype=torch.float64) - (c / n) * torch.ones(n, n, dtype=torch.float64)).to(t.dtype)

    bad = _edit_stats(stats_file, tmp_path / "bad.safetensors", "cov", indefinite)
    status, out, err = run(capsys, "compress", bert_dir, "--out", tmp_path / "out", "--method", "fwsvd", "--stats", bad, "--keep", "0.5", "--quiet")
    assert_refused(status, out, err, "cannot factorize", "positive semi-definite")


def test_with_stats_the_summary_says_no_calibration_ran(capsys, tmp_path, bert_dir, stats_file):
    status, out, err = run(capsys, "compress", bert_dir, "--out", tmp_path / "out", "--method", "fwsvd", "--stats", stats_file, "--keep", "0.5", "--quiet")
    assert status == 0, err
    assert f"statistics read from {stats_file}" in out and "calibration 0." not in out
    status, out, err = run(capsys, "compress", bert_dir, "--out", tmp_path / "out2", "--method", "fwsvd", "--stats", stats_file, "--keep", "0.5", "--json", "--quiet")
    result = json.loads(out)
    assert status == 0 and result["seconds_calibration"] == 0.0 and result["statistics_file"] == str(stats_file)


# --- scratch folders and busy outputs ----------------------------------------------------------------


def test_scratch_folders_of_killed_runs_are_swept(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    code = (
        "import sys, time\nfrom fwsvd.storage.atomic import scratch_dir\n"
        "with scratch_dir('fwsvd-low-memory-') as d:\n"
        "    (d / 'states.bin').write_bytes(b'x' * 1000)\n    print(d, flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={**subprocess_env(), "TMPDIR": str(tmp_path)})
    killed = Path(proc.stdout.readline().strip())
    assert killed.is_dir() and killed.parent == tmp_path and str(proc.pid) in killed.name
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed.is_dir(), "SIGKILL leaves it behind"
    with scratch_dir("fwsvd-low-memory-") as live:
        assert not killed.exists(), "the next run removes a dead run's folder"
        # A live run's folder is never touched by another's sweep.
        with scratch_dir("fwsvd-low-memory-") as other:
            assert live.is_dir() and other.is_dir()
    assert list(tmp_path.iterdir()) == []


def test_a_busy_output_is_refused_before_any_work(capsys, tmp_path, bert_dir):
    out = tmp_path / "out"
    with atomic_dir(out) as partial:
        (partial / "config.json").write_text("{}")
        # Another process's writer: flock is per open file, so this one's lock is "another holder".
        script = (
            "import sys\nfrom fwsvd.cli import main\n"
            f"sys.exit(main(['compress', {str(bert_dir)!r}, '--out', {str(out)!r}, '--method', 'svd', '--keep', '0.5', '--quiet']))"
        )
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(), timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "another process is writing" in proc.stderr and "--overwrite" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert time.perf_counter() - started < 60
    assert (out / "config.json").read_text() == "{}"
