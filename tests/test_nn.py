"""Tests for fwsvd.nn: the low-rank layer, finding the targeted linears, swapping them in place."""

from __future__ import annotations

import pytest
import torch
from conftest import make_bert, make_gpt2, make_llama, make_opt
from torch import nn
from transformers.pytorch_utils import Conv1D

from fwsvd import api
from fwsvd.core import weighted_svd
from fwsvd.errors import ModelError
from fwsvd.nn import LowRankLinear, find_blocks, find_targets, linear_weight, low_rank_skeleton, swap_module


@pytest.fixture(scope="module")
def bert():
    return make_bert()


@pytest.fixture(scope="module")
def gpt2():
    return make_gpt2()


# --- LowRankLinear --------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_from_factors_equals_dense_layer_at_full_rank(bias):
    torch.manual_seed(0)
    dense = nn.Linear(12, 8, bias=bias)
    a, b = weighted_svd(dense.weight, 8)
    low = LowRankLinear.from_factors(a, b, dense.bias)
    assert (low.in_features, low.out_features, low.rank) == (12, 8, 8)
    assert (low.bias is None) == (not bias)
    x = torch.randn(3, 5, 12)
    # float32 SVD round-off on O(1) outputs: 1e-5 absolute.
    torch.testing.assert_close(low(x), dense(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(low.dense_weight(), dense.weight, rtol=0, atol=1e-5)


def test_from_factors_keeps_dtype_and_copies():
    a = torch.randn(6, 2, dtype=torch.float64)
    b = torch.randn(2, 4, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    low = LowRankLinear.from_factors(a, b, bias)
    assert low.weight_out.dtype == low.weight_in.dtype == low.bias.dtype == torch.float64
    assert torch.equal(low.weight_out, a) and torch.equal(low.weight_in, b) and torch.equal(low.bias, bias)
    a.zero_()  # the layer holds its own copy
    assert low.weight_out.abs().sum() > 0
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(low(x), x @ (low.weight_out @ low.weight_in).T + bias, rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in low.parameters()) == 2 * (6 + 4) + 6
    assert "rank=2" in repr(low)


@pytest.mark.parametrize("rank", [0, 5])
def test_low_rank_linear_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 6, rank)


def test_from_factors_replaces_conv1d_at_full_rank():
    torch.manual_seed(1)
    conv = Conv1D(10, 6)  # GPT-2 layout: nf=10 outputs, nx=6 inputs, weight [6, 10]
    nn.init.normal_(conv.bias)
    w = linear_weight(conv)
    assert w.shape == (10, 6)
    a, b = weighted_svd(w, 6)
    low = LowRankLinear.from_factors(a, b, conv.bias.detach())
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(low(x), conv(x), rtol=0, atol=1e-5)  # float32 round-off


# --- find_blocks / find_targets -------------------------------------------------------------------


def test_find_blocks_is_structural(bert, gpt2):
    assert find_blocks(bert) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert find_blocks(gpt2) == ["transformer.h.0", "transformer.h.1"]
    assert find_blocks(make_llama()) == ["model.layers.0", "model.layers.1"]
    assert find_blocks(make_opt()) == ["model.decoder.layers.0", "model.decoder.layers.1"]
    assert find_blocks(nn.Sequential(nn.Linear(2, 2))) == []


def test_find_targets_bert_selects_only_block_linears(bert):
    targets = find_targets(bert)
    names = [t.name for t in targets]
    assert len(names) == 12  # 2 layers x (query, key, value, attention.output, intermediate, output)
    assert all(n.startswith("bert.encoder.layer.") for n in names)
    assert "bert.pooler.dense" not in names and "classifier" not in names
    assert {t.kind for t in targets} == {"linear"}
    by_name = {t.name: t for t in targets}
    assert (by_name["bert.encoder.layer.0.intermediate.dense"].out_features, by_name["bert.encoder.layer.0.intermediate.dense"].in_features) == (64, 32)
    assert by_name["bert.encoder.layer.1.output.dense"].bias
    # Model order: layer 0 before layer 1.
    assert names.index("bert.encoder.layer.0.output.dense") < names.index("bert.encoder.layer.1.attention.self.query")


def test_find_targets_gpt2_selects_conv1d_in_blocks(gpt2):
    targets = find_targets(gpt2)
    names = {t.name for t in targets}
    expected = {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert names == expected
    assert "lm_head" not in names
    assert {t.kind for t in targets} == {"conv1d"}
    c_attn = next(t for t in targets if t.name == "transformer.h.0.attn.c_attn")
    assert (c_attn.out_features, c_attn.in_features) == (96, 32)  # [out, in] even though Conv1D stores [in, out]


def test_find_targets_llama_gqa():
    targets = {t.name: t for t in find_targets(make_llama())}
    assert len(targets) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(n.startswith("model.layers.") for n in targets)
    assert "lm_head" not in targets
    # Grouped-query attention: k/v project to 2 heads x 8 dims, q to 4 heads x 8 dims.
    assert targets["model.layers.0.self_attn.k_proj"].out_features == 16
    assert targets["model.layers.0.self_attn.q_proj"].out_features == 32


def test_find_targets_include_exclude(bert):
    attention = find_targets(bert, include=["*.attention.*"])
    assert len(attention) == 8 and all(".attention." in t.name for t in attention)
    regex = find_targets(bert, include=[r"bert\.encoder\.layer\.1\..*"])
    assert len(regex) == 6 and all(t.name.startswith("bert.encoder.layer.1.") for t in regex)
    no_ffn = find_targets(bert, exclude=["*.intermediate.*", r".*\.output\.dense"])
    assert {t.name.rsplit(".", 1)[-1] for t in no_ffn} == {"query", "key", "value"}
    # include replaces the default selection, so a head outside the blocks can be chosen on purpose.
    head = find_targets(bert, include=["classifier"])
    assert [t.name for t in head] == ["classifier"]


def test_find_targets_nothing_left_raises(bert):
    with pytest.raises(ModelError, match="no supported linear layers"):
        find_targets(bert, include=["nothing.matches.*"])
    with pytest.raises(ModelError):
        find_targets(bert, exclude=["*"])
    with pytest.raises(ModelError):
        find_targets(make_bert(num_hidden_layers=0))


# --- swapping -------------------------------------------------------------------------------------


def test_swap_module_replaces_in_place():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    new = nn.Identity()
    old = swap_module(model, "0", new)
    assert isinstance(old, nn.Linear) and model[0] is new


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compress_keeps_dtype_and_device(dtype):
    model = make_bert().to(dtype)
    device = next(model.parameters()).device
    api.compress(model, api.CompressConfig(method="svd", keep=0.5), progress=False)
    lows = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(lows) == 12
    for m in lows:
        for p in m.parameters():
            assert p.dtype == dtype and p.device == device
    out = model(input_ids=torch.tensor([[2, 5, 6, 7, 3]])).logits
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_low_rank_skeleton_on_meta_device():
    with torch.device("meta"):
        model = make_gpt2()
    ranks = {"transformer.h.0.attn.c_attn": 4, "transformer.h.1.mlp.c_proj": 3}
    low_rank_skeleton(model, ranks)
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, LowRankLinear)
    assert (layer.in_features, layer.out_features, layer.rank) == (32, 96, 4)
    assert layer.weight_in.device.type == "meta"
    assert model.get_submodule("transformer.h.1.mlp.c_proj").weight_in.shape == (3, 128)
    low_rank_skeleton(model, ranks)  # idempotent: already low-rank layers are left alone
    with pytest.raises(ModelError, match="not in this model"):
        low_rank_skeleton(model, {"transformer.h.9.attn.c_attn": 2})
    with pytest.raises(ModelError, match="not a linear layer"):
        low_rank_skeleton(model, {"transformer.ln_f": 2})
