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


# --- first factors of layers reading the same input, stacked --------------------------------------


def _compressed(make):
    model = make()
    fwsvd.compress(model, fwsvd.CompressConfig(method="svd", keep=0.5), task="causal-lm", progress=False)
    return model


def _count_linear_calls(monkeypatch) -> list[int]:
    import fwsvd.nn as fnn

    calls = [0]
    plain = fnn.F.linear

    def counting(*args, **kwargs):
        calls[0] += 1
        return plain(*args, **kwargs)

    monkeypatch.setattr(fnn.F, "linear", counting)
    return calls


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2"])
def test_stacked_first_factors_equal_the_plain_forward(name: str, monkeypatch):
    from conftest import make_bert, make_gpt2

    from fwsvd.nn import stack_shared_inputs

    model = _compressed({"llama": make_llama, "bert": make_bert, "gpt2": make_gpt2}[name])
    ids = torch.tensor([[2, 5, 9, 14, 3, 7], [2, 8, 8, 11, 3, 0]])
    keys = list(model.state_dict())
    calls = _count_linear_calls(monkeypatch)
    with torch.no_grad():
        plain = model(ids)[0]
    plain_calls, calls[0] = calls[0], 0
    groups = stack_shared_inputs(model, ids)
    # q/k/v (and gate/up) share their input in Llama and BERT; GPT-2's c_attn is one layer already.
    expected = {"llama": [3, 2, 3, 2], "bert": [3, 3], "gpt2": []}[name]
    assert [len(g) for g in groups] == expected
    calls[0] = 0
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(model(ids)[0], plain, rtol=1e-5, atol=1e-5)
    assert calls[0] == 2 * (plain_calls - sum(len(g) - 1 for g in groups))  # one product per group instead of one per layer
    assert list(model.state_dict()) == keys  # nothing to save or load changed


def test_stacked_first_factors_train_like_plain_ones():
    from fwsvd.nn import stack_shared_inputs

    ids = torch.tensor([[2, 5, 9, 14, 3, 7]])
    grads = []
    for stacked in (False, True):
        model = _compressed(make_llama).train()
        if stacked:
            stack_shared_inputs(model, ids)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if stacked:
            # A training step changes the factors in place: the stacked copy follows them.
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad if p.grad is not None else 0
                model.eval()
                fast = model(ids).logits
                for m in model.modules():
                    m.__dict__.pop("_shared_input", None)
                torch.testing.assert_close(model(ids).logits, fast, rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_stacked_model_saves_and_reloads(tmp_path: Path):
    import copy

    from fwsvd.nn import stack_shared_inputs

    model = _compressed(make_llama)
    ids = torch.tensor([[2, 5, 9, 14, 3, 7]])
    stack_shared_inputs(model, ids)
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(copy.deepcopy(model)(ids).logits, expected)
    fwsvd.save(model, tmp_path / "m")
    reloaded = fwsvd.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


# --- rank rounding --------------------------------------------------------------------------------


def test_round_ranks_keeps_the_budget_and_uses_multiples():
    from fwsvd.core import factorized_parameters, round_ranks

    shapes = [(576, 576, False), (192, 576, False), (1536, 576, False), (576, 1536, True), (64, 64, False)]
    ranks = [131, 70, 205, 3, None]
    rounded = round_ranks(ranks, shapes, 8)
    params = lambda rs: sum(factorized_parameters(o, i, r, b) for (o, i, b), r in zip(shapes, rs) if r is not None)  # noqa: E731
    assert params(rounded) <= params(ranks)
    assert rounded[3] == 3 and rounded[4] is None  # below the multiple, or dense: untouched
    assert all(r % 8 == 0 for r in rounded[:3])
    # 70 and 131 rounded up with what rounding all three down freed; 205 -> 208 would overspend.
    assert rounded == [136, 72, 200, 3, None]
    assert round_ranks(ranks, shapes, 1) == ranks
