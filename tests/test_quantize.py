"""int8 storage of the low-rank factors (fwsvd.storage.int8, ``--quantize-factors int8``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_llama
from safetensors.torch import load_file, save_file

import fwsvd
from fwsvd.errors import ModelError
from fwsvd.storage.int8 import dequantize_rows, quantize_factors, quantize_rows

IDS = torch.tensor([[2, 5, 9, 14, 3, 7]])


def _factor_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if ".weight_in" in k or ".weight_out" in k}


def test_rows_round_to_a_symmetric_grid_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(7, 33, generator=gen) * torch.logspace(-4, 2, 7)[:, None]
    w[3] = 0.0  # an all-zero row
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (7,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all()) and float(scale[3]) == 1.0
    back = dequantize_rows(q, scale)
    assert bool(((back - w).abs() <= scale[:, None] / 2 + 1e-12).all())
    # Idempotent: values already on the grid come back unchanged.
    q2, scale2 = quantize_rows(back)
    assert torch.equal(q2, q)
    torch.testing.assert_close(dequantize_rows(q2, scale2), back, rtol=0, atol=0)


def _quantized_model():
    model = make_llama()
    fwsvd.compress(model, fwsvd.CompressConfig(method="svd", keep=0.5), task="causal-lm", progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantize_factors(model)
    return model, before


def test_saved_folder_holds_int8_factors_and_reloads_the_same_model(tmp_path: Path):
    model, before = _quantized_model()
    with torch.no_grad():
        expected = model(IDS).logits
    # Only the factors moved, each by at most half a step of its row's grid.
    for name, p in model.named_parameters():
        if name.endswith(("weight_in", "weight_out")):
            step = before[name].abs().amax(1, keepdim=True) / 127
            assert bool(((p - before[name]).abs() <= step / 2 + 1e-7).all())
        else:
            assert torch.equal(p, before[name]), name
    fwsvd.save(model, tmp_path / "q")
    factors = _factor_tensors(tmp_path / "q")
    weights = [k for k in factors if not k.endswith("_scale")]
    assert weights and all(factors[k].dtype == torch.int8 for k in weights)
    assert all(factors[k + "_scale"].dtype == torch.float32 and factors[k + "_scale"].shape == (factors[k].shape[0],) for k in weights)
    record = json.loads((tmp_path / "q" / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    assert record["quantized_factors"] == "int8"

    reloaded = fwsvd.load(tmp_path / "q")
    layer = reloaded.model.layers[0].self_attn.q_proj
    assert layer.weight_in.dtype == torch.float32 and not layer._buffers  # scales folded back in
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(plain(IDS).logits, expected, rtol=0, atol=0)
    # Saved again, a loaded model writes the same int8 bytes.
    fwsvd.save(reloaded, tmp_path / "again")
    again = _factor_tensors(tmp_path / "again")
    assert set(again) == set(factors) and all(torch.equal(again[k], factors[k]) for k in factors)


def test_factors_off_their_grid_are_saved_in_float_and_the_record_says_so(tmp_path: Path):
    model, _ = _quantized_model()
    fwsvd.save(model, tmp_path / "q")
    reloaded = fwsvd.load(tmp_path / "q")
    with torch.no_grad():
        reloaded.model.layers[0].mlp.up_proj.weight_out.add_(1e-3)  # as a training step would
    fwsvd.save(reloaded, tmp_path / "trained")
    factors = _factor_tensors(tmp_path / "trained")
    assert not any(k.endswith("_scale") for k in factors) and all(v.dtype == torch.float32 for v in factors.values())
    record = json.loads((tmp_path / "trained" / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    assert "quantized_factors" not in record
    assert fwsvd.inspect(fwsvd.load(tmp_path / "trained"))["quantized_factors"] is None


def test_damaged_int8_folders_are_refused(tmp_path: Path):
    model, _ = _quantized_model()
    fwsvd.save(model, tmp_path / "q")
    weights = load_file(str(tmp_path / "q" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight_in_scale"
    bad = dict(weights)
    bad[key] = torch.zeros_like(bad[key])
    save_file(bad, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="positive finite scales"):
        fwsvd.load(tmp_path / "q")
    missing = {k: v for k, v in weights.items() if k != key}
    save_file(missing, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(fwsvd.FwsvdError):
        fwsvd.load(tmp_path / "q")
    from fwsvd.storage.record import validate_record

    with pytest.raises(ModelError, match="quantized_factors"):
        validate_record({"method": "svd", "ranks": {}, "quantized_factors": "int4"})


def test_cli_int8_factors_with_bfloat16_weights(llama_dir: Path, tmp_path: Path, capsys):
    from fwsvd.cli import main

    common = ["compress", str(llama_dir), "--method", "svd", "--keep", "0.5", "--quiet", "--json"]
    assert main([*common, "--out", str(tmp_path / "f32")]) == 0
    assert main([*common, "--out", str(tmp_path / "q8"), "--quantize-factors", "int8", "--dtype", "bfloat16"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["quantized_factors"] == "int8" and result["stored_dtype"] == "bfloat16"
    tensors = load_file(str(tmp_path / "q8" / "model.safetensors"))
    factors = [k for k in tensors if k.endswith((".weight_in", ".weight_out"))]
    assert all(tensors[k].dtype == torch.int8 for k in factors)
    assert {v.dtype for k, v in tensors.items() if k not in factors and not k.endswith("_scale")} == {torch.bfloat16}
    plain = load_file(str(tmp_path / "f32" / "model.safetensors"))
    factor_bytes = lambda t: sum(t[k].numel() * t[k].element_size() for k in factors)  # noqa: E731
    assert factor_bytes(tensors) * 4 == factor_bytes(plain)
    assert main(["inspect", str(tmp_path / "q8"), "--quiet"]) == 0
    assert "factors stored as int8 (one float32 scale per row), computing in float32" in capsys.readouterr().out
    with torch.no_grad():
        logits = fwsvd.load(tmp_path / "q8")(IDS).logits
    assert bool(torch.isfinite(logits).all())


def test_cli_refuses_int8_factors_with_low_memory(llama_dir: Path, corpus_txt, tmp_path: Path, capsys):
    from fwsvd.cli import main

    out = tmp_path / "never"
    assert main(["compress", str(llama_dir), "--out", str(out), "--method", "svd", "--keep", "0.5", "--quantize-factors", "int8",
                 "--low-memory", "--data", str(corpus_txt), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--quantize-factors" in err and "--low-memory" in err and len(err.splitlines()) == 1
    assert not out.exists()
