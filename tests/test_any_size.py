"""Compress once, materialise any size (issue 24): ``compress --any-size`` then ``resize`` equals a direct
compression at that keep (same ranks, logits within float16 rounding of the factors)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_gpt2, make_llama, save_model

import fwsvd
from fwsvd.cli import main
from fwsvd.compression.any_size import compress_any_size, resize
from fwsvd.config import CompressConfig
from fwsvd.errors import FwsvdError, ModelError
from fwsvd.nn import LowRankLinear

IDS = torch.tensor([[5, 9, 13, 40, 41, 7, 3, 22]])


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def any_size(request, tmp_path_factory, corpus_txt):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(f"any-{request.param}")
    dense = save_model({"llama": make_llama, "gpt2": make_gpt2}[request.param](), root / "dense")
    lm = fwsvd.load_model(dense)
    config = CompressConfig(method="fwsvd")
    stats = fwsvd.calibrate(lm, fwsvd.CalibrationConfig(data=str(corpus_txt), samples=8, max_length=16, batch_size=4), config.needs(lm.task), progress=False)
    compress_any_size(lm.model, config, stats, task=lm.task, progress=False)
    return dense, fwsvd.save(lm.model, root / "any", lm.tokenizer), stats


@pytest.mark.parametrize("keep", [0.97, 0.8, 0.5, 0.3])
def test_resize_equals_a_direct_compression(any_size, keep):
    dense, folder, stats = any_size
    resized = fwsvd.load(folder, keep=keep)
    direct = fwsvd.load_model(dense)
    report = fwsvd.compress(direct.model, CompressConfig(method="fwsvd", keep=keep), stats, task=direct.task, progress=False)
    ranks = {name: m.rank for name, m in resized.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks == {r.name: r.rank for r in report.layers if r.rank is not None}
    record = fwsvd.inspect(resized)
    assert record["target_keep"] == pytest.approx(report.target_keep) and record["keep"] == keep and "any_size" not in json.dumps(record)
    with torch.no_grad():
        a, b = resized(input_ids=IDS).logits, direct.model(input_ids=IDS).logits
    assert (a - b).abs().max() <= 1e-3 * b.abs().max(), "only float16 rounding of the factors differs"


def test_resize_follows_the_recorded_dense_choice(any_size, tmp_path):
    dense, _, stats = any_size
    config = CompressConfig(method="fwsvd", dense_choice="loss")
    lm = fwsvd.load_model(dense)
    compress_any_size(lm.model, config, stats, task=lm.task, progress=False)
    folder = fwsvd.save(lm.model, tmp_path / "any", lm.tokenizer)
    for keep in (0.8, 0.4):
        resized = fwsvd.load(folder, keep=keep)
        direct = fwsvd.load_model(dense)
        report = fwsvd.compress(direct.model, CompressConfig(method="fwsvd", keep=keep, dense_choice="loss"), stats, task=direct.task, progress=False)
        ranks = {name: m.rank for name, m in resized.named_modules() if isinstance(m, LowRankLinear)}
        assert ranks == {r.name: r.rank for r in report.layers if r.rank is not None}
        assert fwsvd.inspect(resized)["allocation"]["dense_choice"] == "loss"


def test_resized_folder_reloads_the_same(any_size, tmp_path):
    _, folder, _ = any_size
    model = fwsvd.load(folder, keep=0.97)  # some layers turn dense again, in their own type (GPT-2's Conv1D)
    out = fwsvd.save(model, tmp_path / "r")
    with torch.no_grad():
        torch.testing.assert_close(fwsvd.load(out)(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=0)


def test_any_size_folder_is_no_larger_than_the_dense_one(any_size):
    dense, folder, _ = any_size
    assert (folder / "model.safetensors").stat().st_size <= 1.1 * (dense / "model.safetensors").stat().st_size


def test_any_size_on_the_command_line(capsys, tmp_path, llama_dir, corpus_txt):
    any_dir, small = tmp_path / "any", tmp_path / "small"
    common = ["--data", str(corpus_txt), "--samples", "8", "--max-length", "16", "--batch-size", "4", "--quiet"]
    assert main(["compress", str(llama_dir), "--out", str(any_dir), "--any-size", *common]) == 0
    assert "fwsvd resize" in capsys.readouterr().out
    assert main(["resize", str(any_dir), "--keep", "0.6", "--out", str(small), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["keep"] == 0.6 and result["target_keep"] <= 0.61
    assert main(["eval", str(small), "--data", str(corpus_txt), "--max-length", "16", "--quiet"]) == 0
    capsys.readouterr()
    direct = tmp_path / "direct"
    assert main(["compress", str(llama_dir), "--out", str(direct), "--keep", "0.6", "--json", *common]) == 0
    assert {r["name"]: r["rank"] for r in json.loads(capsys.readouterr().out)["layers"]} == {r["name"]: r["rank"] for r in result["layers"]}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--any-size", "--keep", "0.5"], "--keep"),
        (["--any-size", "--sequential"], "--sequential"),
        (["--any-size", "--quantize", "int4"], "--any-size"),
    ],
)
def test_any_size_options_that_do_not_apply(capsys, tmp_path, llama_dir, argv, needle):
    assert main(["compress", str(llama_dir), "--out", str(tmp_path / "o"), "--method", "svd", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_resize_refuses_what_is_not_any_size(capsys, tmp_path, any_size, llama_dir):
    _, folder, _ = any_size
    assert main(["resize", str(llama_dir), "--keep", "0.5", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "not an any-size folder" in capsys.readouterr().err
    assert main(["resize", str(folder), "--keep", "1.5", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--keep" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(FwsvdError, match="any-size"):
        resize(fwsvd.load(llama_dir), 0.5)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda g: g["losses"].popitem(), "losses"),
        (lambda g: g["losses"][next(iter(g["losses"]))].__setitem__(0, -1.0), "losses"),
        (lambda g: g["allocation"].update(mode="sideways"), "allocation"),
        (lambda g: g.update(factor_dtype="int8"), "factor_dtype"),
        (lambda g: g.update(colour=1), "colour"),
    ],
)
def test_bad_any_size_records_are_refused(tmp_path, any_size, edit, needle):
    _, folder, _ = any_size
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    edit(config["quantization_config"]["any_size"])
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=needle):
        fwsvd.load(bad)
