"""Resumable calibration (fwsvd.calibration.resume): checkpoints of the running sums, resumed by a rerun."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fwsvd
from fwsvd import cli
from fwsvd.calibration import resume
from fwsvd.config import CalibrationConfig, CompressConfig
from fwsvd.calibration.calibrate import calibrate
from fwsvd.calibration.resume import Checkpointing, checkpoint_base

CAL = dict(samples=12, max_length=16, batch_size=2)  # 6 batches


def _equal(a: fwsvd.Statistics, b: fwsvd.Statistics) -> None:
    assert a.tensors.keys() == b.tensors.keys() and a.shared == b.shared
    for name in a.tensors:
        assert a.tensors[name].keys() == b.tensors[name].keys()
        for key in a.tensors[name]:
            assert torch.equal(a.tensors[name][key], b.tensors[name][key]), (name, key)
    drop = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
    assert drop(a.summary) == drop(b.summary)


class _Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, writes: int) -> list[Path]:
    """Make the ``writes``-th checkpoint write end the run (after writing), like a kill at that point."""
    written: list[Path] = []
    original = resume.write_checkpoint

    def write(path, sums, facts):
        original(path, sums, facts)
        written.append(path)
        if len(written) == writes:
            raise _Interrupt

    monkeypatch.setattr(resume, "write_checkpoint", write)
    return written


def test_interrupted_calibration_resumes_to_the_same_statistics(monkeypatch, caplog, tmp_path, llama_dir, corpus_txt, fresh):
    lm = fresh(llama_dir)
    kinds = CompressConfig(method="fwsvd", keep=0.5).needs(lm.task) | {"act"}
    config = CalibrationConfig(data=str(corpus_txt), **CAL)
    whole = calibrate(lm, config, kinds, progress=False)

    base = tmp_path / ".out.checkpoint.safetensors"
    written = _interrupt_after(monkeypatch, 2)
    with pytest.raises(_Interrupt):
        calibrate(lm, config, kinds, progress=False, checkpoint=Checkpointing(base, every=1))
    assert written == [base, base] and base.is_file()
    monkeypatch.undo()

    with caplog.at_level(logging.INFO, logger="fwsvd.calibration.resume"):
        resumed = calibrate(lm, config, kinds, progress=False, checkpoint=Checkpointing(base, every=1))
    assert any("resuming calibration" in r.getMessage() and "2 of 6 batches" in r.getMessage() for r in caplog.records)
    # Sums are stored exactly and the rest added in the same order: bit-identical statistics.
    _equal(whole, resumed)
    assert not base.with_name(base.name + ".tmp").exists()


def test_other_settings_ignore_the_checkpoint(monkeypatch, caplog, tmp_path, llama_dir, corpus_txt, fresh):
    lm = fresh(llama_dir)
    kinds = CompressConfig(method="fwsvd", keep=0.5).needs(lm.task)
    base = tmp_path / ".out.checkpoint.safetensors"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(_Interrupt):
        calibrate(lm, CalibrationConfig(data=str(corpus_txt), **CAL), kinds, progress=False, checkpoint=Checkpointing(base, every=1))
    monkeypatch.undo()

    other = CalibrationConfig(data=str(corpus_txt), **{**CAL, "samples": 10})
    with caplog.at_level(logging.INFO, logger="fwsvd.calibration.resume"):
        stats = calibrate(lm, other, kinds, progress=False, checkpoint=Checkpointing(base, every=1))
    messages = [r.getMessage() for r in caplog.records]
    assert any("ignoring calibration checkpoint" in m and "calibration.samples" in m for m in messages), messages
    assert not any("resuming" in m for m in messages)
    _equal(calibrate(lm, other, kinds, progress=False), stats)
    # The checkpoint now belongs to the new settings: complete, with 5 batches.
    meta = json.loads(load_file_metadata(base)["counts"])
    assert meta["batches"] == 5


def load_file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_a_changed_model_ignores_the_checkpoint(monkeypatch, caplog, tmp_path, llama_dir, corpus_txt, fresh):
    lm = fresh(llama_dir)
    kinds = frozenset({"cov"})
    config = CalibrationConfig(data=str(corpus_txt), **CAL)
    base = tmp_path / ".out.checkpoint.safetensors"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(_Interrupt):
        calibrate(lm, config, kinds, progress=False, checkpoint=Checkpointing(base, every=1))
    monkeypatch.undo()
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight.mul_(2)  # same shapes, other weights
    with caplog.at_level(logging.INFO, logger="fwsvd.calibration.resume"):
        calibrate(lm, config, kinds, progress=False, checkpoint=Checkpointing(base, every=1))
    assert any("ignoring" in r.getMessage() and "model.parameters" in r.getMessage() for r in caplog.records)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import fwsvd.calibration.resume as r
    original, written = r.write_checkpoint, []
    def write(*args, **kwargs):
        original(*args, **kwargs)
        written.append(1)
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    r.write_checkpoint = write
    from fwsvd.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _compress_args(model: Path, out: Path, data: Path, *extra: str) -> list[str]:
    return ["compress", str(model), "--out", str(out), "--keep", "0.6", "--data", str(data),
            "--samples", "12", "--max-length", "16", "--batch-size", "2", "--quiet", *extra]


def test_kill_9_then_the_same_command_resumes_and_finishes(capsys, tmp_path, llama_dir, corpus_txt):
    reference = tmp_path / "reference"
    assert cli.main(_compress_args(llama_dir, reference, corpus_txt, "--json")) == 0
    capsys.readouterr()

    out = tmp_path / "out"
    args = _compress_args(llama_dir, out, corpus_txt, "--checkpoint-every", "1", "--json")
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    checkpoint = checkpoint_base(out)
    assert checkpoint.is_file() and not out.exists()  # killed mid-calibration: no output at all

    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["batches"] == 6 and report["calibration"]["samples"] == 12
    # Same statistics, so the same factors; the checkpoint is gone and nothing else is left beside the output.
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference"]


def test_checkpoint_beside_save_stats_and_none_with_zero(capsys, tmp_path, llama_dir, corpus_txt):
    stats = tmp_path / "stats.safetensors"
    assert checkpoint_base(tmp_path / "out", stats) == tmp_path / ".stats.safetensors.checkpoint.safetensors"
    # --checkpoint-every 0: no checkpoint is written (nor read).
    seen: list[Path] = []
    original = resume.write_checkpoint
    resume.write_checkpoint = lambda path, *a: (seen.append(path), original(path, *a))
    try:
        assert cli.main(_compress_args(llama_dir, tmp_path / "none", corpus_txt, "--checkpoint-every", "0")) == 0
        assert seen == []
        assert cli.main(_compress_args(llama_dir, tmp_path / "out", corpus_txt, "--save-stats", str(stats), "--checkpoint-every", "4")) == 0
    finally:
        resume.write_checkpoint = original
    # Every 4 batches and after the last one (so that a run killed while factorizing need not recalibrate).
    assert seen == [tmp_path / ".stats.safetensors.checkpoint.safetensors"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none", "out", "stats.safetensors"]
    capsys.readouterr()


def test_negative_checkpoint_every_is_one_line(capsys, tmp_path, llama_dir, corpus_txt):
    assert cli.main(_compress_args(llama_dir, tmp_path / "out", corpus_txt, "--checkpoint-every", "-1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fwsvd: error: --checkpoint-every -1 must be a number of batches (0: no checkpoints)"]


def test_write_safetensors_reads_back(tmp_path):
    tensors = {"a::cov": torch.randn(5, 5, dtype=torch.float64), "b::x": torch.randn(3), "c::n": torch.tensor(7), "d::h": torch.randn(3, 2).to(torch.bfloat16)}
    resume.write_safetensors(tmp_path / "t.safetensors", tensors, {"k": "v"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)
    assert load_file_metadata(tmp_path / "t.safetensors") == {"k": "v"}


@pytest.mark.parametrize("interval, writes", [(1e9, 1), (0.0, 6)])
def test_default_checkpoints_by_time_and_after_the_last_batch(monkeypatch, tmp_path, llama_dir, corpus_txt, fresh, interval, writes):
    lm = fresh(llama_dir)
    monkeypatch.setattr(resume, "DEFAULT_INTERVAL_S", interval)
    monkeypatch.setattr(resume, "_WRITE_SHARE", 0.0)  # (else: wait ten times the last write's duration)
    written: list[int] = []
    original = resume.write_checkpoint
    monkeypatch.setattr(resume, "write_checkpoint", lambda path, sums, facts: (written.append(sums.batches), original(path, sums, facts)))
    calibrate(lm, CalibrationConfig(data=str(corpus_txt), **CAL), frozenset({"cov"}), progress=False,
              checkpoint=Checkpointing(tmp_path / ".out.checkpoint.safetensors"))
    # Never due within a short run: the last batch alone; always due: every batch.
    assert written == ([6] if writes == 1 else [1, 2, 3, 4, 5, 6])
