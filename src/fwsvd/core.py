"""Pure tensor math: weighted truncated SVD, rank budgets, importance reductions, whitening.

Nothing here knows about ``nn.Module``, transformers or files. Every weight is in ``nn.Linear``
layout ``[out_features, in_features]`` and a factorization ``W ≈ A @ B`` has ``A: [out, rank]`` and
``B: [rank, in]``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Decomposition",
    "allocate_budget",
    "allocate_ranks",
    "balance_factors",
    "dense_parameters",
    "factorized_parameters",
    "floor_relative",
    "kept_fraction",
    "output_error",
    "rank_for_kept_fraction",
    "reduce_importance",
    "refit_left_factor",
    "refit_step",
    "round_ranks",
    "shared_basis_decomposition",
    "shared_basis_svd",
    "whitened_svd",
    "weighted_decomposition",
    "weighted_svd",
    "whitened_decomposition",
]

#: Importance values below this fraction of their mean are raised to it, so that a dead row
#: (zero Fisher, zero activation) never leads to a division by zero or an ill-posed scaling.
IMPORTANCE_FLOOR = 1e-6

#: Eigenvalues of a covariance are raised to at least this fraction of its mean diagonal before
#: whitening: far below any useful damping, far above float64 round-off of the eigendecomposition.
EIGENVALUE_FLOOR = 1e-10
#: A covariance whose smallest eigenvalue lies below minus this fraction of its largest is not one
#: (float32 sums of x xᵀ stray a few 1e-7 below zero at most) and is refused, not clamped.
INDEFINITE_TOLERANCE = 1e-4
#: When global allocation may keep a matrix dense (:func:`allocate_ranks`): once its rank passes
#: break-even, or at any rank where the loss estimate says so.
DENSE_CHOICES = ("break-even", "loss")


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


@dataclass(frozen=True)
class Decomposition:
    """A weighted SVD kept whole, so that factors of every rank are a slice away.

    ``W ≈ left[:, :k] @ right[:k]`` is the best rank-``k`` approximation under the weighted norm the
    decomposition was made for, and ``values`` are the singular values of the weighted matrix
    (descending): truncating at rank ``k`` costs ``sum(values[k:] ** 2)`` in that norm. Rank
    allocation reads ``values``; :meth:`truncate` gives the factors once a rank is chosen.

    Attributes:
        left: ``[out, m]`` (``m = min(out, in)``).
        right: ``[m, in]``.
        values: ``[m]`` singular values of the weighted matrix.
        dtype: the dtype the factors are returned in (the weight's).
    """

    left: torch.Tensor
    right: torch.Tensor
    values: torch.Tensor
    dtype: torch.dtype

    @property
    def max_rank(self) -> int:
        return int(self.values.numel())

    def truncate(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced factors ``(A [out, rank], B [rank, in])`` in the weight's dtype.

        Raises:
            ValueError: on a rank outside ``[1, m]``.
        """
        out_f, in_f = self.left.shape[0], self.right.shape[1]
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} is outside [1, {self.max_rank}] for a {out_f}x{in_f} matrix")
        a, b = balance_factors(self.left[:, :rank], self.right[:rank])
        return a.to(self.dtype), b.to(self.dtype)


def _check_rank(weight: torch.Tensor, rank: int) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if not 1 <= rank <= min(out_f, in_f):
        raise ValueError(f"rank {rank} is outside [1, {min(out_f, in_f)}] for a {out_f}x{in_f} matrix")


