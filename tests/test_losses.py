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


def _squared_logit_grads(terms, logits):
    """Sum over the terms of the squared gradient of each example's term with respect to its logits."""
    total = torch.zeros_like(logits)
    for term in terms:
        (grad,) = torch.autograd.grad(term.sum(), logits, retain_graph=True)
        total += grad.square()
    return total


def test_fisher_terms_model_labels_give_the_true_fisher():
    """With labels from the model, the squared gradients add up to the expected Fisher of each head:
    ``p (1 - p)`` per logit for softmax and sigmoid heads (up to the 1 / L of BCE's mean), ``(2 / J)^2``
    for mean squared error (unit noise variance); the data's labels give the one term example_losses."""
    from fwsvd.training.losses import fisher_terms

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]], requires_grad=True)
    terms = fisher_terms("sequence-classification", logits, torch.tensor([0, 2]), None, "model")
    assert len(terms) == 3 and all(t.shape == (2,) for t in terms)
    p = logits.detach().softmax(-1)
    torch.testing.assert_close(_squared_logit_grads(terms, logits), p * (1 - p), rtol=1e-5, atol=1e-7)

    multi = torch.tensor([[1.0, -2.0], [0.0, 4.0]], requires_grad=True)
    terms = fisher_terms("sequence-classification", multi, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), None, "model")
    q = multi.detach().sigmoid()
    torch.testing.assert_close(_squared_logit_grads(terms, multi), q * (1 - q) / 4, rtol=1e-5, atol=1e-7)

    reg = torch.tensor([[0.5], [2.0]], requires_grad=True)
    terms = fisher_terms("sequence-classification", reg, torch.tensor([1.0, 0.0]), None, "model")
    torch.testing.assert_close(_squared_logit_grads(terms, reg), torch.full((2, 1), 4.0))

    (data,) = fisher_terms("sequence-classification", reg, torch.tensor([1.0, 0.0]), None, "data")
    torch.testing.assert_close(data, torch.tensor([0.25, 4.0]))


def test_fisher_terms_refuses_unknown_source_and_other_tasks():
    from fwsvd.training.losses import fisher_terms

    logits = torch.zeros(1, 3, 5)
    with pytest.raises(FwsvdError, match="must be one of data, model"):
        fisher_terms("sequence-classification", logits[:, 0], torch.tensor([1]), None, "sampled")
    with pytest.raises(FwsvdError, match="--fisher-labels data"):
        fisher_terms("causal-lm", logits, torch.zeros(1, 3, dtype=torch.long), None, "model")
