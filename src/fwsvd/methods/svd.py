"""Plain truncated SVD: the Eckart–Young optimum of weight reconstruction, blind to the task."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core import Decomposition, weighted_decomposition
from .base import Method


@dataclass
class SVD(Method):
    name = "svd"
    needs = frozenset()
    description = "truncated SVD of each weight (no calibration data)"

    def decompose(self, weight: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> Decomposition:
        return weighted_decomposition(weight)