def weighted_svd(
    weight: torch.Tensor,
    rank: int,
    row_weight: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of ``weight`` under a row- and column-weighted Frobenius norm.

    Minimises ``|| diag(r) (W - A B) diag(c) ||_F`` with ``r = row_weight`` and ``c = col_weight``
    (both default to ones, which is plain truncated SVD). A rank-one weighting has the exact closed
    form *scale, SVD, truncate, unscale* (Hsu et al. 2022, eq. 5); see :func:`weighted_decomposition`.

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
    _check_rank(weight, rank)
    return weighted_decomposition(weight, row_weight, col_weight).truncate(rank)


def weighted_decomposition(
    weight: torch.Tensor,
    row_weight: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
) -> Decomposition:
    """The whole decomposition behind :func:`weighted_svd` (every rank at once).

    With weights on one side only the unscale step needs no division:
    rows weighted: ``A = W V_k``, ``B = V_k^T``; columns weighted: ``A = U_k``, ``B = U_k^T W``.

    Raises:
        ValueError: on mismatched weight shapes or non-finite input.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
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
    u, sv, vh = torch.linalg.svd(scaled, full_matrices=False)
    if c is None:
        # Only rows (or nothing) weighted: project the rows of W onto the top right singular vectors.
        left, right = w @ vh.T, vh
    elif r is None:
        # Only columns weighted: project the columns of W onto the top left singular vectors.
        left, right = u, u.T @ w
    else:
        # Both weighted: the unscale divides by the (floored) column scale.
        left, right = w @ (c[:, None] * vh.T), vh / c[None, :]
    return Decomposition(left, right, sv, weight.dtype)


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
    _check_rank(weight, rank)
    return whitened_decomposition(weight, covariance, damping, row_weight).truncate(rank)


def whitened_decomposition(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    damping: float = 1e-2,
    row_weight: torch.Tensor | None = None,
) -> Decomposition:
    """The whole decomposition behind :func:`whitened_svd`: ``values`` are the singular values of
    ``diag(r) W S``, so ``sum(values[k:] ** 2)`` is the (row-weighted) output error at rank ``k``.

    Raises:
        ValueError: on shape mismatch, negative damping or non-finite covariance.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if covariance.shape != (in_f, in_f):
        raise ValueError(f"covariance has shape {tuple(covariance.shape)}, expected ({in_f}, {in_f})")
    if damping < 0:
        raise ValueError(f"damping {damping} must be >= 0")
    # float64: the inverse square root of a nearly singular matrix loses too much in float32.
    cov = covariance.detach().to(torch.float64)
    if not torch.isfinite(cov).all():
        raise ValueError("covariance contains NaN or infinite values; recalibrate with finite inputs")
    cov = (cov + cov.T) / 2
    scale = cov.diagonal().mean()
    if scale <= 0:
        # No signal at all: whitening carries no information, fall back to the (row-weighted) SVD.
        return weighted_decomposition(weight, row_weight=row_weight)
    w = weight.detach().to(torch.float64)
    r = None if row_weight is None else _check_scale(row_weight, out_f, "row_weight").to(w)
    # Any square root S of the damped covariance (S S^T = C) gives the same truncation, since the
    # output error is ||(W - W') S||_F. A Cholesky factor costs a fraction of an eigendecomposition
    # (the 1536-wide MLP covariance of SmolLM2: most of the whitening time); the floor keeps it
    # defined with damping=0 and a singular covariance (directions the data never visits then carry
    # almost no weight).
    eye = torch.eye(in_f, dtype=torch.float64, device=cov.device)
    chol, info = torch.linalg.cholesky_ex(cov + (damping + EIGENVALUE_FLOOR) * scale * eye)
    if int(info) == 0:
        ws = w @ chol

        def unwhiten(vh: torch.Tensor) -> torch.Tensor:
            # Vh S^{-1}, by a triangular solve rather than an inverse.
            return torch.linalg.solve_triangular(chol, vh, upper=False, left=False)

    else:
        # Round-off made the floored covariance indefinite (only possible with little or no
        # damping): the eigendecomposition clamps the offending eigenvalues instead.
        evals, evecs = torch.linalg.eigh(cov)
        if evals[0] < -INDEFINITE_TOLERANCE * evals.abs().max():
            # Round-off leaves eigenvalues of a sum of x xᵀ at most a tiny fraction below zero; a
            # clearly negative one means the matrix is not a covariance, and clamping would hide it.
            raise ValueError(
                f"the covariance is not positive semi-definite (smallest eigenvalue {evals[0].item():.3g}, "
                f"largest {evals[-1].item():.3g}), so it is not a sum of x xᵀ"
            )
        sqrt_e = (evals.clamp_min(0) + damping * scale).clamp_min(EIGENVALUE_FLOOR * scale).sqrt()
        # S = Q diag(sqrt(e)); S^{-1} = diag(1/sqrt(e)) Q^T.
        ws = (w @ evecs) * sqrt_e[None, :]

        def unwhiten(vh: torch.Tensor) -> torch.Tensor:
            return (vh / sqrt_e[None, :]) @ evecs.T

    # Rows weighted: the truncation is chosen on diag(r) W S; A = W S V_k needs no unscaling.
    _, sv, vh = torch.linalg.svd(ws if r is None else r[:, None] * ws, full_matrices=False)
    left = ws @ vh.T
    right = unwhiten(vh)
    # Kept in float32 (float64 weights stay float64): the factors are cast to the weight's dtype
    # anyway, and a whole decomposition per layer is held during rank allocation.
    keep_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return Decomposition(left.to(keep_dtype), right.to(keep_dtype), sv.to(keep_dtype), weight.dtype)


def _stack_group(
    weights: Sequence[torch.Tensor], row_weights: Sequence[torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The group's weights stacked vertically (``[sum out_i, in]``) and their row weights joined."""
    if len(weights) == 0:
        raise ValueError("a shared basis needs at least one weight")
    for k, w in enumerate(weights):
        if w.ndim != 2:
            raise ValueError(f"weight {k} must be 2-D, got shape {tuple(w.shape)}")
    in_f = weights[0].shape[1]
    if any(w.shape[1] != in_f for w in weights):
        raise ValueError(
            f"a shared basis needs one input width: the weights read {[int(w.shape[1]) for w in weights]} features"
        )
    if len({w.dtype for w in weights}) != 1:
        raise ValueError(f"the weights have dtypes {sorted({str(w.dtype) for w in weights})}: cast them to one")
    stacked = torch.cat([w.detach() for w in weights])
    if row_weights is None:
        return stacked, None
    if len(row_weights) != len(weights):
        raise ValueError(f"{len(row_weights)} row weights for {len(weights)} weights")
    rows = [_check_scale(r, int(w.shape[0]), f"row_weights[{k}]") for k, (r, w) in enumerate(zip(row_weights, weights))]
    return stacked, torch.cat([r.to(torch.float64) for r in rows])


def shared_basis_decomposition(
    weights: Sequence[torch.Tensor],
    covariance: torch.Tensor | None = None,
    damping: float = 1e-2,
    row_weights: Sequence[torch.Tensor] | None = None,
) -> Decomposition:
    """The whole decomposition behind :func:`shared_basis_svd`, of the stacked ``[sum out_i, in]`` matrix.

    ``left``'s rows follow the members in order (``out_0`` rows, then ``out_1``, ...), so member
    ``i``'s factor is its block of rows; ``values`` are the singular values of the stacked weighted
    matrix, so ``sum(values[k:] ** 2)`` is the group's summed (row-weighted, output) error at rank ``k``.

    Raises:
        ValueError: as :func:`shared_basis_svd`.
    """
    stacked, row = _stack_group(weights, row_weights)
    if covariance is None:
        return weighted_decomposition(stacked, row_weight=row)
    return whitened_decomposition(stacked, covariance, damping, row)


def shared_basis_svd(
    weights: Sequence[torch.Tensor],
    rank: int,
    covariance: torch.Tensor | None = None,
    damping: float = 1e-2,
    row_weights: Sequence[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One right factor ``B`` for a group of weights that read the same input (q/k/v, gate/up).

    ``W_i ≈ A_i B`` with one ``B: [rank, in]`` and a left factor ``A_i: [out_i, rank]`` per member:
    the best rank-``rank`` approximation of the vertically stacked matrix ``[W_0; W_1; ...]``, under
    the same norm as :func:`weighted_svd` (no ``covariance``) or :func:`whitened_svd` (with it: the
    members share one input, so one covariance whitens them all). It minimises the members' summed
    error ``sum_i ||diag(r_i) (W_i - A_i B) X^T||_F^2``, whose minimum is the discarded singular
    values of ``diag(r) [W_0; W_1; ...] S`` squared (Eckart–Young on the stacked matrix). It holds
    ``rank * (in + sum out_i)`` values against ``sum r_i (out_i + in)`` for separate factors.
    One member gives exactly :func:`weighted_svd` / :func:`whitened_svd`.

    Args:
        weights: ``[out_i, in]`` matrices of one dtype and one input width.
        rank: components of the shared basis, ``1 <= rank <= min(sum out_i, in)``.
        covariance: ``[in, in]`` input covariance ``X^T X`` of the shared input, or ``None``.
        damping: as in :func:`whitened_svd` (only with ``covariance``).
        row_weights: per member, ``[out_i]`` positive scales of its output error (e.g. square roots
            of per-output Fisher importance), or ``None`` for all ones.

    Returns:
        ``([A_0, A_1, ...], B)`` in the weights' dtype and device.

    Raises:
        ValueError: on no weights, differing input widths or dtypes, a rank outside
            ``[1, min(sum out_i, in)]``, mismatched or non-positive row weights, or non-finite input.
    """
    stacked, _ = _stack_group(weights, row_weights)
    _check_rank(stacked, rank)
    a, b = shared_basis_decomposition(weights, covariance, damping, row_weights).truncate(rank)
    return list(a.split([int(w.shape[0]) for w in weights])), b


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


def allocate_ranks(
    losses: Sequence[torch.Tensor],
    shapes: Sequence[tuple[int, int, bool]],
    keep: float,
    floor: float = 0.5,
    dense_above: float = 1.0,
    dense_choice: str = "break-even",
) -> list[int | None]:
    """Ranks per matrix that keep ``keep`` of all their parameters and lose the least estimated loss.

    ``keep`` is the fraction of the matrices' parameters (biases included) that **stays**, as in
    :func:`rank_for_kept_fraction`, but the budget is shared: a component (one rank of one matrix)
    costs ``out + in`` parameters and is worth ``losses[i][k]``, the estimated loss increase of
    discarding it. Components are taken greedily by worth per parameter (a matrix's worth is
    non-increasing in ``k``, so each matrix keeps a prefix). A matrix whose rank reaches its
    break-even rank stays dense, which frees ``rank * (out + in) - out * in`` parameters for the
    others; the selection is repeated until no matrix changes side. Every factorized matrix keeps at
    least ``floor`` times its uniform rank (at least 1), so none collapses.

    With ``dense_above < 1`` a matrix stays dense as soon as its rank would pass ``dense_above``
    times its break-even rank ``out * in / (out + in)``: near break-even the two thin products
    hold almost the dense parameters yet run slower than the one dense product (benchmarks/layer_kernels.py
    measures where on a given CPU), so the few parameters such a matrix would save are better
    taken from the others.

    With ``dense_choice="loss"`` staying dense is an option at every rank, priced like the rest: a
    matrix at rank ``r`` that turns dense pays ``out * in - r * (out + in)`` parameters for the
    estimated loss of all its discarded components. One price per parameter (a Lagrange multiplier,
    found by bisection so that the budget is met) picks, per matrix, the rank or dense form that
    minimises its estimated loss plus the price times its parameters; the parameters left under the
    budget then buy single components, most worth per parameter first. A matrix whose spectrum is
    flat stays dense where the default would cut it everywhere a little, and the rank goes where it
    falls off fast.

    Args:
        losses: per matrix, ``[min(out, in)]`` non-negative estimates, in decreasing order.
        shapes: per matrix, ``(out_features, in_features, has_bias)``.
        keep: fraction of the parameters that stays, in ``(0, 1]``.
        floor: minimum rank as a fraction of the uniform rank, in ``[0, 1]``.
        dense_above: fraction of the break-even rank above which a matrix stays dense, in ``(0, 1]``
            (1: only where factorizing would save no parameters).
        dense_choice: ``"break-even"`` (a matrix turns dense only when its rank passes break-even)
            or ``"loss"`` (at any rank, when the loss estimate says so; see above).

    Returns:
        Per matrix, its rank, or ``None`` for a matrix that stays dense. The parameters kept land
        at most one component's worth below ``keep`` of the total (never above, unless the floors
        alone exceed it); with ``dense_above < 1``, at most what turning one more matrix dense
        would cost below it; with ``dense_choice="loss"``, at most one matrix's dense form plus one
        component below it.

    Raises:
        ValueError: on ``keep``, ``floor`` or ``dense_above`` out of range, or mismatched lengths or shapes.
    """
    if not (isinstance(keep, (int, float)) and math.isfinite(keep) and 0 < keep <= 1):
        raise ValueError(f"keep={keep!r} must be a fraction in (0, 1]: the share of parameters that stays")
    if not 0 <= floor <= 1:
        raise ValueError(f"rank floor {floor} must lie in [0, 1] (a fraction of the uniform rank)")
    if not 0 < dense_above <= 1:
        raise ValueError(f"dense_above={dense_above} must lie in (0, 1] (a fraction of the break-even rank)")
    if dense_choice not in DENSE_CHOICES:
        raise ValueError(f"dense_choice={dense_choice!r} must be one of {', '.join(DENSE_CHOICES)}")
    if len(losses) != len(shapes):
        raise ValueError(f"{len(losses)} loss vectors for {len(shapes)} matrices")
    n = len(shapes)
    if keep >= 1 or n == 0:
        return [None] * n
    dense = [dense_parameters(o, i, b) for o, i, b in shapes]
    budget = keep * sum(dense)
    cost = [o + i for o, i, _ in shapes]
    bias = [o if b else 0 for o, _, b in shapes]
    # Largest rank that still saves parameters; matrices that cannot save any stay dense.
    even = [min(min(o, i), (d - bb - 1) // c) for (o, i, _), d, bb, c in zip(shapes, dense, bias, cost)]
    if dense_above < 1:
        even = [min(e, math.floor(dense_above * o * i / (o + i))) for e, (o, i, _) in zip(even, shapes)]
    low = []
    for k, ((o, i, b), vec) in enumerate(zip(shapes, losses)):
        if vec.shape != (min(o, i),):
            raise ValueError(f"losses of matrix {k} have shape {tuple(vec.shape)}, expected ({min(o, i)},)")
        uniform = rank_for_kept_fraction(o, i, keep, bias=b) or even[k]
        low.append(min(even[k], max(1, math.ceil(floor * uniform))) if even[k] >= 1 else 0)
    if dense_choice == "loss":
        return _allocate_priced(losses, shapes, budget, dense, low, even)
    stays_dense = [e < 1 for e in even]
    # Matrices held at ``even`` because turning them dense would not fit the budget (only with
    # ``dense_above < 1``: at break-even, dense never costs more than the next component).
    capped = [False] * n
    while True:
        fixed = sum(d for d, sd in zip(dense, stays_dense) if sd)
        fixed += sum(lo * c + bb for lo, c, bb, sd in zip(low, cost, bias, stays_dense) if not sd)
        spare = budget - fixed
        # Candidates: every component above a factorized matrix's floor, up to one past break-even
        # (taking that one turns the matrix dense) or up to ``even`` for a capped matrix.
        worth, price, owner, position = [], [], [], []
        for k in range(n):
            if stays_dense[k]:
                continue
            extra = losses[k][low[k] : min(even[k] + (0 if capped[k] else 1), losses[k].numel())].double().clamp_min(0)
            worth.append(extra / cost[k])
            price.append(torch.full_like(extra, float(cost[k])))
            owner.append(torch.full(extra.shape, k, dtype=torch.long))
            position.append(torch.arange(low[k], low[k] + extra.numel()))
        ranks = [None if sd else lo for lo, sd in zip(low, stays_dense)]
        if worth and spare > 0:
            w, p, who, pos = torch.cat(worth), torch.cat(price), torch.cat(owner), torch.cat(position)
            # Ties (e.g. all-zero worth) go to the lower ranks first, spreading evenly over the
            # matrices: sort by position, then (stably) by worth.
            by_position = torch.sort(pos, stable=True).indices
            order = by_position[torch.sort(w[by_position], descending=True, stable=True).indices]
            taken = int((torch.cumsum(p[order], 0) <= spare).sum())
            counts = torch.bincount(who[order[:taken]], minlength=n)
            for k in range(n):
                if not stays_dense[k]:
                    ranks[k] = low[k] + int(counts[k])
        newly = [k for k in range(n) if ranks[k] is not None and ranks[k] > even[k]]
        if not newly:
            return ranks
        # The loss a matrix keeps by turning dense, per parameter that costs: the most worth first,
        # while the floors of the rest still fit.
        jump = {k: dense[k] - low[k] * cost[k] - bias[k] for k in newly}
        gain = {k: float(losses[k][even[k]:].double().clamp_min(0).sum()) / max(1, dense[k] - even[k] * cost[k] - bias[k]) for k in newly}
        for k in sorted(newly, key=lambda k: -gain[k]):
            if fixed + jump[k] <= budget:
                stays_dense[k] = True
                fixed += jump[k]
            else:
                capped[k] = True


def _allocate_priced(
    losses: Sequence[torch.Tensor],
    shapes: Sequence[tuple[int, int, bool]],
    budget: float,
    dense: Sequence[int],
    low: Sequence[int],
    even: Sequence[int],
) -> list[int | None]:
    """:func:`allocate_ranks` with ``dense_choice="loss"``: every matrix's options (each rank from its
    floor ``low`` to ``even``, or dense) under one price per parameter, then single components."""
    n = len(shapes)
    width = max(e - lo + 2 if e >= 1 else 1 for lo, e in zip(low, even))
    # Options per matrix, padded: columns 0 .. even-low are the ranks low .. even, the next is dense.
    costs = torch.full((n, width), math.inf, dtype=torch.float64)
    loss = torch.full((n, width), math.inf, dtype=torch.float64)
    for k, ((o, i, b), vec) in enumerate(zip(shapes, losses)):
        bias = o if b else 0
        if even[k] < 1:
            costs[k, 0], loss[k, 0] = dense[k], 0.0
            continue
        values = vec.double().clamp_min(0)
        # tail[r]: the estimated loss of discarding components r, r+1, ...
        tail = torch.cat([values.flip(0).cumsum(0).flip(0), values.new_zeros(1)])
        ranks = torch.arange(low[k], even[k] + 1)
        m = ranks.numel()
        costs[k, :m] = (ranks * (o + i) + bias).double()
        loss[k, :m] = tail[ranks]
        costs[k, m], loss[k, m] = dense[k], 0.0
    rows = torch.arange(n)

    def choose(price: float) -> tuple[torch.Tensor, float]:
        # inf - inf never arises: padded cells have infinite loss and cost, a price is finite and >= 0.
        pick = torch.argmin(loss + price * costs, dim=1)
        return pick, float(costs[rows, pick].sum())

    low_price, high_price = 0.0, 1.0
    while choose(high_price)[1] > budget and high_price < 1e300:
        high_price *= 4
    for _ in range(200):
        mid = math.sqrt(low_price * high_price) if low_price > 0 else high_price / 1e6
        if choose(mid)[1] > budget:
            low_price = mid
        else:
            high_price = mid
        if low_price > 0 and high_price / low_price < 1 + 1e-12:
            break
    pick, spent = choose(high_price)
    ranks_out: list[int | None] = []
    for k in range(n):
        j = int(pick[k])
        dense_column = even[k] - low[k] + 1 if even[k] >= 1 else 0
        ranks_out.append(None if j == dense_column else low[k] + j)
    # What the price left under the budget buys single components, most worth per parameter first.
    spare = budget - spent
    heap = [(-float(losses[k][r].clamp_min(0)) / (shapes[k][0] + shapes[k][1]), k) for k, r in enumerate(ranks_out) if r is not None and r < even[k]]
    heapq.heapify(heap)
    while heap:
        _, k = heapq.heappop(heap)
        price = shapes[k][0] + shapes[k][1]
        if price > spare:
            continue
        spare -= price
        r = ranks_out[k] + 1
        ranks_out[k] = r
        if r < even[k]:
            heapq.heappush(heap, (-float(losses[k][r].clamp_min(0)) / price, k))
    return ranks_out


def round_ranks(ranks: Sequence[int | None], shapes: Sequence[tuple[int, int, bool]], multiple: int) -> list[int | None]:
    """Ranks moved to multiples of ``multiple`` without holding more parameters than ``ranks`` do.

    Matrix kernels run fastest on widths that fill their vector registers and blocks; a rank of
    127 costs nearly what 128 does. Every rank is first rounded down to a multiple (a rank below
    ``multiple`` stays as it is), then the parameters this frees buy roundings up, the ranks that
    lost most first, as long as the total stays within that of ``ranks``. A rank never exceeds its
    matrix's break-even rank, so a factorized matrix stays smaller than its dense form.

    Args:
        ranks: per matrix, its rank or ``None`` (stays dense; left alone).
        shapes: per matrix, ``(out_features, in_features, has_bias)``.
        multiple: the granularity, ``>= 1`` (1 changes nothing).

    Raises:
        ValueError: on ``multiple < 1`` or mismatched lengths.
    """
    if multiple < 1:
        raise ValueError(f"rank multiple {multiple} must be >= 1")
    if len(ranks) != len(shapes):
        raise ValueError(f"{len(ranks)} ranks for {len(shapes)} matrices")
    cost = [o + i for o, i, _ in shapes]
    spare = 0
    out: list[int | None] = []
    for r, c in zip(ranks, cost):
        if r is None or r < multiple:
            out.append(r)
            continue
        down = r - r % multiple
        spare += (r - down) * c
        out.append(down)
    # Round up where the most was lost first (ties: the cheaper matrix), while the budget allows.
    order = sorted(
        (k for k, r in enumerate(ranks) if r is not None and r >= multiple and r % multiple),
        key=lambda k: (-(ranks[k] % multiple) / multiple, cost[k]),  # type: ignore[operator]
    )
    for k in order:
        o, i, b = shapes[k]
        up = out[k] + multiple  # type: ignore[operator]
        even = (dense_parameters(o, i, b) - (o if b else 0) - 1) // cost[k]
        if up <= min(o, i, even) and multiple * cost[k] <= spare:
            spare -= multiple * cost[k]
            out[k] = up
    return out


def refit_left_factor(
    weight: torch.Tensor,
    right: torch.Tensor,
    covariance: torch.Tensor,
    cross: torch.Tensor,
    damping: float = 1e-4,
) -> torch.Tensor:
    """The left factor that best maps the inputs the compressed model sees to the dense outputs.

    With ``X`` the dense model's inputs to this layer and ``X~`` the inputs after the earlier
    layers were compressed (same tokens), minimises ``||W X^T - A B X~^T||_F`` over ``A`` for fixed
    ``B`` (SVD-LLM's parameter update; SAES-SVD's correction): ``A = W X^T X~ B^T (B X~^T X~ B^T)^{-1}``.
    Row weights do not change the minimiser (each output row is its own least-squares problem).

    Args:
        weight: ``[out, in]`` dense weight ``W``.
        right: ``[rank, in]`` factor ``B``.
        covariance: ``[in, in]`` ``X~^T X~`` (inputs the compressed layer sees).
        cross: ``[in, in]`` ``X^T X~`` (dense inputs against compressed inputs, token by token).
        damping: added to the diagonal of ``B X~^T X~ B^T`` as a fraction of its mean diagonal.

    Returns:
        ``A: [out, rank]`` in ``weight``'s dtype.

    Raises:
        ValueError: on mismatched shapes or non-finite input.
    """
    out_f, in_f = weight.shape
    if right.ndim != 2 or right.shape[1] != in_f:
        raise ValueError(f"right factor has shape {tuple(right.shape)}, expected (rank, {in_f})")
    for name, m in (("covariance", covariance), ("cross", cross)):
        if m.shape != (in_f, in_f):
            raise ValueError(f"{name} has shape {tuple(m.shape)}, expected ({in_f}, {in_f})")
        if not torch.isfinite(m).all():
            raise ValueError(f"{name} contains NaN or infinite values; recalibrate with finite inputs")
    # float64: the normal equations square the conditioning of B X~^T.
    w, b = weight.detach().double(), right.detach().double()
    gram = b @ covariance.double() @ b.T
    gram = (gram + gram.T) / 2
    scale = gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    gram = gram + damping * scale * torch.eye(len(gram), dtype=torch.float64)
    rhs = w @ cross.double() @ b.T  # [out, rank]
    left = torch.linalg.solve(gram, rhs.T).T
    return left.to(weight.dtype)


def refit_step(
    weight: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    right: torch.Tensor,
    covariance: torch.Tensor,
    cross: torch.Tensor,
    row_weight: torch.Tensor | None = None,
) -> float:
    """How far to move the left factor from ``start`` towards ``end``, judged on other tokens.

    Minimises ``||diag(r) (W X^T - (A0 + t (A1 - A0)) B X~^T)||_F^2`` over ``t`` in ``[0, 1]``,
    where the moments come from tokens the refit ``A1`` was *not* fitted to (held-out calibration
    text). The error is a parabola in ``t``, so the minimiser is closed-form; ``0`` means the refit
    does not carry over to new text and the original factor stays, ``1`` that it carries over fully.

    Args:
        weight: ``W [out, in]``; start, end: ``A0``, ``A1 [out, rank]``; right: ``B [rank, in]``.
        covariance: ``X~^T X~`` and cross: ``X^T X~`` of the held-out tokens (see
            :func:`refit_left_factor`).
        row_weight: ``[out]`` scales ``r`` (ones when ``None``).

    Returns:
        The step ``t`` in ``[0, 1]``.
    """
    w, b = weight.double(), right.double()
    r2 = torch.ones(w.shape[0], dtype=torch.float64) if row_weight is None else row_weight.double().square()
    p = start.double() @ b
    q = (end.double() - start.double()) @ b
    cov = covariance.double()
    qc = q @ cov
    curvature = float((r2 * (qc * q).sum(1)).sum())
    if not curvature > 0:
        return 0.0
    slope = float((r2 * (((w @ cross.double()) * q).sum(1) - ((p @ cov) * q).sum(1))).sum())
    return min(max(slope / curvature, 0.0), 1.0)


def output_error(
    weight: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    covariance: torch.Tensor,
    cross: torch.Tensor,
    dense_covariance: torch.Tensor,
    row_weight: torch.Tensor | None = None,
) -> float:
    """``||diag(r) (W X^T - A B X~^T)||_F^2`` from second moments (see :func:`refit_left_factor`).

    Args:
        weight, left, right: ``W [out, in]``, ``A [out, rank]``, ``B [rank, in]``.
        covariance: ``X~^T X~``; cross: ``X^T X~``; dense_covariance: ``X^T X``.
        row_weight: ``[out]`` scales ``r`` (ones when ``None``).
    """
    w, a, b = weight.double(), left.double(), right.double()
    r2 = torch.ones(w.shape[0], dtype=torch.float64) if row_weight is None else row_weight.double().square()
    ab = a @ b
    dense = ((w @ dense_covariance.double()) * w).sum(1)
    mixed = ((w @ cross.double()) * ab).sum(1)
    approx = ((ab @ covariance.double()) * ab).sum(1)
    return float((r2 * (dense - 2 * mixed + approx)).sum())


def allocate_budget(losses: Sequence[torch.Tensor], costs: Sequence[float], budget: float) -> list[int]:
    """Ranks per matrix that spend at most ``budget`` and keep the most estimated loss.

    Component ``k`` of matrix ``i`` costs ``costs[i]`` (e.g. the bytes of one more column of ``A``
    and row of ``B``) and is worth ``losses[i][k]``; components are taken greedily by worth per cost.
    A matrix's worth is non-increasing in ``k``, so each keeps a prefix and the greedy choice is a
    merge of the matrices' sorted lists. Unlike :func:`allocate_ranks` nothing turns dense: this
    budgets *additions* (a low-rank correction on top of a quantized weight), not replacements.

    Args:
        losses: per matrix, non-negative estimates in decreasing order.
        costs: per matrix, the positive cost of one component.
        budget: the total cost allowed (``>= 0``).

    Returns:
        The rank of each matrix (0: no component).

    Raises:
        ValueError: on mismatched lengths, a non-positive cost, a negative or non-finite budget or loss.
    """
    if len(losses) != len(costs):
        raise ValueError(f"{len(losses)} loss vectors for {len(costs)} costs")
    if not (math.isfinite(budget) and budget >= 0):
        raise ValueError(f"budget {budget} must be a finite non-negative number")
    if any(not (math.isfinite(c) and c > 0) for c in costs):
        raise ValueError("every component cost must be a positive finite number")
    if not losses:
        return []
    worth = torch.cat([l.detach().double().reshape(-1) / c for l, c in zip(losses, costs)])
    if not bool(torch.isfinite(worth).all()) or bool((worth < 0).any()):
        raise ValueError("losses must be finite and non-negative")
    owner = torch.cat([torch.full((l.numel(),), i, dtype=torch.long) for i, l in enumerate(losses)])
    price = torch.tensor(costs, dtype=torch.float64)[owner]
    # Stable sort by worth per cost, descending: within a matrix worth is non-increasing, so each
    # matrix's components come out in their own order (a prefix is always what is taken).
    order = torch.sort(-worth, stable=True).indices.tolist()
    owners, prices = owner.tolist(), price.tolist()
    ranks = [0] * len(losses)
    closed: set[int] = set()
    left = budget * (1 + 1e-12)
    for index in order:
        i = owners[index]
        if i in closed:
            continue
        if prices[index] > left:
            closed.add(i)  # a matrix keeps a prefix: none of its later components either
            continue
        left -= prices[index]
        ranks[i] += 1
    return ranks
