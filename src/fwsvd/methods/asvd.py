"""ASVD (Yuan et al. 2023): activation-aware SVD that scales input columns by activation size."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core import Decomposition, floor_relative, weighted_decomposition
from .base import Method


@dataclass
class ASVD(Method):
    """Columns of ``W`` are scaled by ``mean(|x_j|) ** alpha`` before the SVD and unscaled after,
    so input channels that carry large activations (outliers) are reconstructed more faithfully."""

    alpha: float = 0.5

    name = "asvd"
    needs = frozenset({"act"})
    description = "activation-aware SVD (unlabelled calibration data)"

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 2:
            raise ValueError(f"asvd alpha {self.alpha} must lie in [0, 2] (0.5 is the paper's default)")

    def decompose(self, weight: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> Decomposition:
        scale = floor_relative(stats["act_abs_mean"]).pow(self.alpha)
        return weighted_decomposition(weight, col_weight=scale)
