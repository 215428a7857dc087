"""``--dense-choice auto``: the allocation rule whose model does best on held-out calibration text.

Both rules of the global allocation spend one parameter budget by the same second-order loss
estimate (:func:`fwsvd.core.allocate_ranks`); they differ only in when a layer may stay dense. Where
the two allocations are close by that estimate, the estimate cannot rank them: on SmolLM2-135M at
keep 0.6 ``loss`` has a 4 % lower estimate and a 1-4 % higher perplexity, at keep 0.8 a 22 % lower
estimate and an 8 % lower perplexity. So this step measures: each rule's ranks are applied to the same
decompositions (made once), the model's mean next-token loss is taken on held-out blocks of the
calibration text (blocks calibration did not draw), the dense layers are put back, and the rule with
the lower loss wins (``break-even`` on a tie). Each candidate costs a truncation and one forward pass
over the held-out blocks; the rules' ranks are compared first, and equal ranks need no scoring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import DataError
from ..nn import LinearInfo, swap_module
from ..training.losses import block_nll

Ranks = Mapping[str, "int | None"]


def select_dense_choice(
    model: nn.Module,
    targets: list[LinearInfo],
    candidates: Mapping[str, Ranks],
    apply: Callable[[Ranks], object],
    heldout: torch.Tensor,
    *,
    batch_size: int = 4,
) -> tuple[str, dict[str, Any]]:
    """The dense choice (a key of ``candidates``) whose compressed model has the lowest loss on ``heldout``.

    Args:
        model: the dense causal LM; left dense (each candidate's low-rank layers are swapped out again).
        candidates: each rule's ranks, ``{rule: {target name: rank or None}}``; a tie goes to the first
            (:func:`fwsvd.compression.factorize.compress` lists ``break-even`` first).
        apply: factorizes ``model``'s targets in place at the given ranks (from decompositions made once).
        heldout: ``[n, length]`` token blocks the calibration did not see.

    Returns:
        ``(rule, selection)``: the chosen rule and ``{"dense_choice": rule, "heldout_perplexity":
        {rule: perplexity}, "heldout_blocks": n}`` (no perplexities where every rule gives the same ranks).
    """
    rules = list(candidates)
    if all(candidates[r] == candidates[rules[0]] for r in rules):
        return rules[0], {"dense_choice": rules[0], "heldout_blocks": len(heldout)}
    scores: dict[str, float] = {}
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for rule in rules:
            dense = {t.name: model.get_submodule(t.name) for t in targets}
            try:
                apply(candidates[rule])
                with torch.no_grad():
                    scores[rule] = block_nll(model, heldout.to(device), batch_size)
            finally:
                for name, module in dense.items():
                    swap_module(model, name, module)
    finally:
        model.train(training)
    chosen = min(rules, key=lambda rule: (scores[rule], rules.index(rule)))  # a tie goes to the first candidate
    return chosen, {
        "dense_choice": chosen,
        "heldout_perplexity": {rule: math.exp(nll) if nll < 700 else math.inf for rule, nll in scores.items()},
        "heldout_blocks": len(heldout),
    }


#: Held-out blocks the choice is scored on, at most: as many as the gradient correction's line search.
HELDOUT_BLOCKS = 8


def heldout_blocks(tokenizer: Any, data: str, max_length: int, seed: int, drawn: tuple[int, ...], count: int = HELDOUT_BLOCKS) -> torch.Tensor:
    """Up to ``count`` blocks of ``max_length`` tokens of ``data`` that calibration did not draw.

    ``drawn``: the sizes of the calibration's draws with ``seed`` (its ``samples`` and, with
    ``--cov-samples``, ``cov_samples``); every block of any of them is left out, and the rest are
    drawn from with ``seed + 1``.

    Raises:
        DataError: when calibration drew every block of the text.
    """
    from .. import data as d

    every = d.causal_blocks_from_file(tokenizer, data, max_length)
    taken = set().union(*(d.draw(len(every), k, seed) for k in drawn))
    pick = d.draw_outside(len(every), taken, count, seed + 1)
    if not pick:
        raise DataError(
            f"{data} gives {len(every)} blocks of {max_length} tokens and calibration draws all of them, so none is left to "
            "score --dense-choice auto on: pass a longer text or fewer --samples/--cov-samples, or --dense-choice break-even or loss"
        )
    return every[torch.tensor(pick, dtype=torch.long)]
