"""Quantized weights plus a low-rank correction (issue 23): the grid, its packing, the byte budget,
the correction's weighting, and folders that reload."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import make_bert, make_llama, save_model
from hypothesis import given, settings
from hypothesis import strategies as st

import fwsvd
from fwsvd.compression.quantized import compress_quantized, model_bytes
from fwsvd.config import CompressConfig, QuantizeConfig
from fwsvd.core import allocate_budget
from fwsvd.errors import FwsvdError, ModelError
from fwsvd.nn import QuantizedLinear
from fwsvd.quantization import dequantize, pack, packed_bytes, quantize, unpack

# --- the grid ----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, derandomize=True)
@given(bits=st.sampled_from([8, 4, 3]), rows=st.integers(1, 9), cols=st.integers(1, 70), seed=st.integers(0, 10**6))
def test_pack_unpack_round_trip_any_shape(bits, rows, cols, seed):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(lo, hi + 1, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(q.numel(), bits)
    assert torch.equal(unpack(packed, bits, (rows, cols)), q)


def test_packing_is_compact():
    assert packed_bytes(1024, 8) == 1024 and packed_bytes(1024, 4) == 512 and packed_bytes(1024, 3) == 384


def test_unpack_refuses_the_wrong_number_of_bytes():
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(5, dtype=torch.uint8), 4, (4, 4))


@pytest.mark.parametrize(("bits", "group"), [(8, None), (4, 32), (4, 24), (3, 32)])
def test_round_to_nearest_grid(bits, group):
    torch.manual_seed(0)
    w = torch.randn(16, 80) * torch.linspace(0.1, 3, 80)
    grid = quantize(w, bits, group)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert grid.q.dtype == torch.int8 and int(grid.q.min()) >= lo and int(grid.q.max()) <= hi
    g = 80 if group is None else group
    assert grid.scales.shape == (16, math.ceil(80 / g)) and grid.scales.dtype == torch.float16
    # Every value within half a step of its scale, up to the float16 rounding of the scale and its
    # reciprocal (at most 2**-11 each, relative to the 2**(bits-1) steps of the largest value).
    step = grid.scales.float().repeat_interleave(g, dim=1)[:, :80]
    slack = 0.5 + 2 ** (bits - 1) * 2 * 2**-11
    assert bool(((w - grid.dequantize()).abs() <= step * slack + 1e-6).all())
    assert torch.equal(dequantize(grid.q, grid.scales, g), grid.dequantize())


def test_more_bits_and_smaller_groups_lose_less():
    torch.manual_seed(1)
    w = torch.randn(32, 128)
    err = {(b, g): (w - quantize(w, b, g).dequantize()).square().sum().item() for b in (8, 4, 3) for g in (32, 128)}
    assert err[(8, 32)] < err[(4, 32)] < err[(3, 32)]
    assert err[(4, 32)] < err[(4, 128)]


def test_grid_refuses_bad_input():
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.ones(2, 2), 5)
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([[float("nan"), 1.0]]), 4)


# --- the budget --------------------------------------------------------------------------------------


def test_budget_is_spent_on_the_most_loss_per_byte_and_never_exceeded():
    losses = [torch.tensor([9.0, 4.0, 1.0]), torch.tensor([8.0, 7.0, 0.5])]
    assert allocate_budget(losses, [1.0, 2.0], 4) == [2, 1]  # 9, 4 (per byte 9, 4) and 8/2=4 fit; 7/2 does not
    assert allocate_budget(losses, [1.0, 1.0], 100) == [3, 3]
    assert allocate_budget(losses, [1.0, 1.0], 0) == [0, 0]
    ranks = allocate_budget(losses, [3.0, 2.0], 7)
    assert 3 * ranks[0] + 2 * ranks[1] <= 7


def test_budget_refuses_bad_input():
    with pytest.raises(ValueError):
        allocate_budget([torch.tensor([1.0])], [0.0], 1)
    with pytest.raises(ValueError):
        allocate_budget([torch.tensor([-1.0])], [1.0], 1)


# --- compression -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(make_llama(), tmp_path_factory.mktemp("q") / "llama")


def _statistics(lm, text, config):
    return fwsvd.calibrate(lm, fwsvd.CalibrationConfig(data=str(text), samples=8, max_length=16, batch_size=4), config.needs(lm.task), progress=False)


@pytest.mark.parametrize("scheme", ["int8", "int4", "int3"])
def test_quantized_folder_reloads_to_the_same_logits(tmp_path, llama_folder, corpus_txt, scheme):
    lm = fwsvd.load_model(llama_folder)
    config = CompressConfig(method="fwsvd")
    report = compress_quantized(lm.model, config, QuantizeConfig(scheme=scheme, group_size=16), _statistics(lm, corpus_txt, config),
                                task=lm.task, progress=False)
    assert all(isinstance(lm.model.get_submodule(r.name), QuantizedLinear) for r in report.layers)
    assert report.to_dict()["correction_bytes"] <= 0.1 * report.to_dict()["quantized_bytes"] + 1e-9
    assert any(r.rank > 0 for r in report.layers)
    out = fwsvd.save(lm.model, tmp_path / "q", lm.tokenizer)
    ids = torch.tensor([[5, 9, 13, 40, 41, 7, 3, 22]])
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
        back = fwsvd.load(out)
        torch.testing.assert_close(back(input_ids=ids).logits, before, rtol=0, atol=1e-5)
        from transformers import AutoModelForCausalLM

        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    record = json.loads((out / "config.json").read_text())["quantization_config"]["quantized_weights"]
    assert record["scheme"] == scheme and record["group_size"] == 16
    info = fwsvd.inspect(back)["quantized_weights"]
    assert set(info["layers"]) == {r.name for r in report.layers}


def test_budget_bytes_sets_the_folder_size(tmp_path, llama_folder, corpus_txt):
    lm = fwsvd.load_model(llama_folder)
    config = CompressConfig(method="fwsvd")
    stats = _statistics(lm, corpus_txt, config)
    report = compress_quantized(lm.model, config, QuantizeConfig(scheme="int4", group_size=16, budget_bytes=0.45), stats, task=lm.task, progress=False)
    dense = report.dense_bytes
    assert report.model_bytes <= 0.45 * dense and report.model_bytes >= 0.44 * dense
    assert model_bytes(lm.model) == report.model_bytes
    out = fwsvd.save(lm.model, tmp_path / "q", lm.tokenizer)
    header = 8 + int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")
    assert (out / "model.safetensors").stat().st_size - header == report.model_bytes
    with pytest.raises(FwsvdError, match="budget-bytes"):
        compress_quantized(fwsvd.load_model(llama_folder).model, config, QuantizeConfig(scheme="int4", budget_bytes=0.05), stats,
                           task=lm.task, progress=False)


def test_fwsvd_correction_beats_plain_svd_under_its_own_weighting(llama_folder, corpus_txt):
    """At equal rank, the fwsvd correction's Fisher-weighted output error is at most plain SVD's."""
    from fwsvd.nn import find_targets, linear_weight

    dense = fwsvd.load_model(llama_folder)
    config = CompressConfig(method="fwsvd")
    stats = _statistics(dense, corpus_txt, config)
    errors = {}
    for method in ("svd", "fwsvd"):
        lm = fwsvd.load_model(llama_folder)
        compress_quantized(lm.model, CompressConfig(method=method), QuantizeConfig(scheme="int3", group_size=16, correction_rank=2), stats,
                           task=lm.task, progress=False)
        total = 0.0
        for info in find_targets(dense.model):
            s = stats.for_module(info.name)
            w = linear_weight(dense.model.get_submodule(info.name)).detach().double()
            approx = lm.model.get_submodule(info.name).dense_weight().detach().double()
            r = s["fisher_out"].double().clamp_min(1e-12).sqrt()
            total += ((r[:, None] * (w - approx)) @ s["cov"].double() @ (r[:, None] * (w - approx)).T).trace().item()
        errors[method] = total
    assert errors["fwsvd"] <= errors["svd"] * 1.0001, errors


def test_a_correction_lowers_the_error_of_the_grid(llama_folder):
    lm = fwsvd.load_model(llama_folder)
    ref = fwsvd.load_model(llama_folder)
    compress_quantized(lm.model, CompressConfig(method="svd"), QuantizeConfig(scheme="int3", correction_rank=4), task=lm.task, progress=False)
    plain = fwsvd.load_model(llama_folder)
    compress_quantized(plain.model, CompressConfig(method="svd"), QuantizeConfig(scheme="int3", correction_rank=0), task=lm.task, progress=False)
    name = "model.layers.0.mlp.up_proj"
    w = ref.model.get_submodule(name).weight.detach()
    assert (w - lm.model.get_submodule(name).dense_weight()).norm() < (w - plain.model.get_submodule(name).dense_weight()).norm()


def test_encoder_quantized_reloads(tmp_path, sst2_tsv):
    torch.manual_seed(0)
    folder = save_model(make_bert(), tmp_path / "bert")
    lm = fwsvd.load_model(folder)
    config = CompressConfig(method="fwsvd")
    stats = fwsvd.calibrate(lm, fwsvd.CalibrationConfig(data=str(sst2_tsv), samples=16, max_length=16, batch_size=8), config.needs(lm.task), progress=False)
    compress_quantized(lm.model, config, QuantizeConfig(scheme="int4", group_size=16), stats, task=lm.task, progress=False)
    out = fwsvd.save(lm.model, tmp_path / "q", lm.tokenizer)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        torch.testing.assert_close(fwsvd.load(out)(input_ids=ids).logits, lm.model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_quantize_config_refuses_what_does_not_fit():
    with pytest.raises(FwsvdError, match="--quantize"):
        QuantizeConfig(scheme="int2")
    with pytest.raises(FwsvdError, match="one of them"):
        QuantizeConfig(correction_rank=2, budget_bytes=0.3)
    with pytest.raises(FwsvdError, match="--group-size"):
        QuantizeConfig(group_size=0)
    with pytest.raises(FwsvdError, match="--budget-bytes"):
        QuantizeConfig(budget_bytes=1.5)


# --- the record --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory, llama_folder):
    lm = fwsvd.load_model(llama_folder)
    compress_quantized(lm.model, CompressConfig(method="svd"), QuantizeConfig(scheme="int4", group_size=16, correction_rank=2), task=lm.task, progress=False)
    return fwsvd.save(lm.model, tmp_path_factory.mktemp("qrec") / "q", lm.tokenizer)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda g: g.update(scheme="int2"), "scheme"),
        (lambda g: g.update(group_size=0), "group_size"),
        (lambda g: g.update(factor_dtype="float32"), "factor_dtype"),
        (lambda g: g.update(colour=1), "colour"),
        (lambda g: g.pop("ranks"), "ranks"),
        (lambda g: g["ranks"].update({"model.layers.0.mlp.up_proj": -1}), "ranks"),
        (lambda g: g["ranks"].update({"model.layers.0.mlp.up_proj": 3}), "shape"),
    ],
)
def test_bad_quantized_records_are_refused(tmp_path, quantized_folder, edit, needle):
    bad = tmp_path / "bad"
    shutil.copytree(quantized_folder, bad)
    config = json.loads((bad / "config.json").read_text())
    edit(config["quantization_config"]["quantized_weights"])
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=needle):
        fwsvd.load(bad)


def test_a_float32_grid_is_refused(tmp_path, quantized_folder):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(quantized_folder, bad)
    weights = load_file(bad / "model.safetensors")
    key = next(k for k in weights if k.endswith(".scales"))
    weights[key] = weights[key].float()
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="F16"):
        fwsvd.load(bad)


# --- the command line --------------------------------------------------------------------------------


def test_compress_quantize_on_the_command_line(capsys, tmp_path, llama_folder, corpus_txt):
    from fwsvd.cli import main

    out = tmp_path / "q"
    assert main(["compress", str(llama_folder), "--out", str(out), "--quantize", "int4", "--group-size", "16", "--data", str(corpus_txt),
                 "--samples", "8", "--max-length", "16", "--batch-size", "4", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scheme"] == "int4" and result["method"] == "fwsvd" and 0 < result["correction_bytes"] <= 0.1 * result["quantized_bytes"]
    assert main(["inspect", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "quantized weights int4" in text and "correction rank" in text
    assert main(["eval", str(out), "--data", str(corpus_txt), "--max-length", "16", "--json", "--quiet"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["perplexity"])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--quantize", "int4", "--keep", "0.5"], "--keep"),
        (["--quantize", "int4", "--low-memory"], "--low-memory"),
        (["--quantize", "int4", "--correction-rank", "2", "--correction-share", "0.2"], "one of them"),
        (["--keep", "0.5", "--group-size", "32"], "--group-size"),
        ([], "--keep is required"),
        (["--quantize", "int4", "--budget-bytes", "2"], "--budget-bytes"),
    ],
)
def test_quantize_options_that_do_not_apply_are_one_line(capsys, tmp_path, llama_folder, argv, needle):
    from fwsvd.cli import main

    assert main(["compress", str(llama_folder), "--out", str(tmp_path / "q"), "--method", "svd", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fwsvd: error:") and needle in err[0], err
    assert not (tmp_path / "q").exists()


def test_recovery_fine_tuning_trains_the_correction_not_the_grid(tmp_path, llama_folder, bigram_txt):
    from fwsvd.training.finetune import FinetuneConfig, finetune

    lm = fwsvd.load_model(llama_folder)
    compress_quantized(lm.model, CompressConfig(method="svd"), QuantizeConfig(scheme="int4", group_size=16, correction_rank=2), task=lm.task, progress=False)
    folder = fwsvd.save(lm.model, tmp_path / "q", lm.tokenizer)
    loaded = fwsvd.load_model(folder)
    layer = loaded.model.get_submodule("model.layers.0.mlp.up_proj")
    grid, factor = layer.qweight.clone(), layer.weight_in.detach().clone()
    summary = finetune(loaded, FinetuneConfig(data=str(bigram_txt), tokens=16 * 4 * 4, lr=3e-3, batch_size=4, max_length=16), progress=False)
    assert summary["train"] == "low-rank"
    assert torch.equal(layer.qweight, grid) and not torch.equal(layer.weight_in, factor)
    out = fwsvd.save(loaded.model, tmp_path / "ft", loaded.tokenizer)
    back = fwsvd.load(out)
    assert isinstance(back.get_submodule("model.layers.0.mlp.up_proj"), QuantizedLinear)
