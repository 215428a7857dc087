"""FWSVD (Hsu et al., ICLR 2022): SVD weighted by the task loss's Fisher information."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from ..core import Decomposition, floor_relative, weighted_decomposition, whitened_decomposition
from .base import Method

#: Fisher reduction per task family when the input side is not whitened, chosen by measurement
#: (README, "Which weighting"): output-side importance serves the fine-tuned encoders; decoders need
#: both sides (SmolLM2-135M, WikiText-2, keep 0.8 / 0.6: perplexity both 254 / 1455, in 3003 / 3.9e4,
#: out 4.4e5 / 1.6e7, dense 27.4).
DEFAULT_REDUCTION = {"causal-lm": "both"}
FALLBACK_REDUCTION = "out"
#: Whitening is on by default for every task: Fisher per output feature with whitened inputs beat
#: every Fisher reduction alone and SVD-LLM's whitening alone where measured. MiniLM-L6 SST-2 dev
#: accuracy before recovery, keep 0.5 / 0.3 / 0.2: 0.865 / 0.841 / 0.806 against Fisher per output
#: 0.814 / 0.809 / 0.758 and svd-llm 0.834 at 0.3; SmolLM2-135M WikiText-2 perplexity, keep 0.8 / 0.6:
#: 67.6 / 137.6 against svd-llm 71.9 / 169.4 and Fisher on both sides 254 / 1455.
DEFAULT_WHITEN = "on"


@dataclass
class FWSVD(Method):
    """Rows (``reduction="out"``) or columns (``"in"``) of the reconstruction error are weighted by
    the square root of their summed empirical Fisher information; ``"both"`` weights both sides.

    With ``whiten="on"`` the input side is weighted by the calibration inputs instead: the
    Fisher-weighted *output* error ``||diag(sqrt(F_out)) (W - A B) X^T||`` is minimised through
    SVD-LLM's truncation-aware whitening (needs the input covariance; ``reduction`` must then be
    ``"out"``, the only side left to weight)."""

    reduction: str = "auto"
    whiten: str = "auto"
    damping: float = 0.01

    name = "fwsvd"
    needs = frozenset({"fisher"})
    description = "Fisher-weighted SVD (needs labelled calibration data)"
    # Measured (README; fwsvd.config.DEFAULT_ALLOCATION): the Fisher loss estimate moves rank to where
    # the task needs it, e.g. SmolLM2-135M keep 0.8: perplexity 40.8 against 62.6 with uniform ranks.
    default_allocation = "global"

    def __post_init__(self) -> None:
        if self.reduction not in {"auto", "out", "in", "both"}:
            raise ValueError(f"fisher reduction {self.reduction!r} must be one of auto, out, in, both")
        if self.whiten not in {"auto", "on", "off"}:
            raise ValueError(f"fisher whitening {self.whiten!r} must be one of auto, on, off")
        if self.whiten == "on" and self.reduction in {"in", "both"}:
            raise ValueError(
                f"whitening already weights the input side: use --fisher-reduction out (not {self.reduction}) with --fisher-whiten on"
            )
        if not 0 <= self.damping < 1:
            raise ValueError(f"damping {self.damping} must lie in [0, 1) (a fraction of the mean input energy)")

    def configure(self, task: str) -> FWSVD:
        whiten = self.whiten
        if whiten == "auto":
            # A Fisher reduction chosen by hand on the input side rules whitening out.
            whiten = "off" if self.reduction in {"in", "both"} else DEFAULT_WHITEN
        reduction = self.reduction
        if reduction == "auto":
            reduction = "out" if whiten == "on" else DEFAULT_REDUCTION.get(task, FALLBACK_REDUCTION)
        return replace(self, reduction=reduction, whiten=whiten)

    def needs_for(self, task: str) -> frozenset[str]:
        return self.needs | ({"cov"} if self.configure(task).whiten == "on" else set())

    def _resolved(self, stats: Mapping[str, torch.Tensor]) -> FWSVD:
        if "auto" not in (self.reduction, self.whiten):
            return self
        # Not configured for a task: auto whitening follows whether the covariance is there.
        whiten = self.whiten
        if whiten == "auto":
            whiten = "on" if "cov" in stats and self.reduction in {"auto", "out"} else "off"
        return replace(self, whiten=whiten).configure("")

    def decompose(self, weight: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> Decomposition:
        method = self._resolved(stats)
        row = self.row_weight(stats)
        if method.whiten == "on":
            return whitened_decomposition(weight, stats["cov"], damping=self.damping, row_weight=row)
        col = floor_relative(stats["fisher_in"]).sqrt() if method.reduction in {"in", "both"} else None
        return weighted_decomposition(weight, row_weight=row, col_weight=col)

    def row_weight(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if self._resolved(stats).reduction in {"out", "both"}:
            return floor_relative(stats["fisher_out"]).sqrt()
        return None

    def component_loss(self, decomposition: Decomposition, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Second-order estimate of the task-loss increase of discarding each component.

        The diagonal empirical Fisher prices a weight change as ``sum_oi F_oi dW_oi^2``. With only
        its row sums ``F_o`` kept, ``F_oi ~ F_o C_ii / tr(C)`` (the gradient of a weight is its row's
        output gradient times its input, so inputs share out a row's Fisher by their energy); with
        correlated inputs this becomes ``sum_o F_o (dW C dW^T)_oo / tr(C)``, which is exactly the
        whitened, Fisher-row-weighted truncation error ``sigma_k^2`` over ``tr(C)``. Dividing by the
        input energy puts every layer on the loss's scale, whatever the size of its inputs. Without
        whitening, the separable forms ``F_o / in``, ``F_i / out`` or ``F_o F_i / sum F`` stand in.
        """
        method = self._resolved(stats)
        energy = decomposition.values.double().square()
        if method.whiten == "on":
            norm = stats["cov"].double().diagonal().sum()
        elif method.reduction == "out":
            norm = torch.tensor(float(stats["fisher_in"].numel()), dtype=torch.float64)
        elif method.reduction == "in":
            norm = torch.tensor(float(stats["fisher_out"].numel()), dtype=torch.float64)
        else:
            norm = floor_relative(stats["fisher_out"]).double().sum()
        return energy / norm.clamp_min(torch.finfo(torch.float64).tiny)
