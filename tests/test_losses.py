"""Tests for fwsvd.training.losses: each example's loss equals the model's own loss on that example alone."""

from __future__ import annotations

import pytest
import torch

from fwsvd.errors import FwsvdError
from fwsvd.training.losses import example_losses


def _check(model, task, inputs, labels, tol=1e-5):
    model.eval()
    with torch.no_grad():
        got = example_losses(task, model(**inputs).logits, labels, model.config)
        for i in range(len(labels)):
            one = {k: v[i : i + 1] for k, v in inputs.items()}
            expected = model(**one, labels=labels[i : i + 1]).loss
            assert got[i].item() == pytest.approx(expected.item(), rel=tol)


def test_causal_lm_matches_model_loss(llama_dir, fresh):
    lm = fresh(llama_dir)
    ids = torch.randint(0, lm.model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    _check(lm.model, "causal-lm", {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids)


def test_sequence_classification_matches_model_loss(bert_dir, fresh):
    lm = fresh(bert_dir)
    ids = torch.randint(5, 50, (4, 9), generator=torch.Generator().manual_seed(1))
    _check(lm.model, "sequence-classification", {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.tensor([0, 1, 1, 0]))


def test_regression_and_token_losses():
    logits = torch.tensor([[0.5], [2.0]])
    torch.testing.assert_close(example_losses("sequence-classification", logits, torch.tensor([1.0, 0.0])), torch.tensor([0.25, 4.0]))
    # Token classification: mean over labelled tokens; an example with none contributes 0, not NaN.
    logits = torch.zeros(2, 3, 2)
    labels = torch.tensor([[0, -100, 1], [-100, -100, -100]])
    got = example_losses("token-classification", logits, labels)
    torch.testing.assert_close(got, torch.tensor([torch.log(torch.tensor(2.0)).item(), 0.0]))


def test_unknown_task():
    with pytest.raises(FwsvdError, match="per-example loss"):
        example_losses("speech", torch.zeros(1, 2), torch.zeros(1))
