"""transformers integration: the compression record in ``config.json`` and a registered quantizer.

A compressed model's ``config.json`` carries ``quantization_config`` with ``quant_method: "fwsvd"``:
method, library version, per-module ranks, parameter counts and the calibration summary. After
``import fwsvd``, transformers' documented extension point for custom quantization methods
(``register_quantization_config`` / ``register_quantizer``) lets ``AutoModelFor….from_pretrained``
swap in :class:`~fwsvd.nn.LowRankLinear` skeletons of the recorded ranks before the safetensors
weights are read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core import DENSE_CHOICES
from ..errors import ModelError
from ..methods import METHODS, check_options
from ..nn import LINEAR_TYPES, LowRankLinear, linear_weight

QUANT_METHOD = "fwsvd"

__all__ = [
    "QUANT_METHOD",
    "RECORD_KEYS",
    "FwsvdQuantizationConfig",
    "check_ranks",
    "compression_record",
    "validate_record",
]

#: Every key a compression record may hold, with what it must be. Anything else is refused: the
#: record comes from a file anyone may have written, and its values become object attributes.
RECORD_KEYS: dict[str, str] = {
    "quant_method": "the string 'fwsvd'",
    "method": "a method name",
    "ranks": "an object mapping module names to positive integer ranks",
    "library_version": "a version string",
    "method_options": "an object",
    "keep": "a number in (0, 1]",
    "include": "a list of strings",
    "exclude": "a list of strings",
    "dense_layers": "a list of module names",
    "parameters": "a positive integer",
    "dense_parameters": "a positive integer",
    "target_parameters": "a non-negative integer",
    "target_dense_parameters": "a non-negative integer",
    "target_keep": "a number in (0, 1]",
    "calibration": "an object",
    "finetune": "an object",
    "correction": "an object",
    "allocation": "an object",
    "factor_dtype": "one of 'float32', 'bfloat16', 'float16'",  # older folders: only the factors were cast
    "stored_dtype": "one of 'float32', 'bfloat16', 'float16'",
    "quantized_factors": "the string 'int8'",
    "quantized_weights": "an object with scheme, group_size, factor_dtype, ranks, dense_bytes and model_bytes",
    "any_size": "an object with losses, allocation and factor_dtype",
}
_WHERE = "quantization_config in config.json"
_FIX = "restore the config.json saved with the weights"


def _bad(key: str, value: Any) -> ModelError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ModelError(f"{_WHERE}: {key} is {shown}, not {RECORD_KEYS[key]}: {_FIX}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value <= 1


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def validate_record(record: Any) -> dict[str, Any]:
    """Check a compression record field by field and return it as a plain dict.

    Only the keys of :data:`RECORD_KEYS` are accepted; ``ranks`` must map module names to positive
    integers; counts are integers, fractions finite numbers in (0, 1]. Whether each rank fits its
    layer is checked against the model by :func:`check_ranks`.

    Raises:
        ModelError: naming the first bad field and its value.
    """
    if not isinstance(record, Mapping):
        raise ModelError(f"{_WHERE} is {type(record).__name__}, not an object: {_FIX}")
    unknown = [k for k in record if k not in RECORD_KEYS]
    if unknown:
        raise ModelError(f"{_WHERE} has unknown key {str(unknown[0])[:60]!r} (fwsvd {_version()} writes none such): {_FIX}")
    if record.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
        raise _bad("quant_method", record["quant_method"])
    checks = {
        "method": lambda v: isinstance(v, str) and 0 < len(v) <= 100,
        "library_version": lambda v: isinstance(v, str),
        "method_options": lambda v: isinstance(v, Mapping),
        "calibration": lambda v: isinstance(v, Mapping),
        "finetune": lambda v: isinstance(v, Mapping),
        "correction": lambda v: isinstance(v, Mapping),
        "allocation": lambda v: isinstance(v, Mapping),
        "factor_dtype": lambda v: v in ("float32", "bfloat16", "float16"),
        "stored_dtype": lambda v: v in ("float32", "bfloat16", "float16"),
        "quantized_factors": lambda v: v == "int8",
        "keep": _is_fraction,
        "target_keep": _is_fraction,
        "include": _is_str_list,
        "exclude": _is_str_list,
        "dense_layers": _is_str_list,
        "parameters": lambda v: _is_int(v) and v > 0,
        "dense_parameters": lambda v: _is_int(v) and v > 0,
        "target_parameters": lambda v: _is_int(v) and v >= 0,
        "target_dense_parameters": lambda v: _is_int(v) and v >= 0,
    }
    for key, ok in checks.items():
        if key in record and not ok(record[key]):
            raise _bad(key, record[key])
    if "method" in record:
        if record["method"] not in METHODS:
            raise ModelError(f"{_WHERE}: method {str(record['method'])[:40]!r} is not one of {', '.join(METHODS)}: {_FIX}")
        try:
            check_options(record["method"], record.get("method_options", {}))
        except ValueError as err:
            raise ModelError(f"{_WHERE}: {err}: {_FIX}") from None
    if "allocation" in record:
        _check_allocation(record["allocation"])
    if "quantized_weights" in record:
        _check_quantized(record["quantized_weights"])
    if "any_size" in record:
        if "dense_parameters" not in record:
            raise ModelError(f"{_WHERE}: any_size needs dense_parameters beside it: {_FIX}")
        _check_any_size(record["any_size"], record.get("ranks", {}))
    ranks = record.get("ranks", {})
    if not isinstance(ranks, Mapping):
        raise _bad("ranks", ranks)
    for name, rank in ranks.items():
        if not isinstance(name, str) or not name:
            raise ModelError(f"{_WHERE}: ranks has the module name {name!r}, not a non-empty string: {_FIX}")
        if not _is_int(rank) or rank < 1:
            raise ModelError(f"{_WHERE}: the rank of {name[:80]} is {str(rank)[:40]!r}, not a positive integer: {_FIX}")
    return {**dict(record), "quant_method": QUANT_METHOD, "ranks": dict(ranks)}


#: The allocation record (see :func:`fwsvd.api.allocation_record`): each key and its check.
_ALLOCATION_KEYS: dict[str, tuple[str, Any]] = {
    "mode": ("'uniform' or 'global'", lambda v: v in ("uniform", "global")),
    "rank_floor": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "dense_above": ("a number in (0, 1]", _is_fraction),
    "dense_choice": (" or ".join(repr(c) for c in DENSE_CHOICES), lambda v: v in DENSE_CHOICES),
    "rank_multiple": ("a whole number from 1 to 4096", lambda v: _is_int(v) and 1 <= v <= 4096),
    # --dense-choice auto: what the rule in dense_choice was chosen by (held-out perplexity per rule).
    "dense_choice_auto": (
        "an object of heldout_blocks (a whole number) and heldout_perplexity (a number per rule)",
        lambda v: isinstance(v, Mapping) and set(v) <= {"heldout_blocks", "heldout_perplexity"} and _is_int(v.get("heldout_blocks")) and v["heldout_blocks"] >= 1
        and (isinstance(v.get("heldout_perplexity", {}), Mapping) and all(k in DENSE_CHOICES and isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                                                                         for k, x in v.get("heldout_perplexity", {}).items())),
    ),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_allocation(allocation: Mapping[str, Any]) -> None:
    for key, value in allocation.items():
        if key not in _ALLOCATION_KEYS:
            raise ModelError(f"{_WHERE}: allocation has unknown key {str(key)[:40]!r} (known: {', '.join(_ALLOCATION_KEYS)}): {_FIX}")
        what, ok = _ALLOCATION_KEYS[key]
        if not ok(value):
            shown = repr(value)
            raise ModelError(f"{_WHERE}: allocation {key} is {shown if len(shown) <= 40 else shown[:37] + '...'}, not {what}: {_FIX}")


def _check_quantized(grid: Any) -> None:
    """The ``quantized_weights`` record (see :mod:`fwsvd.compression.quantized`), key by key."""
    from ..quantization import SCHEMES

    checks: dict[str, tuple[str, Any]] = {
        "scheme": (f"one of {', '.join(SCHEMES)}", lambda v: v in SCHEMES),
        "group_size": ("a whole number >= 1 or null", lambda v: v is None or (_is_int(v) and v >= 1)),
        "factor_dtype": ("'float16'", lambda v: v == "float16"),
        "ranks": ("an object mapping module names to whole numbers >= 0",
                  lambda v: isinstance(v, Mapping) and all(isinstance(k, str) and k and _is_int(r) and r >= 0 for k, r in v.items())),
        "dense_bytes": ("a positive integer", lambda v: _is_int(v) and v > 0),
        "model_bytes": ("a positive integer", lambda v: _is_int(v) and v > 0),
    }
    if not isinstance(grid, Mapping):
        raise _bad("quantized_weights", grid)
    for key in grid:
        if key not in checks:
            raise ModelError(f"{_WHERE}: quantized_weights has unknown key {str(key)[:40]!r} (known: {', '.join(checks)}): {_FIX}")
    for key, (what, ok) in checks.items():
        if key not in grid:
            raise ModelError(f"{_WHERE}: quantized_weights lacks {key}: {_FIX}")
        if not ok(grid[key]):
            shown = repr(grid[key])
            raise ModelError(f"{_WHERE}: quantized_weights {key} is {shown if len(shown) <= 40 else shown[:37] + '...'}, not {what}: {_FIX}")


def _check_any_size(grid: Any, ranks: Any) -> None:
    """The ``any_size`` record (see :mod:`fwsvd.compression.any_size`): one finite non-negative price per
    component of every recorded layer, and the allocation rules."""
    def bad(key: str, value: Any, what: str) -> ModelError:
        shown = repr(value)
        return ModelError(f"{_WHERE}: any_size {key} is {shown if len(shown) <= 40 else shown[:37] + '...'}, not {what}: {_FIX}")

    if not isinstance(grid, Mapping):
        raise _bad("any_size", grid)
    known = {"losses", "allocation", "factor_dtype"}
    for key in grid:
        if key not in known:
            raise ModelError(f"{_WHERE}: any_size has unknown key {str(key)[:40]!r} (known: {', '.join(sorted(known))}): {_FIX}")
    for key in known:
        if key not in grid:
            raise ModelError(f"{_WHERE}: any_size lacks {key}: {_FIX}")
    if grid["factor_dtype"] != "float16":
        raise bad("factor_dtype", grid["factor_dtype"], "'float16'")
    losses = grid["losses"]
    if not isinstance(losses, Mapping) or not isinstance(ranks, Mapping) or set(losses) != set(ranks):
        raise bad("losses", "…", "one price list per recorded layer")
    for name, values in losses.items():
        if not (isinstance(values, list) and len(values) == ranks[name] and all(_is_number(v) and v >= 0 for v in values)):
            raise bad(f"losses of {str(name)[:60]}", values, f"{ranks[name]} finite non-negative numbers")
    alloc = grid["allocation"]
    if not isinstance(alloc, Mapping) or alloc.get("mode") not in ("uniform", "global"):
        raise bad("allocation", alloc, "an object with mode 'uniform' or 'global'")
    _check_allocation(alloc)
    if alloc["mode"] == "global" and not ("rank_floor" in alloc and "dense_above" in alloc):
        raise bad("allocation", alloc, "global with rank_floor and dense_above")


def _version() -> str:
    from ..version import __version__

    return __version__


def check_ranks(model: Any, ranks: Mapping[str, int]) -> None:
    """Check that every recorded module is a linear layer of ``model`` and its rank fits it.

    Raises:
        ModelError: for a module the model does not have, one that is not linear, or a rank above
            ``min(out_features, in_features)``.
    """
    for name, rank in ranks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"{_WHERE} records module {name[:80]!r}, which this {type(model).__name__} does not have: {_FIX}") from None
        if isinstance(module, LowRankLinear):
            out_features, in_features = module.out_features, module.in_features
        elif isinstance(module, LINEAR_TYPES):
            out_features, in_features = linear_weight(module).shape
        else:
            raise ModelError(f"{_WHERE} records module {name[:80]!r}, which is a {type(module).__name__}, not a linear layer: {_FIX}")
        if rank > min(out_features, in_features):
            raise ModelError(
                f"{_WHERE}: the rank of {name} is {rank}, above min({out_features}, {in_features}) = {min(out_features, in_features)} "
                f"for this {out_features}x{in_features} layer: {_FIX}"
            )


class FwsvdQuantizationConfig(QuantizationConfigMixin):
    """The compression record of a low-rank factorized model.

    Args:
        ranks: ``{module name: rank}`` of every factorized linear layer.
        method: compression method name (``svd``, ``fwsvd``, ``asvd``, ``svd-llm``).
        **record: everything else worth keeping (library version, keep, parameter counts,
            method options, calibration summary); stored verbatim.
    """

    def __init__(self, ranks: dict[str, int] | None = None, method: str = "svd", **record: Any) -> None:
        # Validated before anything is set: the record may come from anyone's config.json.
        clean = validate_record({**record, "ranks": {} if ranks is None else ranks, "method": method})
        clean.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.method = clean.pop("method")
        self.ranks = {str(k): int(v) for k, v in clean.pop("ranks").items()}
        for key, value in clean.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["quant_method"] = QUANT_METHOD
        return data


def compression_record(config: Any) -> dict[str, Any] | None:
    """The fwsvd record in a model config, as a plain dict, or ``None`` for a dense model.

    A record read from a file (a plain dict) is validated first (see :func:`validate_record`).

    Raises:
        ModelError: when the record names fwsvd but is malformed.
    """
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    if hasattr(qc, "to_dict"):
        data = qc.to_dict()
    elif isinstance(qc, Mapping):
        data = dict(qc)
    else:
        raise ModelError(f"{_WHERE} is {type(qc).__name__}, not an object: {_FIX}")
    if data.get("quant_method") != QUANT_METHOD:
        return None
    return data if isinstance(qc, FwsvdQuantizationConfig) else validate_record(data)
