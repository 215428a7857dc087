"""One-step gradient correction of a compressed causal LM (training-free in ZS-SVD's sense).

Truncation leaves the low-rank factors where each layer's own reconstruction error is smallest,
not where the model's loss is. One gradient step of the next-token loss on the calibration text,
taken on the factors (ranks stay), moves them towards lower loss. The step's direction is the sign
of the gradient averaged over the calibration blocks (the direction of Adam's first step: every
factor entry moves by the same amount, so layers whose gradients are small still move); its length
is chosen by a line search on held-out blocks of the same text that the gradient never saw, and a
step that does not lower their loss is not taken, so the correction never leaves the model worse on
held-out text than it found it.

With ``rounds`` (``--correct-steps N``) the step is repeated from where it left the factors, each
round with a fresh gradient and its own line search, until a round finds no step that helps.

ZS-SVD (Zero Sum SVD) follows its truncation with one gradient step on the calibration data too;
this module is fwsvd's own version of that idea.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import DataError, ModelError
from ..training.losses import block_nll, example_losses
from ..nn import LowRankLinear

logger = logging.getLogger(__name__)

#: Step lengths the line search may try, per factor entry (the sign direction moves every entry by
#: exactly this much): a doubling grid from well below to well above the best step measured on
#: SmolLM2-135M (1.6e-4; the geometric midpoints on either side of it were worse).
STEPS = (1e-5, 2e-5, 4e-5, 8e-5, 1.6e-4, 3.2e-4, 6.4e-4, 1.28e-3)
#: Held-out blocks for the line search, at most (drawn from the text's other blocks).
MAX_HELDOUT = 8


def correction_blocks(all_blocks: torch.Tensor, gradient: Sequence[int], seed: int, heldout: int = MAX_HELDOUT) -> torch.Tensor:
    """Up to ``heldout`` blocks of ``all_blocks`` that are not in ``gradient``, drawn with ``seed``.

    Raises:
        DataError: when every block is used for the gradient.
    """
    from ..data import draw_outside

    pick = draw_outside(len(all_blocks), gradient, heldout, seed + 1)
    if not pick:
        raise DataError(
            f"the correction text gives {len(all_blocks)} blocks and the gradient uses all of them: the line search needs "
            "held-out blocks, so pass a longer text or fewer --samples"
        )
    return all_blocks[torch.tensor(pick, dtype=torch.long)]


def gradient_correction(
    model: nn.Module,
    blocks: torch.Tensor,
    heldout: torch.Tensor,
    *,
    steps: Sequence[float] = STEPS,
    rounds: int = 1,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Sign-gradient steps on the low-rank factors of ``model``, in place, each length by line search.

    Args:
        model: a compressed causal LM (holds :class:`~fwsvd.nn.LowRankLinear` layers).
        blocks: ``[n, length]`` token blocks whose mean next-token loss gives the gradient.
        heldout: token blocks the line search scores each step length on (not in ``blocks``).
        steps: candidate step lengths (per factor entry); the first search starts in the middle of
            the sorted grid, each later one at the step the round before took, and moves to larger
            steps while the held-out loss falls, else to smaller ones.
        rounds: gradient steps at most, each from where the one before left the factors (a new
            gradient, a new line search); they stop at the first round that finds no step lowering
            the held-out loss.
        batch_size: blocks per forward pass when scoring (memory only).
        progress: show a progress bar over the gradient's blocks.

    Returns:
        ``step`` (the first round's length, 0 when none lowered the held-out loss),
        ``heldout_perplexity_before`` and ``_after``, ``tried`` (the first round's ``[step, held-out
        perplexity]`` pairs), ``rounds`` (per round taken or tried: ``step``, ``heldout_perplexity``,
        ``tried``), ``blocks``, ``heldout_blocks``, ``parameters`` (factor entries moved) and ``seconds``.

    Raises:
        ModelError: when the model has no low-rank layers.
        DataError: when ``blocks`` or ``heldout`` is empty.
        ValueError: when ``rounds`` is below 1.
    """
    params = [p for m in model.modules() if isinstance(m, LowRankLinear) for p in (m.weight_in, m.weight_out)]
    if not params:
        raise ModelError("the gradient correction moves low-rank factors, and this model has none: compress it first")
    if len(blocks) == 0 or len(heldout) == 0:
        raise DataError("the gradient correction needs calibration blocks and held-out blocks")
    if rounds < 1:
        raise ValueError(f"rounds {rounds} must be at least 1")
    start = time.perf_counter()
    blocks, heldout = blocks.to(params[0].device), heldout.to(params[0].device)  # the tokens go where the model is
    grid = sorted(steps)
    before = best = block_nll(model, heldout, batch_size)
    at = len(grid) // 2
    done: list[dict[str, Any]] = []
    for _ in range(rounds):
        direction = _sign_gradient(model, params, blocks, progress)
        step, nll, tried = _line_search(model, params, direction, heldout, grid, at, best, batch_size)
        done.append({"step": step, "heldout_perplexity": _ppl(nll), "tried": tried})
        if step == 0.0:
            break
        best, at = nll, grid.index(step)
    return {
        "direction": "sign of the mean next-token-loss gradient",
        "step": done[0]["step"],
        "heldout_perplexity_before": _ppl(before),
        "heldout_perplexity_after": _ppl(best),
        "tried": done[0]["tried"],
        "rounds": done,
        "blocks": int(len(blocks)),
        "heldout_blocks": int(len(heldout)),
        "parameters": int(sum(p.numel() for p in params)),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _line_search(
    model: nn.Module,
    params: list[torch.Tensor],
    direction: list[torch.Tensor],
    heldout: torch.Tensor,
    grid: list[float],
    at: int,
    floor: float,
    batch_size: int,
) -> tuple[float, float, list[list[float]]]:
    """Move ``params`` along ``-direction`` by the grid step that lowers the held-out loss below
    ``floor`` most, found by a local search from ``grid[at]``; ``(step, its loss, tried)``, step 0
    (factors as they were) when none does."""
    origin = [p.detach().clone() for p in params]

    @torch.no_grad()
    def move(step: float) -> None:
        for p, o, g in zip(params, origin, direction):
            torch.add(o, g, alpha=-step, out=p.data)

    best, best_step = floor, 0.0
    tried: list[list[float]] = []

    def attempt(step: float) -> bool:
        nonlocal best, best_step
        move(step)
        nll = block_nll(model, heldout, batch_size)
        tried.append([step, _ppl(nll)])
        logger.info("correction step %g: held-out perplexity %.3f", step, _ppl(nll))
        if math.isfinite(nll) and nll < best:
            best, best_step = nll, step
            return True
        return False

    # Up the grid while the held-out loss falls, else down while it falls (the loss along one
    # direction is near unimodal in the step length).
    first = at
    while at < len(grid) and attempt(grid[at]):
        at += 1
    if best_step in (0.0, grid[first]):
        at = first - 1
        while at >= 0 and attempt(grid[at]):
            at -= 1
    move(best_step)
    return best_step, best, tried


def _sign_gradient(model: nn.Module, params: list[torch.Tensor], blocks: torch.Tensor, progress: bool) -> list[torch.Tensor]:
    """The sign of the mean next-token loss's gradient for each of ``params`` (the model's other
    parameters frozen meanwhile, its train mode and requires-grad flags given back)."""
    was_training = model.training
    requires = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in requires:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    model.eval()  # no dropout: the step follows the model as it will run
    try:
        for block in tqdm(blocks.split(1), desc="correction gradient", unit="block", disable=not progress, leave=False):
            logits = model(input_ids=block, use_cache=False).logits
            (example_losses("causal-lm", logits, block).sum() / len(blocks)).backward()
        return [p.grad.sign() for p in params]  # type: ignore[union-attr]
    finally:
        for p, flag in requires:
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)


