"""Tests for fwsvd.calibration.streaming: block-by-block calibration equals the one-pass statistics."""

from __future__ import annotations

import pytest
import torch

from fwsvd import api
from fwsvd.calibration.batches import calibration_batches
from fwsvd.nn import find_targets
from fwsvd.calibration.statistics import collect_statistics
from fwsvd.calibration.streaming import LOGIT_CHUNK_ELEMENTS, stream_statistics

KEYS = ("fisher_out", "fisher_in", "fisher_full", "act_abs_mean", "cov")


def _batches(loaded, data, batch_size=4):
    cfg = api.CalibrationConfig(data=str(data), samples=10, batch_size=batch_size, max_length=16)
    batches, _ = calibration_batches(loaded, cfg)
    return batches


def assert_same_statistics(streamed, reference, names):
    assert streamed.shared == reference.shared
    for n in names:
        assert set(streamed.tensors[n]) == set(reference.tensors[n]), n
        for key, ref in reference.tensors[n].items():
            got = streamed.tensors[n][key]
            assert got.dtype == ref.dtype and got.shape == ref.shape, (n, key)
            # The same float32 products in another order (block by block, chunked logits):
            # relative 1e-4 of the tensor's scale.
            scale = ref.abs().max().item() or 1.0
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * scale, msg=f"{n} {key}")
    assert streamed.summary["mean_loss"] == pytest.approx(reference.summary["mean_loss"], rel=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("spill", [False, True])
def test_streamed_statistics_equal_one_pass(family, spill, model_dirs, sst2_tsv, corpus_txt, fresh, tmp_path):
    """Fisher (per example, full and reduced), act and cov: block by block = one whole-model pass."""
    data = sst2_tsv if family == "bert" else corpus_txt
    loaded = fresh(model_dirs[family])
    names = [t.name for t in find_targets(loaded.model)]
    batches = _batches(loaded, data)
    kinds = {"fisher", "act", "cov"}
    reference = collect_statistics(loaded.model, names, batches, kinds, keep_full_fisher=True, progress=False)
    flags = {p: p.requires_grad for p in loaded.model.parameters()}
    streamed = stream_statistics(
        loaded.model, names, batches, kinds, keep_full_fisher=True, scratch=tmp_path if spill else None, progress=False
    )
    assert_same_statistics(streamed, reference, names)
    assert streamed.summary["streamed"] is True
    assert {p: p.requires_grad for p in loaded.model.parameters()} == flags
    assert all(p.grad is None for p in loaded.model.parameters())
    assert list(tmp_path.iterdir()) == []  # every spilled state was removed
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in loaded.model.modules())
    assert all("forward" not in m.__dict__ for m in loaded.model.modules())


def test_causal_loss_is_chunked(llama_dir, corpus_txt, fresh, monkeypatch):
    """Logits in chunks of a few tokens give the one-pass statistics (exactness of the chunked loss)."""
    import fwsvd.calibration.streaming as streaming

    loaded = fresh(llama_dir)
    names = [t.name for t in find_targets(loaded.model)]
    batches = _batches(loaded, corpus_txt)
    reference = collect_statistics(loaded.model, names, batches, {"fisher"}, progress=False)
    # 4 examples x 100 words of vocabulary x 3 tokens per chunk: several chunks per sequence of 16.
    monkeypatch.setattr(streaming, "LOGIT_CHUNK_ELEMENTS", 4 * 100 * 3)
    widths = []
    original = torch.nn.Linear.forward

    def spy(self, x):
        if self is loaded.model.lm_head:
            widths.append(x.shape[1])
        return original(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    streamed = stream_statistics(loaded.model, names, batches, {"fisher"}, progress=False)
    assert widths and max(widths) <= 8 and 3 in widths  # 8: the one-time check of the head on 8 tokens
    assert_same_statistics(streamed, reference, names)
    assert LOGIT_CHUNK_ELEMENTS == 1 << 22


def test_targets_outside_blocks_are_refused(llama_dir, corpus_txt, fresh):
    from fwsvd.errors import FwsvdError

    loaded = fresh(llama_dir)
    batches = _batches(loaded, corpus_txt)
    with pytest.raises(FwsvdError, match="lm_head lie outside the blocks"):
        stream_statistics(loaded.model, ["lm_head"], batches, {"fisher"}, progress=False)


def test_low_memory_batches_default_to_one_example():
    assert api.CalibrationConfig(low_memory=True).resolved("causal-lm").batch_size == 1
    assert api.CalibrationConfig(low_memory=True, batch_size=4).resolved("causal-lm").batch_size == 4
    assert api.CalibrationConfig().resolved("causal-lm").batch_size == 4
