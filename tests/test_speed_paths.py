"""Inference paths: weights loaded from GGUF are ordinary tensors; fast forwards equal the plain one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_llama
from test_decoder import _write_tiny_gguf

import fwsvd
from fwsvd.models import own_storage


def _ordinary(tensor: torch.Tensor) -> bool:
    """Contiguous, at the start of a storage of exactly its size, from torch's (64-byte aligned) allocator."""
    return (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        and tensor.data_ptr() % 64 == 0
    )


def test_own_storage_turns_numpy_views_into_ordinary_tensors():
    model = make_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    ids = torch.tensor([[2, 5, 9, 14, 3]])
    with torch.no_grad():
        expected = model(ids).logits
        # What a reader that de-quantises with numpy hands over: arrays (with numpy's alignment),
        # transposed views and slices of larger buffers.
        for n, p in enumerate(model.parameters()):
            array = p.detach().numpy()
            if p.ndim == 2 and n % 2:
                view = torch.from_numpy(np.ascontiguousarray(array.T)).t()
            else:
                buffer = np.zeros(array.size + 3, dtype=array.dtype)
                buffer[3:] = array.ravel()
                view = torch.from_numpy(buffer)[3:].view(p.shape)
            p.data = view
    assert not all(_ordinary(p) for p in model.parameters())
    assert own_storage(model) == len(list(model.parameters())) + len(list(model.buffers()))
    assert all(_ordinary(p) for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def test_gguf_loaded_weights_are_ordinary_tensors(tmp_path: Path):
    folder = tmp_path / "gguf-model"
    folder.mkdir()
    _write_tiny_gguf(folder / "tiny.gguf")
    model = fwsvd.load_model(folder).model
    bad = [name for name, p in model.named_parameters() if not _ordinary(p)]
    assert not bad, f"GGUF-loaded weights that are not ordinary tensors: {bad}"


# --- factors stored in half precision -----------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_factors_halve_their_bytes_and_reload(llama_dir: Path, tmp_path: Path, dtype: str):
    from safetensors import safe_open

    ids = torch.tensor([[2, 5, 9, 14, 3]])
    factor_bytes, outputs = {}, {}
    for stored in ("float32", dtype):
        lm = fwsvd.load_model(llama_dir)
        config = fwsvd.CompressConfig(method="svd", keep=0.5, dtype=None if stored == "float32" else stored)
        fwsvd.compress(lm.model, config, task="causal-lm", progress=False)
        with torch.no_grad():
            outputs[stored] = lm.model(ids).logits
        out = fwsvd.save(lm.model, tmp_path / stored)
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            factors = [f.get_tensor(k) for k in f.keys() if k.endswith((".weight_in", ".weight_out"))]
        assert {t.dtype for t in factors} == {getattr(torch, stored)}
        factor_bytes[stored] = sum(t.numel() * t.element_size() for t in factors)
        reloaded = fwsvd.load_model(out).model
        assert fwsvd.inspect(reloaded)["factor_dtype"] == (None if stored == "float32" else stored)
        assert reloaded.config.quantization_config.to_dict().get("factor_dtype") == (None if stored == "float32" else stored)
        with torch.no_grad():
            # The reloaded model computes in float32 with the stored (rounded) factors: same outputs.
            torch.testing.assert_close(reloaded(ids).logits, outputs[stored], rtol=1e-3, atol=1e-3)
    assert factor_bytes[dtype] * 2 == factor_bytes["float32"]
    # Rounding the factors to 8 (bfloat16) or 11 (float16) significant bits moves the logits a little.
    torch.testing.assert_close(outputs[dtype], outputs["float32"], rtol=0.05, atol=0.05)


def test_dtype_is_validated():
    with pytest.raises(fwsvd.FwsvdError, match="--dtype 'int8'"):
        fwsvd.CompressConfig(method="svd", keep=0.5, dtype="int8")


def test_cli_dtype_option_is_recorded_and_inspected(llama_dir: Path, tmp_path: Path, capsys):
    import json

    from fwsvd.cli import main

    out = tmp_path / "bf16"
    assert main(["compress", str(llama_dir), "--out", str(out), "--method", "svd", "--keep", "0.5", "--dtype", "bfloat16", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["factor_dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["quantization_config"]["factor_dtype"] == "bfloat16"
    assert main(["inspect", str(out), "--quiet"]) == 0
    assert "factors stored as bfloat16" in capsys.readouterr().out
