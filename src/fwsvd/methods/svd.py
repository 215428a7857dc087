"""Plain truncated SVD: the Eckart–Young optimum of weight reconstruction, blind to the task."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core import weighted_svd
from .base import Method


@dataclass
class SVD(Method):
    name = "svd"
    needs = frozenset()
    description = "truncated SVD of each weight (no calibration data)"

    def factorize(self, weight: torch.Tensor, rank: int, stats: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return weighted_svd(weight, rank)
