"""What a compression did: one row per layer and the totals."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any




@dataclass
class LayerReport:
    """One targeted layer before and after compression."""

    name: str
    shape: tuple[int, int]
    rank: int | None  # None: kept dense (factorizing would not save parameters)
    parameters_before: int
    parameters_after: int
    seconds: float


@dataclass
class CompressionReport:
    """What :func:`compress` did, with whole-model and targeted-layer figures."""

    method: str
    keep: float
    layers: list[LayerReport]
    parameters_before: int
    parameters_after: int
    calibration: dict[str, Any]
    seconds_factorize: float
    method_options: dict[str, Any] = field(default_factory=dict)

    @property
    def target_parameters_before(self) -> int:
        return sum(r.parameters_before for r in self.layers)

    @property
    def target_parameters_after(self) -> int:
        return sum(r.parameters_after for r in self.layers)

    @property
    def target_keep(self) -> float:
        return self.target_parameters_after / self.target_parameters_before

    @property
    def model_keep(self) -> float:
        return self.parameters_after / self.parameters_before

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_options": self.method_options,
            "keep": self.keep,
            "target_keep": self.target_keep,
            "model_keep": self.model_keep,
            "parameters": self.parameters_after,
            "dense_parameters": self.parameters_before,
            "target_parameters": self.target_parameters_after,
            "target_dense_parameters": self.target_parameters_before,
            "seconds_calibration": self.calibration.get("seconds", 0.0),
            "seconds_factorize": self.seconds_factorize,
            "calibration": self.calibration,
            "layers": [asdict(r) for r in self.layers],
        }
