"""Hugging Face folders: save (atomically), load, inspect, and the dtype a folder stores."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FwsvdError
from .atomic import atomic_dir
from .record import FwsvdQuantizationConfig, compression_record
from .loading import dtype_name, load_model
from ..nn import FACTORS, LowRankLinear, QuantizedLinear
from ..config import STORAGE_DTYPES
from ..nn import count_parameters


def _storage_target(model: nn.Module, dtype: str, caller: str) -> tuple[FwsvdQuantizationConfig, torch.dtype]:
    """The compression record of ``model`` and the torch dtype ``--dtype`` names, both checked."""
    if dtype not in STORAGE_DTYPES:
        raise FwsvdError(f"--dtype {dtype!r} must be one of {', '.join(STORAGE_DTYPES)}")
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(qc, FwsvdQuantizationConfig):
        raise FwsvdError(f"{caller} needs a model compressed by fwsvd (with its compression record)")
    return qc, getattr(torch, dtype)


def cast_weights(model: nn.Module, dtype: str) -> None:
    """Cast every floating-point weight of a compressed model to ``dtype``, as :func:`save` will store it.

    This is ``--dtype``: the parameters (a tied embedding and head once, still tied), the factors
    and the persistent buffers are cast, so a bfloat16 or float16 folder is half the float32 one;
    ``save_pretrained`` writes ``dtype`` as the config's ``dtype`` and the record says
    ``stored_dtype``. Like any Hugging Face model after ``model.to(dtype)``, the model then computes
    in ``dtype``. Non-persistent buffers (a rotary embedding's ``inv_freq``) are not saved and are
    rebuilt in float32 at load, so they keep their precision here too. Loading the folder with
    :func:`load` (or ``from_pretrained(path, dtype=torch.float32)``) computes in float32 with the
    rounded weights; ``from_pretrained(path)`` (``dtype="auto"``) in ``dtype``.

    Raises:
        FwsvdError: for a dtype not in :data:`STORAGE_DTYPES` or a model without a compression record.
    """
    qc, target = _storage_target(model, dtype, "cast_weights")
    # Factors rounded by --quantize-factors stay float32 (on their int8 grid): save writes them as int8.
    quantized = getattr(qc, "quantized_factors", None) is not None
    for module in model.modules():
        keep_factors = quantized and isinstance(module, LowRankLinear)
        for name, param in module.named_parameters(recurse=False):
            if keep_factors and name in FACTORS:
                continue
            if param.is_floating_point():
                param.data = param.data.to(target)  # in place on the Parameter: tied weights stay one object
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                setattr(module, name, buffer.to(target))
    qc.stored_dtype = dtype
    if hasattr(qc, "factor_dtype"):
        del qc.factor_dtype  # superseded: the factors are stored in ``dtype`` with everything else


def cast_factors(model: nn.Module, dtype: str) -> None:
    """Store only the :class:`LowRankLinear` layers (factors and bias) in ``dtype``; the older form of ``--dtype``.

    Kept for scripts that used it: the embeddings, norms and dense layers stay in the model's dtype,
    so the folder does not halve (use :func:`cast_weights`). The layers compute in their inputs'
    dtype, so the model runs as before with the factors rounded; the record says ``factor_dtype``.

    Raises:
        FwsvdError: for a dtype not in :data:`STORAGE_DTYPES` or a model without a compression record.
    """
    qc, target = _storage_target(model, dtype, "cast_factors")
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            module.to(target)
    qc.factor_dtype = dtype


def _sync_stored_dtype(model: nn.Module) -> None:
    """Make the record's ``stored_dtype`` / ``factor_dtype`` say what saving ``model`` now writes.

    A bfloat16 folder loaded in float32 (what :func:`load` does) and saved again is float32: a
    record that still said bfloat16 would be wrong. :func:`save` calls this before writing.
    """
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(qc, FwsvdQuantizationConfig):
        return
    stored = getattr(qc, "stored_dtype", None)
    if stored is not None:
        # int8 factors (``quantized_factors``) are written as int8 whatever their dtype in memory.
        skip = tuple(f".{f}" for f in FACTORS) if getattr(qc, "quantized_factors", None) else ()
        dtypes = {dtype_name(t.dtype) for k, t in model.state_dict().items() if t.is_floating_point() and not (skip and k.endswith(skip))}
        if dtypes != {stored}:
            if len(dtypes) == 1 and next(iter(dtypes)) in STORAGE_DTYPES:
                qc.stored_dtype = next(iter(dtypes))
            else:
                del qc.stored_dtype
    factor = getattr(qc, "factor_dtype", None)
    if factor is not None:
        dtypes = {dtype_name(t.dtype) for m in model.modules() if isinstance(m, LowRankLinear) for t in m.state_dict().values()}
        if dtypes != {factor}:
            del qc.factor_dtype


def save(model: nn.Module, out: str | Path, tokenizer: Any = None, *, overwrite: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face folder with safetensors weights, atomically.

    Raises:
        FwsvdError: when ``out`` exists, is not empty and ``overwrite`` is false.
    """
    from .int8 import stored_state_dict

    # int8 factors and their scales (when the record says so and they are on their grid), quantized
    # layers' correction factors in float16; None: the model's own state dict.
    state = stored_state_dict(model)
    _sync_stored_dtype(model)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, **({"state_dict": state} if state is not None else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def quantized_bytes_table(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per quantized layer: grid, correction rank and the bytes it stores (weight, scales, correction, bias)."""
    return {
        name: {"bits": m.bits, "group_size": m.group_size, "rank": m.rank, **m.storage_bytes()}
        for name, m in model.named_modules() if isinstance(m, QuantizedLinear)
    }


def load(path: str | Path, task: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a compressed (or dense) model folder; the task comes from its config when omitted.

    Like ``AutoModelFor<Task>.from_pretrained(path)`` after ``import fwsvd``, but stricter (see
    :func:`fwsvd.storage.loading.load_model`): no code from the folder runs, pickle weights are refused
    unless ``allow_pickle=True``, the compression record is validated, and a missing or unused
    tensor is an error.

    Raises:
        ModelError: for a missing, unreadable, incomplete or inconsistent folder.
    """
    return load_model(path, task, **kwargs).model


def inspect(model: nn.Module) -> dict[str, Any]:
    """Parameter counts and ranks of a model, from its live modules and its compression record."""
    record = compression_record(model.config) or {}
    params = count_parameters(model)
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    return {
        "compressed": bool(record),
        "method": record.get("method"),
        "library_version": record.get("library_version"),
        "parameters": params,
        "dense_parameters": record.get("dense_parameters", params),
        "model_keep": params / record.get("dense_parameters", params),
        "target_keep": record.get("target_keep", 1.0),
        "keep": record.get("keep"),
        "target_parameters": record.get("target_parameters"),
        "target_dense_parameters": record.get("target_dense_parameters"),
        "ranks": ranks,
        "allocation": record.get("allocation", {"mode": "uniform"} if record else None),
        # What the folder was stored in (None: the model's own dtype; older folders may record only
        # their factors' dtype) and what this loaded model computes in.
        "stored_dtype": record.get("stored_dtype"),
        "factor_dtype": record.get("quantized_factors") or record.get("stored_dtype") or record.get("factor_dtype"),
        "quantized_factors": record.get("quantized_factors"),
        "dtype": dtype_name(next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)),
        "rank_table": rank_table(ranks, record.get("dense_layers", [])),
        "calibration": record.get("calibration", {}),
        "correction": record.get("correction"),
        "quantized_weights": _quantized_summary(record.get("quantized_weights"), quantized_bytes_table(model)),
    }


def _quantized_summary(grid: Mapping[str, Any] | None, table: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if grid is None:
        return None
    return {
        "scheme": grid["scheme"], "group_size": grid["group_size"], "dense_bytes": grid["dense_bytes"], "model_bytes": grid["model_bytes"],
        "model_fraction": grid["model_bytes"] / grid["dense_bytes"], "layers": table,
    }


def rank_table(ranks: Mapping[str, int], dense_layers: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Ranks by layer type and depth: ``model.layers.3.self_attn.q_proj`` is type ``self_attn.q_proj``
    at depth 3 (the first number in the name; names without one are their own type, depth ``None``).

    Returns:
        ``{layer type: {"depths": [...], "ranks": [rank or None (dense), ...]}}``, depths ascending.
    """
    table: dict[str, dict[int | None, int | None]] = {}
    entries = [(name, rank) for name, rank in ranks.items()] + [(name, None) for name in dense_layers]
    for name, rank in entries:
        parts = name.split(".")
        at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        kind, depth = (name, None) if at is None else (".".join(parts[at + 1 :]) or name, int(parts[at]))
        table.setdefault(kind, {})[depth] = rank
    out: dict[str, dict[str, Any]] = {}
    for kind, by_depth in table.items():
        depths = sorted(by_depth, key=lambda d: (d is None, d if d is not None else 0))
        out[kind] = {"depths": depths, "ranks": [by_depth[d] for d in depths]}
    return out
