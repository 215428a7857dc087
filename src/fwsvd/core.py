"""Pure tensor math: weighted truncated SVD, rank budgets, importance reductions, whitening.

Nothing here knows about ``nn.Module``, transformers or files. Every weight is in ``nn.Linear``
layout ``[out_features, in_features]`` and a factorization ``W ≈ A @ B`` has ``A: [out, rank]`` and
``B: [rank, in]``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "balance_factors",
    "dense_parameters",
    "factorized_parameters",
    "floor_relative",
    "kept_fraction",
    "rank_for_kept_fraction",
    "reduce_importance",
    "whitened_svd",
    "weighted_svd",
]

#: Importance values below this fraction of their mean are raised to it, so that a dead row
#: (zero Fisher, zero activation) never leads to a division by zero or an ill-posed scaling.
IMPORTANCE_FLOOR = 1e-6

#: Eigenvalues of a covariance are raised to at least this fraction of its mean diagonal before
#: whitening: far below any useful damping, far above float64 round-off of the eigendecomposition.
EIGENVALUE_FLOOR = 1e-10


def floor_relative(values: torch.Tensor, fraction: float = IMPORTANCE_FLOOR) -> torch.Tensor:
    """Raise every entry to at least ``fraction`` times the mean of ``values``.

    Args:
        values: non-negative 1-D tensor (importances or scales).
        fraction: floor as a fraction of the mean.

    Returns:
        A float tensor of the same shape, strictly positive. An all-zero input becomes all ones
        (no information means uniform weighting).

    Raises:
        ValueError: on negative, NaN or infinite entries.
    """
    values = values.detach().to(torch.float32)
    if not torch.isfinite(values).all():
        raise ValueError("importance contains NaN or infinite values; recalibrate with finite data and weights")
    if (values < 0).any():
        raise ValueError("importance must be non-negative")
    mean = values.mean()
    if mean <= 0:
        return torch.ones_like(values)
    return values.clamp_min(mean * fraction)


def _check_scale(scale: torch.Tensor, size: int, name: str) -> torch.Tensor:
    if scale.shape != (size,):
        raise ValueError(f"{name} has shape {tuple(scale.shape)}, expected ({size},)")
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ValueError(f"{name} must be finite and positive; floor it with floor_relative first")
    return scale.detach()


def balance_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank component so that column ``i`` of ``a`` and row ``i`` of ``b`` share norm.

    The product ``a @ b`` is unchanged; balanced factors train better and keep half-precision
    values in range.
    """
    na = a.norm(dim=0)
    nb = b.norm(dim=1)
    ok = (na > 0) & (nb > 0)
    g = torch.where(ok, (na / torch.where(ok, nb, torch.ones_like(nb))).sqrt(), torch.ones_like(na))
    return a / g, b * g[:, None]


