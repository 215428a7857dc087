"""What every compression method is: the statistics it needs and how it factorizes one weight."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch

from ..core import Decomposition


class Method(ABC):
    """A low-rank compression method.

    Subclasses are small dataclasses: their fields are the method's options, ``name`` is its
    registry key and ``needs`` names the statistics (see :mod:`fwsvd.calibration.statistics`) that one calibration
    pass must collect for it.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    description: ClassVar[str] = ""
    #: Rank allocation under ``--allocation auto``: ``uniform`` (every layer keeps the same share, as
    #: the methods were published) unless the method's loss estimate is worth trusting across layers.
    default_allocation: ClassVar[str] = "uniform"

    def needs_for(self, task: str) -> frozenset[str]:
        """Statistics needed for ``task`` (most methods need the same for every task)."""
        return self.needs

    def configure(self, task: str) -> Method:
        """Resolve ``auto`` options for a task; returns ``self`` or a resolved copy."""
        return self

    @abstractmethod
    def decompose(self, weight: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> Decomposition:
        """The method's whole weighted decomposition of the ``[out, in]`` weight (every rank at once).

        Args:
            weight: dense weight in ``nn.Linear`` layout.
            stats: this module's statistics (keys as in :mod:`fwsvd.calibration.statistics`).
        """

    def factorize(
        self, weight: torch.Tensor, rank: int, stats: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``(A [out, rank], B [rank, in])`` of the ``[out, in]`` weight."""
        return self.decompose(weight, stats).truncate(rank)

    def row_weight(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Scales of the output rows in the error this method minimises (``None``: all equal)."""
        return None

    def component_loss(self, decomposition: Decomposition, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Estimated cost of discarding each component, comparable across the layers of one model.

        Global rank allocation (:func:`fwsvd.core.allocate_ranks`) spends the parameter budget
        where this is largest. Without a task loss to estimate, a component's share of its
        layer's weighted energy (the relative truncation error, as SVD-LLM V2 allocates) is used.
        """
        energy = decomposition.values.double().square()
        return energy / energy.sum().clamp_min(torch.finfo(torch.float64).tiny)

    def options(self) -> dict[str, object]:
        """The method's options, for the record in the compressed model's config."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
