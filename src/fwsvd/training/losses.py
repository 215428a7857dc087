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

__all__ = ["IGNORE_INDEX", "block_nll", "example_losses", "next_token_labels"]

#: Label value that marks a token without a target (transformers' convention).
IGNORE_INDEX = -100


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
        problem = getattr(config, "problem_type", None)
        num_labels = logits.shape[-1]
        if problem is None:
            # transformers' rule (BertForSequenceClassification and peers).
            if num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            return (logits.reshape(len(logits), -1) - labels.reshape(len(labels), -1).float()).square().mean(dim=1)
        if problem == "single_label_classification":
            return F.cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1), reduction="none")
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(dim=1)
    raise FwsvdError(f"no per-example loss for task {task!r}: choose causal-lm, token-classification or sequence-classification")


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
