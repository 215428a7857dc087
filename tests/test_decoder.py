"""Decoder LLMs end to end: Llama (grouped-query attention), GPT-2 (Conv1D) and OPT.

Tiny models are built offline from configs with a word-level tokenizer from the ``tokenizers``
library; nothing is downloaded and nothing under ``../shared`` is read.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import pytest
import torch

import fwsvd
from fwsvd.config import CalibrationConfig, CompressConfig
from fwsvd.core import whitened_svd
from fwsvd.errors import FwsvdError
from fwsvd.evaluation.evaluate import EvalConfig, evaluate
from fwsvd.methods import get_method
from fwsvd.storage.loading import LoadedModel
from fwsvd.nn import LowRankLinear
from fwsvd.compression.sequential import compress_sequential

WORDS = [f"w{i}" for i in range(61)]
SPECIALS = ["<unk>", "<s>", "</s>"]
VOCAB = len(SPECIALS) + len(WORDS)  # 64
FAMILIES = ["llama", "gpt2", "opt"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def _model(family: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    if family == "llama":
        # 4 query heads sharing 2 key/value heads: k_proj and v_proj are 16x32, q_proj 32x32.
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **special)
        model = LlamaForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, **special)
        model = GPT2LMHeadModel(config)
    else:
        config = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=128, word_embed_proj_dim=32, **special)
        model = OPTForCausalLM(config)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    # A little structure (repeated bigrams) so that the statistics are not white noise.
    words = []
    for _ in range(1200):
        w = rng.choice(WORDS)
        words += [w, WORDS[(WORDS.index(w) * 7) % len(WORDS)]]
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n".join(" ".join(words[i : i + 20]) for i in range(0, len(words), 20)), encoding="utf-8")
    return path


def _calibration(text_file: Path, samples: int = 8, max_length: int = 32) -> CalibrationConfig:
    # The covariance on the Fisher's blocks, as sequential mode takes it (the one-pass default takes 8 x as many).
    return CalibrationConfig(data=str(text_file), samples=samples, cov_samples=samples, max_length=max_length, batch_size=4)


def _loaded(family: str, tokenizer) -> LoadedModel:
    return LoadedModel(_model(family), tokenizer, "causal-lm", f"tiny-{family}")


# --- end to end: calibrate, compress, save, reload, generate ------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_save_reload_generate(family, tokenizer, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = _loaded(family, tokenizer)
    # One pass collects every kind; Fisher uses the input ids as labels.
    stats = fwsvd.calibrate(lm, _calibration(text_file), {"fisher", "act", "cov"}, progress=False)
    assert stats.summary["mean_loss"] > 0
    if family == "llama":
        # q/k/v read the same normalised input, and so do gate/up: one covariance each.
        assert stats.shared["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"
        assert stats.shared["model.layers.0.mlp.up_proj"] == "model.layers.0.mlp.gate_proj"
    x = torch.tensor([[1, 5, 9, 13, 17, 21]])
    for method in ("fwsvd", "svd-llm"):
        model = copy.deepcopy(lm.model)
        report = fwsvd.compress(model, CompressConfig(method=method, keep=0.5), stats, task="causal-lm", progress=False)
        assert report.target_keep < 0.6
        assert any(isinstance(m, LowRankLinear) for m in model.modules())
        out = fwsvd.save(model, tmp_path / method, tokenizer)
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert sum(isinstance(m, LowRankLinear) for m in reloaded.modules()) == sum(r.rank is not None for r in report.layers)
        with torch.no_grad():
            expected, got = model(x).logits, reloaded(x).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        generated = reloaded.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=2)
        assert generated.shape == (1, x.shape[1] + 4)


def test_gqa_key_value_projections_are_factorized(tokenizer):
    lm = _loaded("llama", tokenizer)
    report = fwsvd.compress(lm.model, CompressConfig(method="svd", keep=0.5), task="causal-lm", progress=False)
    shapes = {r.name.rsplit(".", 1)[-1]: r.shape for r in report.layers}
    assert shapes["k_proj"] == (16, 32) and shapes["q_proj"] == (32, 32)
    assert all(r.rank is not None for r in report.layers)


# --- svd-llm on singular and indefinite covariances ---------------------------------------------


@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_whitened_svd_rank_deficient_covariance_is_finite(damping):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g)
    x = torch.randn(10, 16, generator=g)  # 10 tokens < 16 features: rank-deficient
    x[:, 5] = x[:, 4]  # duplicated input feature
    x[:, 7] = 0.0  # dead feature
    cov = (x.T @ x).double()
    # Round-off can make a singular covariance slightly indefinite; make it so on purpose.
    evals, evecs = torch.linalg.eigh(cov)
    evals[0] = -1e-9 * evals[-1]
    cov = evecs @ torch.diag(evals) @ evecs.T
    a, b = whitened_svd(w, 6, cov, damping=damping)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # Still the point of whitening: output error on the calibration inputs no worse than plain SVD's
    # (tolerance 1e-6 relative for float round-off).
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    plain = (u[:, :6] * s[:6]) @ vh[:6]
    err_white = ((w - a @ b) @ x.T).norm()
    err_plain = ((w - plain) @ x.T).norm()
    assert err_white <= err_plain * (1 + 1e-6)


def test_svd_llm_method_on_few_tokens_gives_finite_weights(tokenizer, text_file):
    # 4 tokens for 32- and 64-dimensional inputs: every covariance is singular.
    lm = _loaded("llama", tokenizer)
    stats = fwsvd.calibrate(lm, _calibration(text_file, samples=1, max_length=4), {"cov"}, progress=False)
    method = get_method("svd-llm", damping=0.0)
    for name, entry in stats.tensors.items():
        cov = stats.for_module(name)["cov"]
        # Rank 4 up to the float32 round-off of the accumulation.
        assert torch.linalg.matrix_rank(cov, rtol=1e-5) <= 4
        weight = lm.model.get_submodule(name).weight
        a, b = method.factorize(weight, 3, {"cov": cov})
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
    fwsvd.compress(lm.model, CompressConfig(method="svd-llm", keep=0.5), stats, task="causal-lm", progress=False)
    with torch.no_grad():
        assert torch.isfinite(lm.model(torch.tensor([[1, 4, 8]])).logits).all()


# --- perplexity ---------------------------------------------------------------------------------


def test_perplexity_matches_manual_computation(tokenizer, text_file):
    lm = _loaded("llama", tokenizer)
    result = evaluate(lm, EvalConfig(data=str(text_file), limit=3, max_length=16, batch_size=8), progress=False)
    ids = tokenizer(text_file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(3):
            block = torch.tensor([ids[i * 16 : (i + 1) * 16]])
            logp = torch.log_softmax(lm.model(block).logits[0].double(), dim=-1)
            for t in range(15):
                nll -= float(logp[t, block[0, t + 1]])
                count += 1
    assert result["n"] == 3 and result["tokens"] == count == 45
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


# --- layer-sequential mode ----------------------------------------------------------------------


# The attention output projection of the second block: its input (the attention's result) needs the
# replayed masks and position embeddings, and nothing compressed lies before it.
OUTPUT_PROJECTION = {"llama": "model.layers.1.self_attn.o_proj", "gpt2": "transformer.h.1.attn.c_proj", "opt": "model.decoder.layers.1.self_attn.out_proj"}


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_replays_blocks_exactly(family, tokenizer, text_file):
    """Blocks are replayed with the arguments the model passed them (causal masks, rotary
    embeddings), so a layer with only dense layers before it gets the one-pass factors."""
    config = CompressConfig(method="svd-llm", keep=0.5, include=(OUTPUT_PROJECTION[family],), refit=False)
    seq = _loaded(family, tokenizer)
    report = compress_sequential(seq, config, _calibration(text_file), progress=False)
    ref = _loaded(family, tokenizer)
    stats = fwsvd.calibrate(ref, _calibration(text_file), {"cov"}, include=config.include, progress=False)
    fwsvd.compress(ref.model, config, stats, task="causal-lm", progress=False)
    assert [r.name for r in report.layers] == [OUTPUT_PROJECTION[family]]
    got = seq.model.get_submodule(OUTPUT_PROJECTION[family]).dense_weight()
    want = ref.model.get_submodule(OUTPUT_PROJECTION[family]).dense_weight()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_fits_later_layers_to_compressed_earlier_ones(family, tokenizer, text_file):
    """The first layers (same inputs as one-pass) match; later ones see compressed inputs."""
    seq = _loaded(family, tokenizer)
    report = compress_sequential(seq, CompressConfig(method="svd-llm", keep=0.5, refit=False), _calibration(text_file), progress=False)
    ref = _loaded(family, tokenizer)
    stats = fwsvd.calibrate(ref, _calibration(text_file), {"cov"}, progress=False)
    ref_report = fwsvd.compress(ref.model, CompressConfig(method="svd-llm", keep=0.5), stats, task="causal-lm", progress=False)
    assert [(r.name, r.rank) for r in report.layers] == [(r.name, r.rank) for r in ref_report.layers]
    first, later = report.layers[0].name, OUTPUT_PROJECTION[family]
    for name, same in ((first, True), (later, False)):
        got = seq.model.get_submodule(name).dense_weight()
        want = ref.model.get_submodule(name).dense_weight()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5) is same, name


def test_sequential_record_matches_one_pass_and_reloads(tokenizer, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    seq = _loaded("llama", tokenizer)
    report = compress_sequential(seq, CompressConfig(method="asvd", keep=0.5), _calibration(text_file), progress=False)
    ref = _loaded("llama", tokenizer)
    stats = fwsvd.calibrate(ref, _calibration(text_file), {"act"}, progress=False)
    ref_report = fwsvd.compress(ref.model, CompressConfig(method="asvd", keep=0.5), stats, task="causal-lm", progress=False)
    seq_dict, ref_dict = report.to_dict(), ref_report.to_dict()
    assert seq_dict.keys() == ref_dict.keys()
    assert [(r["name"], r["rank"]) for r in seq_dict["layers"]] == [(r["name"], r["rank"]) for r in ref_dict["layers"]]
    assert seq_dict["calibration"]["sequential"] is True
    assert seq_dict["calibration"]["tokens"] == ref_dict["calibration"]["tokens"] == 8 * 32
    seq_record = seq.model.config.quantization_config.to_dict()
    assert seq_record.keys() == ref.model.config.quantization_config.to_dict().keys()
    out = fwsvd.save(seq.model, tmp_path / "seq", tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.tensor([[1, 3, 5, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, seq.model(x).logits, rtol=1e-5, atol=1e-5)


def test_sequential_svd_equals_one_pass_svd(tokenizer, text_file):
    seq = _loaded("gpt2", tokenizer)
    compress_sequential(seq, CompressConfig(method="svd", keep=0.4), _calibration(text_file), progress=False)
    ref = _loaded("gpt2", tokenizer)
    fwsvd.compress(ref.model, CompressConfig(method="svd", keep=0.4), task="causal-lm", progress=False)
    x = torch.tensor([[1, 3, 5, 7]])
    with torch.no_grad():
        torch.testing.assert_close(seq.model(x).logits, ref.model(x).logits, rtol=1e-5, atol=1e-5)


def test_sequential_refuses_targets_outside_blocks(tokenizer, text_file):
    lm = _loaded("llama", tokenizer)
    with pytest.raises(FwsvdError, match="lm_head"):
        compress_sequential(lm, CompressConfig(method="svd-llm", keep=0.5, include=("lm_head", r".*q_proj")), _calibration(text_file), progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in lm.model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_fwsvd_takes_fisher_from_one_dense_pass(family, tokenizer, text_file):
    """Sequential fwsvd's Fisher is the one-pass Fisher of the dense model: the first block (dense
    inputs in both modes) gets exactly the one-pass factors, and statistics handed in are used as
    they are (same model as when computed inside)."""
    first_block = {"llama": r"model\.layers\.0\..*", "gpt2": r"transformer\.h\.0\..*", "opt": r"model\.decoder\.layers\.0\..*"}[family]
    # Uniform ranks: with global allocation a near-tie between two layers' components could let
    # float round-off in the two Fisher passes move one rank; this test is about where Fisher comes from.
    config = CompressConfig(method="fwsvd", keep=0.5, include=(first_block,), refit=False, allocation="uniform")
    seq = _loaded(family, tokenizer)
    report = compress_sequential(seq, config, _calibration(text_file), progress=False)
    assert report.calibration["sequential"] is True and report.calibration["fisher_granularity"] == "example"
    ref = _loaded(family, tokenizer)
    stats = fwsvd.calibrate(ref, _calibration(text_file), config.needs("causal-lm"), include=config.include, progress=False)
    given = _loaded(family, tokenizer)
    compress_sequential(given, config, _calibration(text_file), statistics=stats, progress=False)
    fwsvd.compress(ref.model, config, stats, task="causal-lm", progress=False)
    for row in report.layers:
        want = ref.model.get_submodule(row.name).dense_weight()
        for model in (seq.model, given.model):
            torch.testing.assert_close(model.get_submodule(row.name).dense_weight(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["fwsvd", "svd-llm"])
def test_sequential_refit_lowers_the_error_and_records_it(method, tokenizer, text_file):
    lm = _loaded("llama", tokenizer)
    # 16 batches: every 4th is held out and judges the refit fitted to the other 12.
    calibration = _calibration(text_file, samples=64)
    report = compress_sequential(lm, CompressConfig(method=method, keep=0.4, refit=True), calibration, progress=False)
    refit = report.calibration["refit"]
    assert refit["layers"] == sum(r.rank is not None for r in report.layers)
    assert refit["held_out_batches"] == 4
    assert 0 < refit["kept"] <= refit["layers"] and 0 < refit["mean_step"] <= 1
    plain = _loaded("llama", tokenizer)
    compress_sequential(plain, CompressConfig(method=method, keep=0.4, refit=False), calibration, progress=False)
    # Same ranks; the refit factors differ where kept.
    assert lm.model.config.quantization_config.ranks == plain.model.config.quantization_config.ranks


def test_refit_is_kept_only_where_it_lowers_the_error():
    from fwsvd.core import output_error, whitened_svd
    from fwsvd.methods import get_method
    from fwsvd.compression.sequential import _Refit

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 8, generator=g, dtype=torch.float64)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    cov = x.T @ x
    a0, b = whitened_svd(w, 3, cov, damping=0.0)
    stats = {"cov": cov, "cross": cov, "dense_cov": cov}
    # Same inputs: the undamped whitened factors are already optimal; a heavily damped refit is
    # worse, so it is refused.
    refit = _Refit(get_method("svd-llm"), damping=10.0)
    a, _ = refit(w, a0, b, stats)
    assert a is a0 and refit.kept == 0 and refit.tried == 1
    # Shifted inputs: the refit lowers the error against the dense outputs and is kept.
    xt = x + 0.5 * torch.randn(64, 8, generator=g, dtype=torch.float64)
    shifted = {"cov": xt.T @ xt, "cross": x.T @ xt, "dense_cov": cov}
    refit = _Refit(get_method("svd-llm"), damping=1e-6)
    a1, b1 = refit(w, a0, b, shifted)
    assert refit.kept == 1
    assert output_error(w, a1, b1, shifted["cov"], shifted["cross"], cov) < output_error(w, a0, b, shifted["cov"], shifted["cross"], cov)


def test_held_out_refit_moves_only_as_far_as_the_held_out_tokens_support():
    from fwsvd.core import output_error, whitened_svd
    from fwsvd.methods import get_method
    from fwsvd.compression.sequential import _Refit, held_out_batches

    assert held_out_batches(1) == frozenset() and held_out_batches(2) == {1} and held_out_batches(9) == {3, 7}
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 8, generator=g, dtype=torch.float64)

    def moments(n: int, drift: float) -> dict[str, torch.Tensor]:
        # Compressed inputs: the dense ones plus noise plus a systematic drift.
        x = torch.randn(n, 8, generator=g, dtype=torch.float64)
        xt = x + 0.2 * torch.randn(n, 8, generator=g, dtype=torch.float64) + drift * x @ torch.ones(8, 8, dtype=torch.float64) / 8
        return {"cov": xt.T @ xt, "cross": x.T @ xt, "dense_cov": x.T @ x}

    fit, held = moments(4000, 0.3), moments(1000, 0.3)
    a0, b = whitened_svd(w, 3, fit["cov"] + held["cov"], damping=0.0)
    stats = {"cov": fit["cov"] + held["cov"], "cross": fit["cross"], "dense_cov": fit["dense_cov"],
             "held_cov": held["cov"], "held_cross": held["cross"], "held_dense_cov": held["dense_cov"]}
    refit = _Refit(get_method("svd-llm"), damping=1e-6)
    a1, b1 = refit(w, a0, b, stats)
    # The same systematic shift in both parts: the refit carries over and lowers the held-out error.
    assert refit.kept == 1 and refit.steps[0] > 0.5
    assert output_error(w, a1, b1, held["cov"], held["cross"], held["dense_cov"]) < output_error(w, a0, b, held["cov"], held["cross"], held["dense_cov"])
    # Held-out tokens that drift the other way: the correction fitted to the rest only hurts there.
    other = moments(1000, -0.3)
    stats.update({"held_cov": other["cov"], "held_cross": other["cross"], "held_dense_cov": other["dense_cov"]})
    a2, _ = refit(w, a0, b, stats)
    assert refit.steps[1] == 0.0 and a2 is a0 and refit.kept == 1 and refit.tried == 2


def test_global_allocation_keeps_the_budget_and_the_floor(tokenizer, text_file):
    lm = _loaded("llama", tokenizer)
    config = CompressConfig(method="fwsvd", keep=0.5, allocation="global", rank_floor=0.5)
    stats = fwsvd.calibrate(lm, _calibration(text_file), config.needs("causal-lm"), progress=False)
    report = fwsvd.compress(lm.model, config, stats, task="causal-lm", progress=False)
    # Within one rank of the widest layer below the budget (never above).
    widest = max(sum(r.shape) for r in report.layers)
    assert report.target_keep <= 0.5 + 1e-9
    assert (0.5 - report.target_keep) * report.to_dict()["target_dense_parameters"] <= widest + max(r.shape[0] for r in report.layers)
    for row in report.layers:
        if row.rank is not None:
            uniform = fwsvd.core.rank_for_kept_fraction(*row.shape, 0.5) or 1
            assert row.rank >= math.ceil(0.5 * uniform)
    record = lm.model.config.quantization_config.to_dict()
    assert record["allocation"] == {"mode": "global", "rank_floor": 0.5}
    ranks = [r.rank for r in report.layers]
    uniform_ranks = [fwsvd.core.rank_for_kept_fraction(*r.shape, 0.5) for r in report.layers]
    assert ranks != uniform_ranks  # the loss estimate moved the budget


def test_sequential_refuses_encoder_decoder_models(tokenizer, text_file):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4)).eval()
    lm = LoadedModel(model, tokenizer, "causal-lm", "tiny-t5")
    with pytest.raises(FwsvdError, match="stacks of blocks"):
        compress_sequential(lm, CompressConfig(method="svd-llm", keep=0.5), _calibration(text_file), progress=False)


# --- GGUF input ---------------------------------------------------------------------------------


def _write_tiny_gguf(path: Path) -> None:
    """A 2-layer Llama with grouped-query attention as an unquantized GGUF file, with a byte-level
    tokenizer of single characters (no merges needed)."""
    import numpy as np
    import gguf

    rng = np.random.default_rng(0)
    vocab, hidden, ffn, layers, heads, kv_heads = 64, 32, 64, 2, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + ["Ġ", "Ċ"]  # byte-level space and newline
    tokens = ["<unk>", "<s>", "</s>"] + chars + [f"tok{i}" for i in range(vocab - 3 - len(chars))]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    kv = kv_heads * hidden // heads
    for i in range(layers):
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    tensor("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_folder_compresses_to_a_plain_safetensors_folder(text_file, tmp_path, capsys):
    # No skip: `make install` brings gguf and accelerate (the gguf extra), so CI always runs this.
    import json

    from transformers import AutoModelForCausalLM

    from fwsvd.cli import main

    folder = tmp_path / "gguf-model"
    folder.mkdir()
    _write_tiny_gguf(folder / "tiny.gguf")
    dense = fwsvd.load_model(folder, need_tokenizer=True)
    assert dense.task == "causal-lm"  # GGUF configs name no architecture
    assert getattr(dense.model, "hf_quantizer", None) is None  # nothing ties it to the GGUF loader
    out = tmp_path / "compressed"
    common = ["--data", str(text_file), "--max-length", "16", "--json", "--quiet"]
    assert main(["compress", str(folder), "--out", str(out), "--method", "svd-llm", "--keep", "0.5", "--samples", "4", *common]) == 0
    capsys.readouterr()
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.gguf"))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["quantization_config"]["quant_method"] == "fwsvd"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert sum(isinstance(m, LowRankLinear) for m in reloaded.modules()) == 14
    assert main(["eval", str(folder), "--limit", "2", *common]) == 0
    dense_ppl = json.loads(capsys.readouterr().out)["perplexity"]
    assert main(["eval", str(out), "--limit", "2", *common]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["perplexity"]) and math.isfinite(dense_ppl)
