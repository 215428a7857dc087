"""Inference paths: weights loaded from GGUF are ordinary tensors; fast forwards equal the plain one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import low_rank_ranks, make_llama
from test_decoder import _write_tiny_gguf

import fwsvd
from fwsvd.storage.loading import own_storage


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


# --- weights stored in half precision (--dtype) ----------------------------------------------------


def _tied_llama_dir(tmp_path: Path) -> Path:
    """A tiny Llama whose head is tied to its embedding (the largest tensor of a small model)."""
    from conftest import save_model

    model = make_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    return save_model(model, tmp_path / "dense")


def _file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(file)).items()}


def _weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_stores_every_weight_halves_the_folder_and_reloads_in_float32(tmp_path: Path, dtype: str):
    from transformers import AutoModelForCausalLM

    dense = _tied_llama_dir(tmp_path)
    ids = torch.tensor([[2, 5, 9, 14, 3]])
    folders, models = {}, {}
    for stored in ("float32", dtype):
        lm = fwsvd.load_model(dense)
        fwsvd.compress(lm.model, fwsvd.CompressConfig(method="svd", keep=0.5, dtype=None if stored == "float32" else stored), task="causal-lm", progress=False)
        models[stored] = lm.model
        folders[stored] = fwsvd.save(lm.model, tmp_path / stored)
    half = models[dtype]
    assert {p.dtype for p in half.parameters()} == {getattr(torch, dtype)}
    assert half.lm_head.weight is half.model.embed_tokens.weight  # still tied, stored once
    tensors = {name: _file_tensors(folders[name]) for name in folders}
    assert tensors[dtype].keys() == tensors["float32"].keys()
    assert {t.dtype for t in tensors[dtype].values()} == {getattr(torch, dtype)}  # embedding, norms, factors: all of them
    assert sum(t.nbytes for t in tensors[dtype].values()) * 2 == sum(t.nbytes for t in tensors["float32"].values())
    # The files also hold a small JSON header each: the tiny model's folder is about half.
    assert 0.5 < _weight_bytes(folders[dtype]) / _weight_bytes(folders["float32"]) < 0.55
    config = json.loads((folders[dtype] / "config.json").read_text(encoding="utf-8"))
    assert config["dtype"] == dtype and config["quantization_config"]["stored_dtype"] == dtype
    assert "factor_dtype" not in config["quantization_config"]

    # fwsvd.load computes in float32, with the weights rounded to ``dtype``: the float32-factor
    # model with every weight rounded the same way gives the same logits (float32 tolerance).
    rounded = models["float32"]
    with torch.no_grad():
        for p in rounded.parameters():
            p.data = p.data.to(getattr(torch, dtype)).float()
        expected = rounded(ids).logits
    reloaded = fwsvd.load(folders[dtype])
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
        # The in-memory model computes in ``dtype`` (like any model after .to(dtype)): rounding of
        # every intermediate, 8 (bfloat16) or 11 (float16) significant bits.
        torch.testing.assert_close(half(ids).logits.float(), expected, rtol=0.05, atol=0.05)
    info = fwsvd.inspect(reloaded)
    assert (info["stored_dtype"], info["factor_dtype"], info["dtype"]) == (dtype, dtype, "float32")

    # from_pretrained's default (dtype="auto") takes the stored dtype from config.json, as for any
    # Hugging Face checkpoint; an explicit dtype wins.
    auto = AutoModelForCausalLM.from_pretrained(folders[dtype])
    assert auto.dtype == getattr(torch, dtype)
    as_float = AutoModelForCausalLM.from_pretrained(folders[dtype], dtype=torch.float32)
    assert as_float.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(as_float(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(auto(ids).logits.float(), expected, rtol=0.05, atol=0.05)


def test_resaving_a_model_loaded_in_float32_records_float32(tmp_path: Path):
    """The record says what the folder holds: a bfloat16 folder loaded in float32 and saved again is float32."""
    lm = fwsvd.load_model(_tied_llama_dir(tmp_path))
    fwsvd.compress(lm.model, fwsvd.CompressConfig(method="svd", keep=0.5, dtype="bfloat16"), task="causal-lm", progress=False)
    first = fwsvd.save(lm.model, tmp_path / "bf16")
    again = fwsvd.save(fwsvd.load(first), tmp_path / "again")
    config = json.loads((again / "config.json").read_text(encoding="utf-8"))
    assert config["dtype"] == "float32" and config["quantization_config"]["stored_dtype"] == "float32"
    assert {t.dtype for t in _file_tensors(again).values()} == {torch.float32}


def test_older_folders_with_only_the_factors_cast_still_load(tmp_path: Path, capsys):
    """Folders written when --dtype cast only the factors (record: factor_dtype) load and inspect as before."""
    from fwsvd.cli import main

    ids = torch.tensor([[2, 5, 9, 14, 3]])
    lm = fwsvd.load_model(_tied_llama_dir(tmp_path))
    fwsvd.compress(lm.model, fwsvd.CompressConfig(method="svd", keep=0.5), task="causal-lm", progress=False)
    fwsvd.api.cast_factors(lm.model, "bfloat16")  # what --dtype bfloat16 did then
    with torch.no_grad():
        expected = lm.model(ids).logits
    out = fwsvd.save(lm.model, tmp_path / "old")
    tensors = _file_tensors(out)
    assert {t.dtype for k, t in tensors.items() if k.endswith((".weight_in", ".weight_out"))} == {torch.bfloat16}
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    record = json.loads((out / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    assert record["factor_dtype"] == "bfloat16" and "stored_dtype" not in record
    reloaded = fwsvd.load(out)
    info = fwsvd.inspect(reloaded)
    assert (info["stored_dtype"], info["factor_dtype"], info["dtype"]) == (None, "bfloat16", "float32")
    with torch.no_grad():
        # In memory the bfloat16 factors multiplied bfloat16-rounded inputs; reloaded, they are float32.
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-3, atol=1e-3)
    assert main(["inspect", str(out), "--quiet"]) == 0
    assert "factors stored as bfloat16 (other weights in the model's dtype)" in capsys.readouterr().out
    # Saved again from float32, the record no longer claims bfloat16 factors.
    again = fwsvd.save(reloaded, tmp_path / "again")
    assert "factor_dtype" not in json.loads((again / "config.json").read_text(encoding="utf-8"))["quantization_config"]


def test_dtype_is_validated():
    with pytest.raises(fwsvd.FwsvdError, match="--dtype 'int8'"):
        fwsvd.CompressConfig(method="svd", keep=0.5, dtype="int8")
    from fwsvd.errors import ModelError
    from fwsvd.storage.record import validate_record

    with pytest.raises(ModelError, match="stored_dtype"):
        validate_record({"method": "svd", "ranks": {}, "stored_dtype": "int8"})


def test_cli_dtype_option_is_recorded_and_inspected(llama_dir: Path, tmp_path: Path, capsys):
    from fwsvd.cli import main

    out = tmp_path / "bf16"
    assert main(["compress", str(llama_dir), "--out", str(out), "--method", "svd", "--keep", "0.5", "--dtype", "bfloat16", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stored_dtype"] == result["factor_dtype"] == "bfloat16"
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["quantization_config"]["stored_dtype"] == "bfloat16" and config["dtype"] == "bfloat16"
    assert main(["inspect", str(out), "--quiet"]) == 0
    assert "weights stored as bfloat16, computing in float32" in capsys.readouterr().out
    assert main(["inspect", str(out), "--quiet", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["stored_dtype"], info["dtype"]) == ("bfloat16", "float32")


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


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_rank_multiple_rounds_every_rank_within_the_budget(allocation: str):
    plain, rounded = make_llama(), make_llama()
    base = fwsvd.compress(plain, fwsvd.CompressConfig(method="svd", keep=0.5, allocation=allocation), task="causal-lm", progress=False)
    report = fwsvd.compress(rounded, fwsvd.CompressConfig(method="svd", keep=0.5, allocation=allocation, rank_multiple=8), task="causal-lm", progress=False)
    before, after = low_rank_ranks(plain), low_rank_ranks(rounded)
    assert any(r % 8 for r in before.values()), "the test needs ranks that are not already multiples of 8"
    assert all(r % 8 == 0 or r < 8 for r in after.values()) and after != before
    assert report.parameters_after <= base.parameters_after
    # Ranks of 8-16 on 32-wide layers: a multiple of 8 is coarse here, yet most of the budget stays spent.
    assert report.parameters_after >= 0.9 * base.parameters_after
    assert fwsvd.inspect(rounded)["allocation"]["rank_multiple"] == 8
    assert "rank_multiple" not in fwsvd.inspect(plain)["allocation"]


def test_rank_multiple_in_the_cli_low_memory_and_inspect(llama_dir: Path, corpus_txt, tmp_path: Path, capsys):
    from fwsvd.cli import main

    common = ["--method", "svd", "--keep", "0.5", "--rank-multiple", "8", "--json", "--quiet"]
    assert main(["compress", str(llama_dir), "--out", str(tmp_path / "a"), *common]) == 0
    in_memory = {row["name"]: row["rank"] for row in json.loads(capsys.readouterr().out)["layers"]}
    assert main(["compress", str(llama_dir), "--out", str(tmp_path / "b"), "--low-memory", "--data", str(corpus_txt),
                 "--samples", "4", "--max-length", "16", *common]) == 0
    assert {row["name"]: row["rank"] for row in json.loads(capsys.readouterr().out)["layers"]} == in_memory
    assert all(r is None or r % 8 == 0 or r < 8 for r in in_memory.values())
    assert main(["inspect", str(tmp_path / "a"), "--quiet"]) == 0
    assert "ranks in multiples of 8" in capsys.readouterr().out
    assert main(["compress", str(llama_dir), "--out", str(tmp_path / "c"), "--method", "svd", "--keep", "0.5", "--rank-multiple", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--rank-multiple 0" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c").exists()