def weighted_svd(
    weight: torch.Tensor,
    rank: int,
    row_weight: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of ``weight`` under a row- and column-weighted Frobenius norm.

    Minimises ``|| diag(r) (W - A B) diag(c) ||_F`` with ``r = row_weight`` and ``c = col_weight``
    (both default to ones, which is plain truncated SVD). A rank-one weighting has the exact closed
    form *scale, SVD, truncate, unscale* (Hsu et al. 2022, eq. 5).

    With weights on one side only the unscale step needs no division:
    rows weighted: ``A = W V_k``, ``B = V_k^T``; columns weighted: ``A = U_k``, ``B = U_k^T W``.

    Args:
        weight: ``[out, in]`` matrix.
        rank: number of components to keep, ``1 <= rank <= min(out, in)``.
        row_weight: ``[out]`` positive scales (e.g. square roots of per-row Fisher importance).
        col_weight: ``[in]`` positive scales.

    Returns:
        ``(A, B)`` with ``A: [out, rank]``, ``B: [rank, in]``, in ``weight``'s dtype and device.

    Raises:
        ValueError: on a rank outside ``[1, min(out, in)]``, mismatched weight shapes, or
            non-finite input.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if not 1 <= rank <= min(out_f, in_f):
        raise ValueError(f"rank {rank} is outside [1, {min(out_f, in_f)}] for a {out_f}x{in_f} matrix")
    # SVD in float32 at least: half precision SVD is unsupported or inaccurate.
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(work_dtype)
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or infinite values")
    r = None if row_weight is None else _check_scale(row_weight, out_f, "row_weight").to(w)
    c = None if col_weight is None else _check_scale(col_weight, in_f, "col_weight").to(w)

    scaled = w
    if r is not None:
        scaled = r[:, None] * scaled
    if c is not None:
        scaled = scaled * c[None, :]
    u, _, vh = torch.linalg.svd(scaled, full_matrices=False)
    u_k, vh_k = u[:, :rank], vh[:rank]
    if c is None:
        # Only rows (or nothing) weighted: project the rows of W onto the top right singular vectors.
        a, b = w @ vh_k.T, vh_k
    elif r is None:
        # Only columns weighted: project the columns of W onto the top left singular vectors.
        a, b = u_k, u_k.T @ w
    else:
        # Both weighted: the unscale divides by the (floored) column scale.
        a, b = w @ (c[:, None] * vh_k.T), vh_k / c[None, :]
    a, b = balance_factors(a, b)
    return a.to(weight.dtype), b.to(weight.dtype)


def whitened_svd(
    weight: torch.Tensor,
    rank: int,
    covariance: torch.Tensor,
    damping: float = 1e-2,
    row_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncation-aware whitening (SVD-LLM, Wang et al. 2024): low rank that minimises output error.

    With ``C = X^T X`` the input covariance and ``C ≈ S S^T``, the factorization of ``W S`` is
    truncated and mapped back with ``S^{-1}``, so the discarded singular values of ``W S`` are exactly
    the output error ``||(W - A B) X^T||_F`` on the calibration data (up to damping).

    ``S`` comes from an eigendecomposition in float64 of ``C + damping * mean(diag C) * I``; the
    relative damping makes a singular or slightly indefinite covariance (duplicated features, too
    few samples, round-off) safe on purpose rather than through retries.

    Args:
        weight: ``[out, in]`` matrix.
        rank: components to keep.
        covariance: ``[in, in]`` symmetric positive semi-definite matrix (sum of ``x x^T``).
        damping: added to the eigenvalues as a fraction of the mean diagonal of ``covariance``.
        row_weight: ``[out]`` positive scales of the output error's rows (e.g. square roots of
            per-output Fisher importance): minimises ``||diag(r) (W - A B) X^T||_F`` instead.

    Returns:
        ``(A, B)`` as in :func:`weighted_svd`.

    Raises:
        ValueError: on shape mismatch, negative damping or non-finite covariance.
    """
    out_f, in_f = weight.shape
    if covariance.shape != (in_f, in_f):
        raise ValueError(f"covariance has shape {tuple(covariance.shape)}, expected ({in_f}, {in_f})")
    if damping < 0:
        raise ValueError(f"damping {damping} must be >= 0")
    if not 1 <= rank <= min(out_f, in_f):
        raise ValueError(f"rank {rank} is outside [1, {min(out_f, in_f)}] for a {out_f}x{in_f} matrix")
    # float64: the inverse square root of a nearly singular matrix loses too much in float32.
    cov = covariance.detach().to(torch.float64)
    if not torch.isfinite(cov).all():
        raise ValueError("covariance contains NaN or infinite values; recalibrate with finite inputs")
    cov = (cov + cov.T) / 2
    scale = cov.diagonal().mean()
    if scale <= 0:
        # No signal at all: whitening carries no information, fall back to the (row-weighted) SVD.
        return weighted_svd(weight, rank, row_weight=row_weight)
    evals, evecs = torch.linalg.eigh(cov)
    # Negative eigenvalues are round-off; the floor keeps S invertible even with damping=0 and a
    # singular covariance (directions the data never visits then carry almost no weight).
    evals = (evals.clamp_min(0) + damping * scale).clamp_min(EIGENVALUE_FLOOR * scale)
    sqrt_e = evals.sqrt()
    w = weight.detach().to(torch.float64)
    # W S with S = Q diag(sqrt(e)); S^{-1} = diag(1/sqrt(e)) Q^T.
    ws = (w @ evecs) * sqrt_e[None, :]
    # Rows weighted: the truncation is chosen on diag(r) W S; A = W S V_k needs no unscaling.
    r = None if row_weight is None else _check_scale(row_weight, out_f, "row_weight").to(ws)
    _, _, vh = torch.linalg.svd(ws if r is None else r[:, None] * ws, full_matrices=False)
    vh_k = vh[:rank]
    a = ws @ vh_k.T
    b = (vh_k / sqrt_e[None, :]) @ evecs.T
    a, b = balance_factors(a, b)
    return a.to(weight.dtype), b.to(weight.dtype)


def reduce_importance(fisher: torch.Tensor, side: str) -> torch.Tensor:
    """Reduce an elementwise ``[out, in]`` importance to one value per output row or input column.

    Args:
        fisher: ``[out, in]`` non-negative tensor (e.g. accumulated squared gradients).
        side: ``"out"`` sums over inputs (one value per output feature, FWSVD's original row
            importance) or ``"in"`` sums over outputs (one value per input feature).

    Returns:
        1-D tensor of length ``out`` or ``in``.
    """
    if side == "out":
        return fisher.sum(dim=1)
    if side == "in":
        return fisher.sum(dim=0)
    raise ValueError(f"side must be 'out' or 'in', got {side!r}")


def dense_parameters(out_features: int, in_features: int, bias: bool) -> int:
    """Parameters of a dense linear layer."""
    return out_features * in_features + (out_features if bias else 0)


def factorized_parameters(out_features: int, in_features: int, rank: int, bias: bool) -> int:
    """Parameters of a rank-``rank`` factorization ``A [out, rank] @ B [rank, in]`` plus bias."""
    return rank * (out_features + in_features) + (out_features if bias else 0)


def rank_for_kept_fraction(out_features: int, in_features: int, keep: float, bias: bool = False) -> int | None:
    """Rank whose factorization keeps ``keep`` of the layer's parameters (bias included).

    ``keep`` is the fraction of parameters that **stays** (1.0 = nothing removed, so every layer
    stays dense). The rank is
    rounded to the nearest integer, so the kept parameters land within half a rank's worth of the
    target, and is at least 1.

    Returns:
        The rank, or ``None`` when the factorization would not hold fewer parameters than the dense
        layer (the layer should stay dense).

    Raises:
        ValueError: when ``keep`` is not in ``(0, 1]``.
    """
    if not (isinstance(keep, (int, float)) and math.isfinite(keep) and 0 < keep <= 1):
        raise ValueError(f"keep={keep!r} must be a fraction in (0, 1]: the share of parameters that stays")
    if keep >= 1:
        return None  # everything stays: no layer is factorized
    dense = dense_parameters(out_features, in_features, bias)
    bias_n = out_features if bias else 0
    rank = max(1, round((keep * dense - bias_n) / (out_features + in_features)))
    rank = min(rank, min(out_features, in_features))
    if factorized_parameters(out_features, in_features, rank, bias) >= dense:
        return None
    return rank


def kept_fraction(kept: int, dense: int) -> float:
    """``kept / dense`` with a clear error on an empty denominator."""
    if dense <= 0:
        raise ValueError("no dense parameters to compare against")
    return kept / dense
