"""The task loss of each example in a batch, as the model's own head defines it for a batch of one.

transformers' heads return one loss averaged over the batch (over all labelled tokens, for causal
LMs and token classification), so a statistic built from that loss changes with the batch size.
:func:`example_losses` returns one loss per example instead: example ``e``'s value equals what
``model(**batch_of_e_alone).loss`` gives, and the sum over a batch has, for each example, exactly
the gradient of that example's own loss (examples do not interact in a transformer's forward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from ..errors import FwsvdError

__all__ = ["FISHER_LABELS", "IGNORE_INDEX", "block_nll", "example_losses", "fisher_terms", "next_token_labels"]

#: Label value that marks a token without a target (transformers' convention).
IGNORE_INDEX = -100
#: Where the labels of the Fisher come from: ``data`` (the empirical Fisher: the data's own labels)
#: or ``model`` (the true Fisher: the expectation over labels drawn from the model's own prediction).
FISHER_LABELS = ("data", "model")


def example_losses(task: str, logits: torch.Tensor, labels: torch.Tensor, config: Any = None) -> torch.Tensor:
    """One loss per example, ``[batch]``, in float32.

    Args:
        task: ``"causal-lm"`` (next-token cross-entropy, labels are the input ids shifted inside),
            ``"token-classification"`` or ``"sequence-classification"``.
        logits: the model's logits, ``[batch, ...]``.
        labels: targets as the model's head takes them (``-100`` marks tokens without a target).
        config: the model config (``num_labels`` and ``problem_type`` choose the sequence loss).

    Returns:
        Each example's mean loss over its labelled tokens (0 for an example without any).

    Raises:
        FwsvdError: for an unknown task.
    """
    logits = logits.float()
    if task == "causal-lm":
        return _token_mean(logits, next_token_labels(labels))
    if task == "token-classification":
        return _token_mean(logits, labels)
    if task == "sequence-classification":
        problem = _sequence_problem(logits, labels, config)
        num_labels = logits.shape[-1]
        if problem == "regression":
            return (logits.reshape(len(logits), -1) - labels.reshape(len(labels), -1).float()).square().mean(dim=1)
        if problem == "single_label_classification":
            return F.cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1), reduction="none")
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(dim=1)
    raise FwsvdError(f"no per-example loss for task {task!r}: choose causal-lm, token-classification or sequence-classification")


def _sequence_problem(logits: torch.Tensor, labels: torch.Tensor, config: Any) -> str:
    problem = getattr(config, "problem_type", None)
    if problem is not None:
        return problem
    # transformers' rule (BertForSequenceClassification and peers).
    if logits.shape[-1] == 1:
        return "regression"
    return "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"


def fisher_terms(task: str, logits: torch.Tensor, labels: torch.Tensor, config: Any = None, source: str = "data") -> list[torch.Tensor]:
    """Per-example terms, ``[batch]`` each, whose squared gradients summed over the terms make the Fisher.

    With ``source="data"`` this is the one term :func:`example_losses` (the empirical Fisher). With
    ``"model"`` the labels are not the data's but the model's own predictive distribution, and the
    expectation over it is taken exactly (the true Fisher): for single-label classification one term
    per class ``c``, ``sqrt(p_c) * CE(logits, c)`` with ``p`` held constant, so that the squared
    gradients add up to ``sum_c p_c (grad CE_c)^2``; for multi-label classification one term per label
    ``l``, ``sqrt(p_l (1 - p_l)) * logit_l / L``; for regression (the mean squared error, read as a
    Gaussian likelihood of unit variance) one term per output ``j``, ``2 * prediction_j / J``. A
    confidently right example then counts as much as its uncertainty says, where the empirical
    Fisher gives it almost nothing and lets the few misclassified examples decide.

    Raises:
        FwsvdError: for an unknown ``source``, or ``"model"`` on a task other than sequence classification.
    """
    if source not in FISHER_LABELS:
        raise FwsvdError(f"Fisher labels {source!r} must be one of {', '.join(FISHER_LABELS)}")
    if source == "data":
        return [example_losses(task, logits, labels, config)]
    if task != "sequence-classification":
        raise FwsvdError(f"--fisher-labels model takes the expectation over a classifier's or regressor's outputs, not a {task} model's: use --fisher-labels data")
    logits = logits.float()
    problem = _sequence_problem(logits, labels, config)
    if problem == "regression":
        flat = logits.reshape(len(logits), -1)
        return [2 * flat[:, j] / flat.shape[1] for j in range(flat.shape[1])]
    if problem == "single_label_classification":
        weights = logits.detach().softmax(dim=-1).sqrt()
        return [
            weights[:, c] * F.cross_entropy(logits, torch.full((len(logits),), c, dtype=torch.long, device=logits.device), reduction="none")
            for c in range(logits.shape[-1])
        ]
    p = logits.detach().sigmoid()
    scale = (p * (1 - p)).sqrt() / logits.shape[-1]
    return [scale[:, j] * logits[:, j] for j in range(logits.shape[-1])]


@torch.no_grad()
def block_nll(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token negative log-likelihood of a causal LM over token ``blocks`` ``[n, length]``.

    Every block has the same number of predicted tokens, so this is what ``fwsvd eval`` turns into
    perplexity; ``batch_size`` blocks run per forward pass (memory only).
    """
    total, count = 0.0, 0
    for chunk in blocks.split(batch_size):
        logits = model(input_ids=chunk, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].reshape(-1), reduction="sum"))
        count += chunk[:, 1:].numel()
    return total / count


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """A causal LM's target at each position: the next token's label (``-100`` at the last position).

    The labels are shifted, not the logits: the logits are the largest tensor of the loss.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each example's labelled tokens (``labels != -100``)."""
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)
    counts = (labels != IGNORE_INDEX).sum(dim=1)
    # An example without a labelled token contributes nothing (not 0/0).
    return per_token.sum(dim=1) / counts.clamp(min=1)
