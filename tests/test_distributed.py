"""Data-parallel calibration under torchrun (fwsvd.calibration.distributed), with 2 gloo processes on tiny models.

One test launches the real ``torchrun ... -m fwsvd compress`` command; the others fork two
processes of this test session (fast: nothing is imported again) that set the variables
``torchrun`` would set and run the command line in-process. Every wait has a timeout, so a hang
fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fwsvd import cli
from fwsvd.calibration import distributed, resume
from fwsvd.errors import FwsvdError

TIMEOUT = 180


def _args(model: Path, out: Path, data: Path, *extra: str) -> list[str]:
    return ["compress", str(model), "--out", str(out), "--keep", "0.6", "--data", str(data),
            "--samples", "12", "--max-length", "16", "--batch-size", "2", *extra]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> None:
    """Each tensor equal to within ``rtol`` of its largest magnitude (float summation order differs)."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key].double(), b[key].double()
        assert (x - y).abs().max() <= rtol * x.abs().max().clamp_min(1e-30), key


def _summary(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["summary"])


@pytest.fixture(scope="module")
def single(tmp_path_factory, llama_dir, corpus_txt) -> Path:
    """The single-process reference: output folder and statistics."""
    folder = tmp_path_factory.mktemp("single")
    assert cli.main(_args(llama_dir, folder / "out", corpus_txt, "--save-stats", str(folder / "stats.safetensors"), "--quiet")) == 0
    return folder


def test_torchrun_two_processes_give_the_single_process_result(tmp_path, single, llama_dir, corpus_txt, capsys):
    capsys.readouterr()
    out, stats = tmp_path / "out", tmp_path / "stats.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(cli.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "fwsvd", *_args(llama_dir, out, corpus_txt, "--save-stats", str(stats))],
        capture_output=True, text=True, timeout=TIMEOUT, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Statistics: sums over the two halves of the batches, the single process's to float tolerance.
    _close(load_file(str(single / "stats.safetensors")), load_file(str(stats)), rtol=1e-5)
    one, two = _summary(single / "stats.safetensors"), _summary(stats)
    assert two.pop("processes") == 2
    assert two.pop("mean_loss") == pytest.approx(one.pop("mean_loss"), rel=1e-9)
    two.pop("seconds"), one.pop("seconds")
    assert one == two  # batches, samples, tokens, kinds, data
    # The same ranks and factors; rank 0 alone printed the report and the log.
    _close(load_file(str(single / "out" / "model.safetensors")), load_file(str(out / "model.safetensors")), rtol=1e-4)
    ranks = [json.loads((folder / "config.json").read_text())["quantization_config"]["ranks"] for folder in (single / "out", out)]
    assert ranks[0] == ranks[1]
    assert proc.stdout.count("saved to") == 1
    assert proc.stderr.count("calibrated ['cov', 'fisher']") == 1
    assert "fwsvd: error" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stats.safetensors"]  # no checkpoint left


# --- two forked processes -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, argv: list[str], log: str, patch: Callable[[int], None] | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    # A forked child must not enter the parent's OpenMP thread team (GNU OpenMP does not survive a
    # fork: with OMP_NUM_THREADS=2 a child hung in its first parallel region): one thread each, as
    # torchrun's processes sharing one small machine would run anyway.
    torch.set_num_threads(1)
    stream = open(log, "w", buffering=1, encoding="utf-8")  # noqa: SIM115
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    sys.stdout = sys.stderr = stream
    logging.root.handlers = []  # the command line's own logging setup, into this file
    code = 99
    try:
        if patch is not None:
            patch(rank)
        code = cli.main(argv)
    except BaseException:  # noqa: BLE001 - report anything to the test through the log
        traceback.print_exc()
    finally:
        stream.flush()
        os._exit(code)


