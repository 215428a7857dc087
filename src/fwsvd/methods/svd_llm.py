"""SVD-LLM (Wang et al. 2024): truncation-aware data whitening."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core import Decomposition, whitened_decomposition
from .base import Method


@dataclass
class SVDLLM(Method):
    """Factorizes ``W S`` with ``S S^T`` the damped input covariance, so the truncated singular
    values equal the output error on the calibration data."""

    damping: float = 1e-2

    name = "svd-llm"
    needs = frozenset({"cov"})
    description = "truncation-aware whitening (unlabelled calibration data)"

    def __post_init__(self) -> None:
        if not 0 <= self.damping < 1:
            raise ValueError(f"damping {self.damping} must lie in [0, 1) (a fraction of the mean input energy)")

    def decompose(self, weight: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> Decomposition:
        return whitened_decomposition(weight, stats["cov"], damping=self.damping)