def _ppl(nll: float) -> float:
    return math.exp(nll) if nll < 700 else math.inf


def correct_causal(
    loaded: Any, data: str, *, samples: int, max_length: int, seed: int = 0, rounds: int = 1, progress: bool = True
) -> dict[str, Any]:
    """:func:`gradient_correction` of a compressed causal LM on a text file, recorded in its config.

    The gradient comes from the same ``samples`` blocks of ``max_length`` tokens that calibration
    draws from ``data`` with ``seed``; the line search scores up to :data:`MAX_HELDOUT` of the
    text's other blocks; ``rounds`` as in :func:`gradient_correction`. The summary (with ``data``) goes into the compression record as
    ``correction``, so ``config.json`` says the factors were moved.

    Raises:
        ModelError: for a model that is not a compressed causal LM or has no tokenizer.
        DataError: for a text with no block left over for the line search.
    """
    from .. import data as d
    from ..storage.record import compression_record

    if loaded.task != "causal-lm":
        raise ModelError(f"--correct takes one gradient step of the next-token loss: {loaded.source} is a {loaded.task} model, not a causal LM")
    if loaded.tokenizer is None:
        raise ModelError(f"{loaded.source} has no tokenizer: save the tokenizer files into the model folder")
    qc = getattr(loaded.model.config, "quantization_config", None)
    if compression_record(loaded.model.config) is None or qc is None or isinstance(qc, dict):
        raise ModelError(f"{loaded.source} is not compressed: the gradient correction follows compression")
    every = d.causal_blocks_from_file(loaded.tokenizer, data, max_length)
    picked = d.draw(len(every), samples, seed)
    heldout = correction_blocks(every, picked, seed)
    summary = {"data": str(data), "max_length": max_length, "seed": seed}
    summary.update(gradient_correction(loaded.model, every[torch.tensor(picked, dtype=torch.long)], heldout, rounds=rounds, progress=progress))
    qc.correction = dict(summary)
    return summary
