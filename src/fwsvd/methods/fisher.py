"""FWSVD (Hsu et al., ICLR 2022): SVD weighted by the task loss's Fisher information."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core import floor_relative, weighted_svd
from .base import Method

#: Default Fisher reduction per task family, chosen by measurement (README, "Fisher reduction"):
#: output-side importance serves the fine-tuned encoders; decoders need both sides (SmolLM2-135M,
#: WikiText-2, keep 0.8 / 0.6: perplexity both 254 / 1455, in 3003 / 3.9e4, out 4.4e5 / 1.6e7,
#: dense 27.4; benchmarks/results/decoder-smollm2.md).
DEFAULT_REDUCTION = {"causal-lm": "both"}
FALLBACK_REDUCTION = "out"


@dataclass
class FWSVD(Method):
    """Rows (``reduction="out"``) or columns (``"in"``) of the reconstruction error are weighted by
    the square root of their summed empirical Fisher information; ``"both"`` weights both sides."""

    reduction: str = "auto"

    name = "fwsvd"
    needs = frozenset({"fisher"})
    description = "Fisher-weighted SVD (needs labelled calibration data)"

    def __post_init__(self) -> None:
        if self.reduction not in {"auto", "out", "in", "both"}:
            raise ValueError(f"fisher reduction {self.reduction!r} must be one of auto, out, in, both")

    def configure(self, task: str) -> FWSVD:
        if self.reduction != "auto":
            return self
        return FWSVD(DEFAULT_REDUCTION.get(task, FALLBACK_REDUCTION))

    def factorize(self, weight: torch.Tensor, rank: int, stats: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        reduction = self.reduction if self.reduction != "auto" else FALLBACK_REDUCTION
        row = floor_relative(stats["fisher_out"]).sqrt() if reduction in {"out", "both"} else None
        col = floor_relative(stats["fisher_in"]).sqrt() if reduction in {"in", "both"} else None
        return weighted_svd(weight, rank, row_weight=row, col_weight=col)