def _run_ranks(tmp_path: Path, argv: list[str], patch: Callable[[int], None] | None = None, world: int = 2) -> tuple[list[int], list[str]]:
    """Run the command line in ``world`` forked processes; their exit codes and their output."""
    port = _free_port()
    ctx = multiprocessing.get_context("fork")
    logs = [str(tmp_path / f"rank{rank}.log") for rank in range(world)]
    procs = [ctx.Process(target=_child, args=(rank, world, port, argv, logs[rank], patch)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, "a process hung"
    texts = [Path(log).read_text(encoding="utf-8") for log in logs]
    for log in logs:
        os.unlink(log)
    return [p.exitcode for p in procs], texts


def _errors(texts: list[str]) -> list[str]:
    return [line for text in texts for line in text.splitlines() if line.startswith("fwsvd: error")]


def test_a_failure_on_one_process_ends_the_job_with_one_line(tmp_path, llama_dir, corpus_txt):
    def fail_on_rank_1(rank: int) -> None:
        if rank == 1:
            import fwsvd.calibration.calibrate

            def broken(*args, **kwargs):
                raise FwsvdError("calibration loss is [nan]: check the labels and the model weights for NaN/inf")

            fwsvd.calibration.calibrate.collect_statistics = broken

    out = tmp_path / "out"
    codes, texts = _run_ranks(tmp_path, _args(llama_dir, out, corpus_txt, "--quiet"), fail_on_rank_1)
    assert codes == [1, 2]  # rank 0 left quietly once it learnt of rank 1's failure
    assert _errors(texts) == ["fwsvd: error: calibration loss is [nan]: check the labels and the model weights for NaN/inf"]
    assert "Traceback" not in "".join(texts)
    # No output and no temporary folder; rank 0's finished share stays checkpointed for a rerun.
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [".out.checkpoint.rank0-of-2.safetensors"]


def test_an_error_every_process_meets_is_printed_once(tmp_path, llama_dir, corpus_txt):
    # 2 samples in batches of 2: one batch for two processes.
    argv = ["compress", str(llama_dir), "--out", str(tmp_path / "out"), "--keep", "0.6", "--data", str(corpus_txt),
            "--samples", "2", "--batch-size", "2", "--max-length", "16", "--quiet"]
    codes, texts = _run_ranks(tmp_path, argv)
    assert codes == [2, 2]
    assert _errors(texts) == [
        "fwsvd: error: 1 calibration batches for 2 processes: every process needs one; pass more --samples, a smaller --batch-size, or fewer processes"
    ]
    codes, texts = _run_ranks(tmp_path, [*argv[:4], "--sequential", *argv[4:]])
    assert codes == [2, 2] and len(_errors(texts)) == 1 and "--sequential runs in one process" in _errors(texts)[0]


def test_interrupted_job_resumes_per_process(tmp_path, single, llama_dir, corpus_txt):
    def interrupt_after_first_checkpoint(rank: int) -> None:
        original = resume.write_checkpoint

        def write(*args, **kwargs):
            original(*args, **kwargs)
            raise KeyboardInterrupt

        resume.write_checkpoint = write

    out, stats = tmp_path / "out", tmp_path / "stats.safetensors"
    argv = _args(llama_dir, out, corpus_txt, "--save-stats", str(stats), "--checkpoint-every", "1")
    codes, texts = _run_ranks(tmp_path, argv, interrupt_after_first_checkpoint)
    assert codes == [130, 130], texts
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [".stats.safetensors.checkpoint.rank0-of-2.safetensors", ".stats.safetensors.checkpoint.rank1-of-2.safetensors"]

    codes, texts = _run_ranks(tmp_path, argv)
    assert codes == [0, 0], texts
    assert "resuming calibration" in texts[0] and "1 of 3 batches already done" in texts[0]
    assert "resuming" not in texts[1]  # rank 0 alone speaks
    _close(load_file(str(single / "stats.safetensors")), load_file(str(stats)), rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stats.safetensors"]


def test_single_process_helpers_are_no_ops():
    assert not distributed.current().active and distributed.current().is_main
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.agree() is None and distributed.report_failure()
    items = [(2, 3), (1, 1)]
    got = list(distributed.spread(items, lambda shape: [torch.ones(shape)], lambda shape: [(shape, torch.float32)]))
    assert [(item, tuple(t.shape)) for item, (t,) in got] == [((2, 3), (2, 3)), ((1, 1), (1, 1))]


def test_owners_balance_costs_deterministically():
    assert distributed.owners([1.0] * 4, 2) == [0, 1, 0, 1]
    # Two large layers among small ones go to different processes.
    costs = [18.0, 1, 1, 1, 1, 1, 1, 18.0, 1, 1, 1, 1, 1, 1]
    owner = distributed.owners(costs, 2)
    assert owner[0] != owner[7]
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert loads == [24.0, 24.0]


def test_low_memory_under_two_processes_gives_the_single_process_result(tmp_path, llama_dir, corpus_txt):
    """--low-memory with torchrun: each process streams its share of the batches (each block's sums added
    up), the layers' decompositions are spread, rank 0 alone writes; the single process's folder to float tolerance."""
    argv = [*_args(llama_dir, tmp_path / "one", corpus_txt, "--low-memory", "--device", "cpu", "--quiet", "--json"), "--allocation", "global"]
    assert cli.main(argv) == 0
    codes, texts = _run_ranks(tmp_path, [*argv[:2], "--out", str(tmp_path / "two"), *argv[4:]])
    assert codes == [0, 0], texts
    one = {k: v for f in sorted((tmp_path / "one").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    two = {k: v for f in sorted((tmp_path / "two").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert one.keys() == two.keys()
    for key in one:
        if key.endswith(("weight_out", "weight_in")):
            continue  # a component's sign may flip; the product is compared below
        _close({key: one[key]}, {key: two[key]}, rtol=1e-4)
    for key in (k.removesuffix(".weight_out") for k in one if k.endswith(".weight_out")):
        _close({key: one[key + ".weight_out"] @ one[key + ".weight_in"]}, {key: two[key + ".weight_out"] @ two[key + ".weight_in"]}, rtol=1e-4)
    records = [json.loads((tmp_path / name / "config.json").read_text())["quantization_config"] for name in ("one", "two")]
    assert records[0]["ranks"] == records[1]["ranks"]
    assert records[1]["calibration"].pop("processes") == 2
    for key in ("samples", "tokens", "batches"):
        assert records[1]["calibration"][key] == records[0]["calibration"][key]
    assert records[1]["calibration"]["mean_loss"] == pytest.approx(records[0]["calibration"]["mean_loss"], rel=1e-6)
    assert sum(text.count('"method"') for text in texts) == 1  # rank 0 alone printed the report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
