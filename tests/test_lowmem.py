"""Tests for fwsvd.compression.lowmem: weights streamed from disk give the in-memory path's output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fwsvd.cli import main
from fwsvd.storage.loading import load_model

COMMON = ["--keep", "0.6", "--samples", "10", "--batch-size", "4", "--max-length", "16", "--quiet", "--json"]
#: What --low-memory does by default, named for the in-memory run it is compared with: the covariance on
#: --samples (the one-pass default for causal LMs takes it on 8 x as many blocks) and the break-even rule
#: (the one-pass default chooses the rule on held-out text, which a stream does not build).
AS_STREAMED = ["--cov-samples", "10", "--dense-choice", "break-even"]


def _tensors(folder):
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


@pytest.mark.parametrize("family,method", [("llama", "fwsvd"), ("gpt2", "fwsvd"), ("bert", "fwsvd"), ("llama", "svd-llm")])
def test_low_memory_output_equals_in_memory(family, method, model_dirs, sst2_tsv, corpus_txt, tmp_path, capsys):
    """Same tensors (factors equal up to the sign of each component), same ranks, same record."""
    data = sst2_tsv if family == "bert" else corpus_txt
    args = ["compress", str(model_dirs[family]), "--method", method, "--data", str(data), *COMMON]
    assert main([*args, *AS_STREAMED, "--out", str(tmp_path / "memory")]) == 0
    assert main([*args, "--out", str(tmp_path / "streamed"), "--low-memory"]) == 0
    capsys.readouterr()
    memory, streamed = _tensors(tmp_path / "memory"), _tensors(tmp_path / "streamed")
    assert set(memory) == set(streamed)
    assert any(k.endswith(".weight_in") for k in memory)
    for key, ref in memory.items():
        got = streamed[key]
        assert got.shape == ref.shape and got.dtype == ref.dtype, key
        if key.endswith(".weight_out"):
            # A singular vector's sign is arbitrary: align each component before comparing.
            base = key.removesuffix("weight_out")
            sign = torch.sign((ref * got).sum(dim=0))
            got, other = got * sign, streamed[base + "weight_in"] * sign[:, None]
            # Statistics equal to float tolerance (another summation order): factors to 1e-4 of their scale.
            torch.testing.assert_close(other, memory[base + "weight_in"], rtol=1e-4, atol=1e-4 * memory[base + "weight_in"].abs().max().item())
        if not key.endswith(".weight_in"):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * (ref.abs().max().item() or 1.0), msg=key)
    config = {name: json.loads((tmp_path / name / "config.json").read_text()) for name in ("memory", "streamed")}
    record = {name: config[name].pop("quantization_config") for name in config}
    assert config["memory"] == config["streamed"]
    assert record["memory"]["ranks"] == record["streamed"]["ranks"]
    assert record["streamed"]["calibration"]["streamed"] is True
    for key in ("mean_loss", "tokens", "samples") if method == "fwsvd" else ("tokens", "samples"):
        assert record["streamed"]["calibration"][key] == pytest.approx(record["memory"]["calibration"][key], rel=1e-5)
    assert load_model(tmp_path / "streamed").model is not None
    # Nothing stray beside the output (the atomic write's temporary folder is gone).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "streamed"]


def test_low_memory_never_holds_the_dense_block_weights(llama_dir, corpus_txt, tmp_path, monkeypatch, capsys):
    """At most one block's weights are real at any time; the rest stay on the meta device."""
    from fwsvd.compression import lowmem

    peaks = []
    original = lowmem.CheckpointWeights.load

    def load(self, prefix):
        original(self, prefix)
        real = {name.split(".")[2] for name, p in self.model.named_parameters() if name.startswith("model.layers.") and p.device.type != "meta"}
        peaks.append(len(real))

    monkeypatch.setattr(lowmem.CheckpointWeights, "load", load)
    assert main(["compress", str(llama_dir), "--data", str(corpus_txt), "--out", str(tmp_path / "out"), "--low-memory", *COMMON]) == 0
    capsys.readouterr()
    assert peaks and max(peaks) == 1


def test_low_memory_factorizes_without_embeddings_or_tokenizer(llama_dir, corpus_txt, tmp_path, monkeypatch, capsys):
    """While blocks are factorized the embeddings/head are back on the meta device and the
    tokenizer waits on disk; the output still holds both (tokenizer files as save_pretrained wrote them)."""
    from fwsvd.compression import lowmem

    seen = []
    original = lowmem.factorize_targets

    def factorize(model, *args, **kwargs):
        seen.append(model.get_input_embeddings().weight.device.type)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(lowmem, "factorize_targets", factorize)
    out = tmp_path / "out"
    assert main(["compress", str(llama_dir), "--data", str(corpus_txt), "--out", str(out), "--low-memory", *COMMON]) == 0
    capsys.readouterr()
    assert seen and set(seen) == {"meta"}
    reloaded = load_model(out)
    reference = load_model(llama_dir)
    torch.testing.assert_close(reloaded.model.get_input_embeddings().weight, reference.model.get_input_embeddings().weight)
    assert reloaded.tokenizer is not None
    assert reloaded.tokenizer("hello world")["input_ids"] == reference.tokenizer("hello world")["input_ids"]


def test_low_memory_refuses_whole_model_options(llama_dir, corpus_txt, tmp_path, capsys):
    code = main(["compress", str(llama_dir), "--data", str(corpus_txt), "--out", str(tmp_path / "o"), "--low-memory", "--sequential", *COMMON])
    assert code == 2
    assert "--low-memory never holds the whole model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_low_memory_dtype_stores_every_weight_like_the_in_memory_path(llama_dir, corpus_txt, tmp_path, capsys):
    """--dtype bfloat16 under --low-memory: every tensor bfloat16, the same config and record as in memory."""
    args = ["compress", str(llama_dir), "--data", str(corpus_txt), "--dtype", "bfloat16", *COMMON]
    assert main([*args, *AS_STREAMED, "--out", str(tmp_path / "memory")]) == 0
    assert main([*args, "--out", str(tmp_path / "streamed"), "--low-memory"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stored_dtype"] == "bfloat16"
    memory, streamed = _tensors(tmp_path / "memory"), _tensors(tmp_path / "streamed")
    assert set(memory) == set(streamed)
    assert {t.dtype for t in streamed.values()} == {torch.bfloat16}
    for key, ref in memory.items():
        got = streamed[key].float()
        if key.endswith(".weight_out"):
            # The product of the factors does not depend on each component's sign; bfloat16 keeps
            # 8 significant bits, so the two paths' factors (equal to 1e-4 in float32) may round apart.
            base = key.removesuffix("weight_out")
            got, ref = got @ streamed[base + "weight_in"].float(), ref.float() @ memory[base + "weight_in"].float()
        if not key.endswith(".weight_in"):
            torch.testing.assert_close(got, ref.float(), rtol=2e-2, atol=2e-2 * (ref.float().abs().max().item() or 1.0), msg=key)
    config = {name: json.loads((tmp_path / name / "config.json").read_text()) for name in ("memory", "streamed")}
    record = {name: config[name].pop("quantization_config") for name in config}
    assert config["memory"] == config["streamed"]
    assert config["streamed"]["dtype"] == "bfloat16"
    assert record["memory"]["stored_dtype"] == record["streamed"]["stored_dtype"] == "bfloat16"
    assert record["memory"]["ranks"] == record["streamed"]["ranks"]
    assert load_model(tmp_path / "streamed").model.dtype == torch.float32
