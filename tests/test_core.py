"""Tests for fwsvd.core: the pure math, on hand-made matrices whose right answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from fwsvd.core import (
    balance_factors,
    dense_parameters,
    factorized_parameters,
    floor_relative,
    reduce_importance,
    rank_for_kept_fraction,
    weighted_svd,
    whitened_decomposition,
    whitened_svd,
)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def positive(n: int, seed: int) -> torch.Tensor:
    """Positive weights spread over two orders of magnitude, so weighting really matters."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(2.5 * torch.rand(n, generator=g, dtype=torch.float64) - 1.0)


def weighted_error(w, a, b, row=None, col=None) -> float:
    """``|| diag(row) (W - A B) diag(col) ||_F`` in float64."""
    diff = (w.double() - a.double() @ b.double())
    if row is not None:
        diff = row.double()[:, None] * diff
    if col is not None:
        diff = diff * col.double()[None, :]
    return float(torch.linalg.matrix_norm(diff))


SHAPES = [(12, 8), (8, 12), (16, 16), (5, 30)]


# --- weighted_svd --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", ["none", "row", "col", "both"])
def test_full_rank_reproduces_weight(shape, weights):
    w = randn(*shape, seed=1)
    row = positive(shape[0], 2).float() if weights in ("row", "both") else None
    col = positive(shape[1], 3).float() if weights in ("col", "both") else None
    a, b = weighted_svd(w, min(shape), row_weight=row, col_weight=col)
    assert a.shape == (shape[0], min(shape)) and b.shape == (min(shape), shape[1])
    assert a.dtype == b.dtype == torch.float32
    # float32 SVD round-off: relative error 1e-4 of the matrix norm (observed ~1e-6).
    assert torch.linalg.matrix_norm(a @ b - w) <= 1e-4 * torch.linalg.matrix_norm(w)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_unit_weights_reproduce_plain_svd(rank):
    w = randn(10, 7, seed=4, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    ones_r, ones_c = torch.ones(10, dtype=torch.float64), torch.ones(7, dtype=torch.float64)
    for kw in ({}, {"row_weight": ones_r}, {"col_weight": ones_c}, {"row_weight": ones_r, "col_weight": ones_c}):
        a, b = weighted_svd(w, rank, **kw)
        # float64 throughout: the products agree to round-off (1e-10 absolute on O(1) entries).
        torch.testing.assert_close(a @ b, best, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_plain_svd_error_is_eckart_young(shape, rank):
    w = randn(*shape, seed=5, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    a, b = weighted_svd(w, rank)
    expected = float(s[rank:].square().sum())
    # Squared Frobenius error equals the discarded squared singular values (float64: rel 1e-9).
    assert torch.linalg.matrix_norm(w - a @ b).square().item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("side", ["row", "col", "both"])
@pytest.mark.parametrize("rank", [1, 2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_svd_beats_plain_svd_under_its_norm(side, rank, seed):
    """The closed form is the optimum of the weighted norm, so plain SVD can never do better."""
    w = randn(12, 9, seed=10 + seed, dtype=torch.float64)
    row = positive(12, 20 + seed) if side in ("row", "both") else None
    col = positive(9, 30 + seed) if side in ("col", "both") else None
    a_w, b_w = weighted_svd(w, rank, row_weight=row, col_weight=col)
    a_p, b_p = weighted_svd(w, rank)
    err_weighted = weighted_error(w, a_w, b_w, row, col)
    err_plain = weighted_error(w, a_p, b_p, row, col)
    # Optimum vs. a feasible point, float64: allow 1e-9 relative round-off only.
    assert err_weighted <= err_plain * (1 + 1e-9)
    # And it reaches the known optimum: the discarded singular values of the scaled matrix.
    scaled = w * (row[:, None] if row is not None else 1) * (col[None, :] if col is not None else 1)
    s = torch.linalg.svdvals(scaled)
    assert err_weighted**2 == pytest.approx(float(s[rank:].square().sum()), rel=1e-8)


def test_weighted_svd_keeps_dtype_and_rejects_bad_input():
    w = randn(6, 4, seed=1).to(torch.bfloat16)
    a, b = weighted_svd(w, 2)
    assert a.dtype == b.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="rank"):
        weighted_svd(randn(6, 4), 0)
    with pytest.raises(ValueError, match="rank"):
        weighted_svd(randn(6, 4), 5)
    with pytest.raises(ValueError, match="NaN"):
        weighted_svd(torch.full((3, 3), math.nan), 1)
    with pytest.raises(ValueError, match="row_weight"):
        weighted_svd(randn(6, 4), 2, row_weight=torch.zeros(6))
    with pytest.raises(ValueError, match="col_weight"):
        weighted_svd(randn(6, 4), 2, col_weight=torch.ones(5))


# --- floor_relative / reduce_importance ----------------------------------------------------------


def test_floor_relative_never_leaves_zero():
    v = torch.tensor([0.0, 0.0, 4.0, 8.0])
    out = floor_relative(v, fraction=1e-3)
    assert (out > 0).all()
    assert out[0] == pytest.approx(3.0 * 1e-3)  # floor = fraction * mean (mean 3.0)
    assert torch.equal(out[2:], v[2:])
    assert torch.equal(floor_relative(torch.zeros(5)), torch.ones(5))  # no information -> uniform
    with pytest.raises(ValueError):
        floor_relative(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError):
        floor_relative(torch.tensor([1.0, math.nan]))


@pytest.mark.parametrize("side", ["row", "col", "both"])
def test_zero_importance_gives_finite_factors(side):
    """Dead rows/columns (zero Fisher) go through floor_relative and never produce inf/NaN."""
    w = randn(10, 8, seed=3)
    fisher_out = positive(10, 1).float()
    fisher_out[[0, 4]] = 0.0
    fisher_in = positive(8, 2).float()
    fisher_in[3] = 0.0
    row = floor_relative(fisher_out).sqrt() if side in ("row", "both") else None
    col = floor_relative(fisher_in).sqrt() if side in ("col", "both") else None
    for rank in (1, 4, 8):
        a, b = weighted_svd(w, rank, row_weight=row, col_weight=col)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # At full rank the weighting is irrelevant: W comes back (float32, rel 1e-3 with a 1e-6 floor ratio).
    a, b = weighted_svd(w, 8, row_weight=row, col_weight=col)
    assert torch.linalg.matrix_norm(a @ b - w) <= 1e-3 * torch.linalg.matrix_norm(w)


def test_reduce_importance():
    f = torch.arange(6.0).view(2, 3)
    assert torch.equal(reduce_importance(f, "out"), torch.tensor([3.0, 12.0]))
    assert torch.equal(reduce_importance(f, "in"), torch.tensor([3.0, 5.0, 7.0]))
    with pytest.raises(ValueError):
        reduce_importance(f, "rows")


# --- balance_factors -----------------------------------------------------------------------------


def test_balance_factors_keeps_product_and_balances_norms():
    a = randn(7, 3, seed=1, dtype=torch.float64) * torch.tensor([100.0, 1.0, 0.01], dtype=torch.float64)
    b = randn(3, 5, seed=2, dtype=torch.float64)
    a2, b2 = balance_factors(a, b)
    torch.testing.assert_close(a2 @ b2, a @ b, rtol=1e-12, atol=1e-12)  # float64 round-off only
    torch.testing.assert_close(a2.norm(dim=0), b2.norm(dim=1), rtol=1e-12, atol=0)
    # A zero component stays zero and does not turn into NaN.
    a[:, 1] = 0
    a3, b3 = balance_factors(a, b)
    assert torch.isfinite(a3).all() and torch.isfinite(b3).all()
    torch.testing.assert_close(a3 @ b3, a @ b, rtol=1e-12, atol=1e-12)


# --- whitened_svd --------------------------------------------------------------------------------


def output_error(w, a, b, x) -> float:
    """``||(W - A B) X^T||_F``: the error on the calibration outputs."""
    return float(torch.linalg.matrix_norm((w.double() - a.double() @ b.double()) @ x.double().T))


@pytest.mark.parametrize("rank", [1, 2, 4, 6])
def test_whitened_svd_output_error_is_optimal(rank):
    w = randn(10, 8, seed=7, dtype=torch.float64)
    # Inputs with very unequal feature scales: whitening must matter.
    x = randn(50, 8, seed=8, dtype=torch.float64) * torch.logspace(-1, 1, 8, dtype=torch.float64)
    a, b = whitened_svd(w, rank, x.T @ x, damping=0.0)
    a_p, b_p = weighted_svd(w, rank)
    err = output_error(w, a, b, x)
    # With damping 0 and X of full column rank the discarded singular values of W S (S S^T = X^T X)
    # are exactly the output error; they are those of W X^T. float64: rel 1e-7.
    s = torch.linalg.svdvals(w @ x.T)
    assert err**2 == pytest.approx(float(s[rank:].square().sum()), rel=1e-7)
    assert err <= output_error(w, a_p, b_p, x) * (1 + 1e-9)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_row_weighted_whitened_svd_minimises_the_weighted_output_error(rank):
    w = randn(10, 8, seed=21, dtype=torch.float64)
    x = randn(40, 8, seed=22, dtype=torch.float64) * torch.logspace(-1, 1, 8, dtype=torch.float64)
    r = torch.logspace(-1, 1, 10, dtype=torch.float64)  # importance of each output feature
    a, b = whitened_svd(w, rank, x.T @ x, damping=0.0, row_weight=r)
    a_u, b_u = whitened_svd(w, rank, x.T @ x, damping=0.0)

    def weighted(a_, b_):
        return float(torch.linalg.matrix_norm(r[:, None] * ((w - a_ @ b_) @ x.T)))

    # Exactly the discarded singular values of diag(r) W X^T (float64: rel 1e-7) ...
    s = torch.linalg.svdvals(r[:, None] * (w @ x.T))
    assert weighted(a, b) ** 2 == pytest.approx(float(s[rank:].square().sum()), rel=1e-7)
    # ... so it beats the unweighted whitening on the weighted error (strictly, below full rank).
    assert weighted(a, b) < weighted(a_u, b_u) * (1 - 1e-6) or rank == 8
    with pytest.raises(ValueError, match="row_weight"):
        whitened_svd(w, rank, x.T @ x, row_weight=torch.zeros(10, dtype=torch.float64))


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_whitened_svd_with_default_damping_still_beats_plain_svd(rank):
    w = randn(10, 8, seed=11)
    x = randn(64, 8, seed=12) * torch.logspace(-1, 1, 8)
    a, b = whitened_svd(w, rank, (x.T @ x).double())
    a_p, b_p = weighted_svd(w, rank)
    # Damping 1e-2 moves the optimum a little; it must still beat task-blind SVD on outputs.
    assert output_error(w, a, b, x) <= output_error(w, a_p, b_p, x)
    assert a.dtype == b.dtype == torch.float32


def _rank_deficient_covariances() -> dict[str, torch.Tensor]:
    dup = randn(30, 8, seed=13, dtype=torch.float64)
    dup[:, 7] = dup[:, 6]  # duplicated input feature
    few = randn(3, 8, seed=14, dtype=torch.float64)  # fewer samples than features
    return {"duplicated": dup.T @ dup, "few_samples": few.T @ few, "all_zero": torch.zeros(8, 8, dtype=torch.float64)}


@pytest.mark.parametrize("case", ["duplicated", "few_samples", "all_zero"])
def test_whitened_svd_rank_deficient_covariance_is_finite(case):
    cov = _rank_deficient_covariances()[case]
    w = randn(6, 8, seed=15)
    for rank in (1, 3, 6):
        a, b = whitened_svd(w, rank, cov)  # default relative damping
        assert torch.isfinite(a).all() and torch.isfinite(b).all()


@pytest.mark.parametrize("case", ["duplicated", "few_samples"])
def test_whitened_svd_rank_deficient_covariance_is_finite_without_damping(case):
    """``damping=0`` is allowed; a singular covariance must still not divide by a zero eigenvalue."""
    cov = _rank_deficient_covariances()[case]
    w = randn(6, 8, seed=15)
    for rank in (1, 3, 6):
        a, b = whitened_svd(w, rank, cov, damping=0.0)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
    x = randn(3, 8, seed=14, dtype=torch.float64) if case == "few_samples" else None
    if x is not None:
        # Rank 3 covers every direction the 3 samples visit: the output error is ~0 (rel 1e-6).
        a, b = whitened_svd(w.double(), 3, cov, damping=0.0)
        assert output_error(w, a, b, x) <= 1e-6 * float(torch.linalg.matrix_norm(w.double() @ x.T))


def test_whitened_decomposition_falls_back_on_an_indefinite_covariance():
    """A covariance that round-off made indefinite (beyond the floor) cannot be Cholesky-factored:
    the eigendecomposition path clamps it and gives the same truncation as the clamped matrix."""
    x = randn(3, 8, seed=14, dtype=torch.float64)
    cov = x.T @ x
    evals, evecs = torch.linalg.eigh(cov)
    indefinite = evecs @ torch.diag(torch.where(evals < 1e-9, torch.full_like(evals, -1e-6), evals)) @ evecs.T
    assert int(torch.linalg.cholesky_ex(indefinite)[1]) != 0
    w = randn(6, 8, seed=15, dtype=torch.float64)
    fallback = whitened_decomposition(w, indefinite, damping=0.0)
    direct = whitened_decomposition(w, cov, damping=0.0)  # positive semi-definite: Cholesky
    assert torch.isfinite(fallback.left).all() and torch.isfinite(fallback.right).all()
    torch.testing.assert_close(fallback.values, direct.values, rtol=1e-6, atol=1e-8)
    for rank in (1, 3):
        a_f, b_f = fallback.truncate(rank)
        a_d, b_d = direct.truncate(rank)
        torch.testing.assert_close(a_f @ b_f, a_d @ b_d, rtol=1e-6, atol=1e-8)


def test_whitened_svd_rejects_bad_input():
    w = randn(6, 8, seed=1)
    with pytest.raises(ValueError, match="covariance"):
        whitened_svd(w, 2, torch.eye(6))
    with pytest.raises(ValueError, match="damping"):
        whitened_svd(w, 2, torch.eye(8), damping=-0.1)
    with pytest.raises(ValueError, match="NaN"):
        whitened_svd(w, 2, torch.full((8, 8), math.nan))
    with pytest.raises(ValueError, match="rank"):
        whitened_svd(w, 7, torch.eye(8))


# --- rank budgets --------------------------------------------------------------------------------

GRID_SHAPES = [(8, 8), (16, 64), (64, 16), (100, 37), (3, 200), (768, 768), (768, 3072), (4096, 11008)]
GRID_KEEPS = [0.01, 0.05, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0]


@pytest.mark.parametrize("bias", [False, True])
def test_rank_for_kept_fraction_grid(bias):
    for out_f, in_f in GRID_SHAPES:
        dense = dense_parameters(out_f, in_f, bias)
        per_rank = out_f + in_f
        for keep in GRID_KEEPS:
            target = keep * dense
            rank = rank_for_kept_fraction(out_f, in_f, keep, bias=bias)
            where = f"{out_f}x{in_f} keep={keep} bias={bias}"
            if rank is None:
                # Stays dense only when factorizing saves nothing: the target is within half a
                # rank of the dense count, or even rank 1 would not be smaller.
                assert dense - target <= per_rank / 2 or factorized_parameters(out_f, in_f, 1, bias) >= dense, where
                continue
            assert 1 <= rank < min(out_f, in_f), where
            kept = factorized_parameters(out_f, in_f, rank, bias)
            assert kept < dense, where
            if rank > 1:
                # Rounded to the nearest rank: within half a rank's worth (out + in) of the target.
                assert abs(kept - target) <= per_rank / 2 + 1e-9, where
            else:
                assert kept >= target or abs(kept - target) <= per_rank / 2 + 1e-9, where  # floor at rank 1


@pytest.mark.parametrize("shape", [(8, 8), (32, 32), (768, 768)])
def test_rank_for_kept_fraction_keep_one_stays_dense_when_nothing_is_saved(shape):
    assert rank_for_kept_fraction(*shape, 1.0) is None
    assert rank_for_kept_fraction(*shape, 1.0, bias=True) is None


@pytest.mark.parametrize("shape", [(33, 33), (64, 32), (768, 3072)])
def test_rank_for_kept_fraction_keep_one_removes_nothing(shape):
    """SRC BUG: ``keep=1.0`` is documented as "nothing removed", yet many layers get a lossy rank
    because nearest rounding lands just under the dense count: 33x33 -> rank 16 of 33, 768x3072 ->
    rank 614 of 768 (saving 0.07 % of its parameters), BERT's 64x32 FFN with bias -> rank 21 of 32."""
    assert rank_for_kept_fraction(*shape, 1.0) is None
    assert rank_for_kept_fraction(*shape, 1.0, bias=True) is None


def test_rank_for_kept_fraction_known_values():
    # 768x768, keep 0.5: 0.5 * 589824 / 1536 = 192 exactly.
    assert rank_for_kept_fraction(768, 768, 0.5) == 192
    # Half the break-even rank is 8 for a 32x32 layer; 0.99 of it cannot be reached by factors.
    assert rank_for_kept_fraction(32, 32, 0.25) == 4
    assert rank_for_kept_fraction(32, 32, 0.99) is None
    # A 1xN layer never gains from factors.
    assert rank_for_kept_fraction(1, 100, 0.5) is None


@pytest.mark.parametrize("keep", [0, 0.0, 1.5, math.nan, -0.1, math.inf, "0.5", None])
def test_rank_for_kept_fraction_rejects_bad_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        rank_for_kept_fraction(32, 32, keep)


def test_parameter_counts():
    assert dense_parameters(3, 5, bias=False) == 15
    assert dense_parameters(3, 5, bias=True) == 18
    assert factorized_parameters(3, 5, 2, bias=False) == 16
    assert factorized_parameters(3, 5, 2, bias=True) == 19


# --- decompositions and rank allocation -----------------------------------------------------------


def test_decomposition_truncates_to_the_same_factors_and_its_values_price_the_error():
    from fwsvd.core import weighted_decomposition, whitened_decomposition

    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 8, generator=g)
    x = torch.randn(40, 8, generator=g)
    row = torch.rand(12, generator=g) + 0.1
    dec = whitened_decomposition(w, x.T @ x, damping=0.0, row_weight=row)
    for rank in (1, 4, 8):
        a, b = dec.truncate(rank)
        a2, b2 = whitened_svd(w, rank, x.T @ x, damping=0.0, row_weight=row)
        torch.testing.assert_close(a @ b, a2 @ b2, rtol=1e-5, atol=1e-5)
        # The discarded values are exactly the row-weighted output error on the data (float32: rel 1e-3).
        err = (row[:, None] * ((w - a @ b) @ x.T)).square().sum()
        assert err.item() == pytest.approx(dec.values[rank:].square().sum().item(), rel=1e-3, abs=1e-4)
    plain = weighted_decomposition(w)
    torch.testing.assert_close(plain.values, torch.linalg.svdvals(w))
    with pytest.raises(ValueError, match="rank 9"):
        plain.truncate(9)


def _shapes_and_losses(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(48, 32, False), (32, 32, True), (64, 16, False), (16, 16, False)]
    losses = [torch.sort(torch.rand(min(o, i), generator=g) * 10 ** float(torch.randn(1, generator=g)), descending=True).values for o, i, _ in shapes]
    return shapes, losses


def _kept(shapes, ranks):
    return sum(dense_parameters(o, i, b) if r is None else factorized_parameters(o, i, r, b) for (o, i, b), r in zip(shapes, ranks))


@pytest.mark.parametrize("keep", [0.2, 0.4, 0.6, 0.8, 0.95])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocate_ranks_respects_budget_and_floor(keep, seed):
    from fwsvd.core import allocate_ranks

    shapes, losses = _shapes_and_losses(seed)
    ranks = allocate_ranks(losses, shapes, keep, floor=0.25)
    total = sum(dense_parameters(o, i, b) for o, i, b in shapes)
    kept = _kept(shapes, ranks)
    # Never above the budget, and within one component of the widest matrix below it.
    assert kept <= keep * total + 1e-9
    assert keep * total - kept <= max(o + i for o, i, _ in shapes) + max(o for o, _, _ in shapes)
    for (o, i, b), r in zip(shapes, ranks):
        if r is not None:
            uniform = rank_for_kept_fraction(o, i, keep, bias=b)
            assert r >= max(1, math.ceil(0.25 * (uniform or 1)))
            assert factorized_parameters(o, i, r, b) < dense_parameters(o, i, b)


def test_allocate_ranks_follows_the_loss():
    from fwsvd.core import allocate_ranks

    shapes = [(32, 32, False), (32, 32, False)]
    # Matrix 0's components are worth 100x matrix 1's: it gets the budget, matrix 1 its floor.
    losses = [torch.linspace(100, 1, 32), torch.linspace(1, 0.01, 32)]
    ranks = allocate_ranks(losses, shapes, 0.5, floor=0.25)
    uniform = rank_for_kept_fraction(32, 32, 0.5)
    assert ranks[1] == math.ceil(0.25 * uniform)
    assert ranks[0] is None or ranks[0] > uniform
    # Equal worth everywhere gives (nearly) uniform ranks.
    even = allocate_ranks([torch.ones(32), torch.ones(32)], shapes, 0.5, floor=0.0)
    assert abs(even[0] - even[1]) <= 1


def test_allocate_ranks_turns_a_matrix_dense_when_it_pays():
    from fwsvd.core import allocate_ranks

    # A narrow matrix (like GQA's k/v) whose every component matters stays dense.
    shapes = [(8, 64, False), (64, 64, False)]
    losses = [torch.full((8,), 1e6), torch.linspace(1.0, 0.001, 64)]
    ranks = allocate_ranks(losses, shapes, 0.6, floor=0.25)
    assert ranks[0] is None
    assert ranks[1] is not None
    total = sum(dense_parameters(o, i, b) for o, i, b in shapes)
    assert _kept(shapes, ranks) <= 0.6 * total


@pytest.mark.parametrize("keep", [0.4, 0.7, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_allocate_ranks_dense_above_keeps_slow_ranks_dense_within_budget(keep, seed):
    from fwsvd.core import allocate_ranks

    shapes, losses = _shapes_and_losses(seed)
    total = sum(dense_parameters(o, i, b) for o, i, b in shapes)
    free = allocate_ranks(losses, shapes, keep, floor=0.25)
    ruled = allocate_ranks(losses, shapes, keep, floor=0.25, dense_above=0.7)
    # No factorized matrix above 0.7 of its break-even rank; the budget is never exceeded.
    for (o, i, _), r in zip(shapes, ruled):
        assert r is None or r <= 0.7 * o * i / (o + i)
    kept = _kept(shapes, ruled)
    assert kept <= keep * total + 1e-9
    # Below it by less than what turning one more matrix dense would cost (its last 30 %).
    assert keep * total - kept <= max(0.3 * o * i + o + i for o, i, _ in shapes)
    # Where the budget leaves room (keep below 0.7), a matrix the free allocation put between 0.7
    # and 1 of break-even now stays dense.
    between = [k for k, ((o, i, _), r) in enumerate(zip(shapes, free)) if r is not None and r > 0.7 * o * i / (o + i)]
    if between and keep < 0.7:
        assert all(ruled[k] is None for k in between)
    assert allocate_ranks(losses, shapes, keep, floor=0.25, dense_above=1.0) == free


def test_allocate_ranks_dense_above_moves_rank_from_a_near_break_even_matrix():
    from fwsvd.core import allocate_ranks

    # Matrix 0's first 28 components matter (break-even rank 32): without the rule it takes rank
    # 28; with it it stays dense and matrix 1 gives up rank for it.
    shapes = [(64, 64, False), (64, 64, False)]
    losses = [torch.cat([torch.full((28,), 1000.0), torch.full((36,), 1e-4)]), torch.linspace(1.0, 0.5, 64)]
    free = allocate_ranks(losses, shapes, 0.6, floor=0.1)
    ruled = allocate_ranks(losses, shapes, 0.6, floor=0.1, dense_above=0.8)
    assert free[0] is not None and free[0] > 0.8 * 32
    assert ruled[0] is None and ruled[1] < free[1]
    with pytest.raises(ValueError, match="dense_above"):
        allocate_ranks(losses, shapes, 0.6, dense_above=0.0)


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocate_ranks_dense_by_loss_respects_budget_and_floor(keep, seed):
    from fwsvd.core import allocate_ranks

    shapes, losses = _shapes_and_losses(seed)
    ranks = allocate_ranks(losses, shapes, keep, floor=0.25, dense_choice="loss")
    total = sum(dense_parameters(o, i, b) for o, i, b in shapes)
    kept = _kept(shapes, ranks)
    assert kept <= keep * total + 1e-9
    # Below the budget by less than one matrix turning dense (the price's last step) plus a component.
    assert keep * total - kept <= max(dense_parameters(o, i, b) for o, i, b in shapes) + max(o + i for o, i, _ in shapes)
    for (o, i, b), r in zip(shapes, ranks):
        if r is not None:
            assert r >= max(1, math.ceil(0.25 * (rank_for_kept_fraction(o, i, keep, bias=b) or 1)))
            assert factorized_parameters(o, i, r, b) < dense_parameters(o, i, b)


def _estimated_loss(losses, ranks):
    return sum(0.0 if r is None else float(v[r:].sum()) for v, r in zip(losses, ranks))


def test_allocate_ranks_dense_by_loss_keeps_a_flat_spectrum_dense():
    from fwsvd.core import allocate_ranks

    # Matrix 0's 64 components are worth 1 each (flat); matrix 1's first 10 are worth 2, the rest
    # almost nothing. Per component matrix 1 comes first, so the default takes its 10 and cuts
    # matrix 0 to rank 25 (estimated loss 39); kept dense, matrix 0 loses nothing and matrix 1 at
    # rank 3 loses 14.
    shapes = [(64, 64, False), (64, 64, False)]
    losses = [torch.ones(64), torch.cat([torch.full((10,), 2.0), torch.full((54,), 1e-3)])]
    default = allocate_ranks(losses, shapes, 0.55, floor=0.0)
    priced = allocate_ranks(losses, shapes, 0.55, floor=0.0, dense_choice="loss")
    assert default == [25, 10]
    assert priced == [None, 3]
    assert _estimated_loss(losses, priced) < _estimated_loss(losses, default)
    total = sum(dense_parameters(o, i, b) for o, i, b in shapes)
    assert _kept(shapes, priced) <= 0.55 * total


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_allocate_ranks_dense_by_loss_never_loses_more_than_break_even(seed):
    from fwsvd.core import allocate_ranks

    # The price weighs staying dense at every rank, so where both fit the same budget it never
    # ends with a larger estimated loss than the default (up to the last components' rounding).
    shapes, losses = _shapes_and_losses(seed)
    for keep in (0.3, 0.6, 0.85):
        default = allocate_ranks(losses, shapes, keep, floor=0.25)
        priced = allocate_ranks(losses, shapes, keep, floor=0.25, dense_choice="loss")
        slack = max(float(v.max()) for v in losses)
        assert _estimated_loss(losses, priced) <= _estimated_loss(losses, default) + slack


def test_allocate_ranks_rejects_bad_input():
    from fwsvd.core import allocate_ranks

    with pytest.raises(ValueError, match="keep"):
        allocate_ranks([torch.ones(4)], [(4, 4, False)], 0.0)
    with pytest.raises(ValueError, match="floor"):
        allocate_ranks([torch.ones(4)], [(4, 4, False)], 0.5, floor=2)
    with pytest.raises(ValueError, match="shape"):
        allocate_ranks([torch.ones(3)], [(4, 4, False)], 0.5)
    assert allocate_ranks([torch.ones(4)], [(4, 4, False)], 1.0) == [None]
    with pytest.raises(ValueError, match="dense_choice"):
        allocate_ranks([torch.ones(4)], [(4, 4, False)], 0.5, dense_choice="always")


def test_refit_left_factor_is_the_least_squares_optimum_and_error_is_exact():
    from fwsvd.core import output_error, refit_left_factor

    g = torch.Generator().manual_seed(5)
    w = torch.randn(10, 6, generator=g, dtype=torch.float64)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)  # dense inputs
    xt = x + 0.3 * torch.randn(50, 6, generator=g, dtype=torch.float64)  # inputs after upstream compression
    a0, b = weighted_svd(w, 3)
    row = torch.rand(10, generator=g, dtype=torch.float64) + 0.5
    cov, cross, dense = xt.T @ xt, x.T @ xt, x.T @ x
    a1 = refit_left_factor(w, b, cov, cross, damping=0.0)
    # The same least-squares problem solved directly.
    expected = torch.linalg.lstsq(xt @ b.T, x @ w.T).solution.T
    torch.testing.assert_close(a1, expected, rtol=1e-8, atol=1e-8)
    for a in (a0, a1):
        direct = (row[:, None] * (w @ x.T - a @ b @ xt.T)).square().sum().item()
        assert output_error(w, a, b, cov, cross, dense, row) == pytest.approx(direct, rel=1e-9)
    # The refit never raises the error, whatever the row weights.
    assert output_error(w, a1, b, cov, cross, dense, row) <= output_error(w, a0, b, cov, cross, dense, row) + 1e-9
    with pytest.raises(ValueError, match="cross"):
        refit_left_factor(w, b, cov, torch.ones(5, 5))


def test_refit_step_minimises_the_held_out_error_along_the_segment():
    from fwsvd.core import output_error, refit_left_factor, refit_step

    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    b = torch.randn(2, 5, generator=g, dtype=torch.float64)
    a0, a1 = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    xt = x + 0.1 * torch.randn(40, 5, generator=g, dtype=torch.float64)
    cov, cross, dense = xt.T @ xt, x.T @ xt, x.T @ x
    row = torch.rand(6, generator=g, dtype=torch.float64) + 0.5

    def error(t: float) -> float:
        return output_error(w, a0 + t * (a1 - a0), b, cov, cross, dense, row)

    t = refit_step(w, a0, a1, b, cov, cross, row)
    assert 0.0 <= t <= 1.0
    assert error(t) <= min(error(k / 200) for k in range(201)) + 1e-9
    # The exact least-squares refit of these very tokens is reached in one full step, and never left.
    best = refit_left_factor(w, b, cov, cross, damping=0.0)
    assert refit_step(w, a0, best, b, cov, cross) == pytest.approx(1.0, abs=1e-9)
    assert refit_step(w, best, a0, b, cov, cross) == pytest.approx(0.0, abs=1e-9)
    assert refit_step(w, a0, a0, b, cov, cross) == 0.0  # nowhere to go


# --- shared basis (one right factor for a group reading the same input) ---------------------------


def _group(seed: int, outs=(6, 3, 3), in_f: int = 8):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o, in_f, generator=g, dtype=torch.float64) for o in outs]
    # Inputs with unequal feature scales, so that whitening matters.
    x = torch.randn(60, in_f, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, in_f, dtype=torch.float64)
    rows = [torch.exp(2 * torch.rand(o, generator=g, dtype=torch.float64) - 1) for o in outs]
    return weights, x, rows


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("outs", [(6, 3, 3), (10, 10), (2, 1, 1)])
def test_shared_basis_full_rank_reproduces_every_member(whiten, outs):
    from fwsvd.core import shared_basis_svd

    weights, x, rows = _group(1, outs)
    full = min(sum(outs), 8)
    lefts, right = shared_basis_svd(weights, full, x.T @ x if whiten else None, row_weights=rows)
    assert right.shape == (full, 8) and [a.shape for a in lefts] == [(o, full) for o in outs]
    for w, a in zip(weights, lefts):
        # float64 round-off: 1e-10 of the matrix norm.
        assert torch.linalg.matrix_norm(a @ right - w) <= 1e-10 * torch.linalg.matrix_norm(w)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_shared_basis_of_one_member_is_the_single_matrix_decomposition(rank):
    from fwsvd.core import shared_basis_svd

    (w,), x, (r,) = _group(2, outs=(10,))
    w, x, r = w.float(), x.float(), r.float()
    (a, ), b = shared_basis_svd([w], rank, x.T @ x, damping=0.01, row_weights=[r])
    a2, b2 = whitened_svd(w, rank, x.T @ x, damping=0.01, row_weight=r)
    assert a.dtype == b.dtype == torch.float32
    # The same code path: identical factors.
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    torch.testing.assert_close(b, b2, rtol=0, atol=0)
    (a, ), b = shared_basis_svd([w], rank, row_weights=[r])
    a2, b2 = weighted_svd(w, rank, row_weight=r)
    torch.testing.assert_close(a @ b, a2 @ b2, rtol=0, atol=0)


@pytest.mark.parametrize("rank", [1, 4, 7])
@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_shared_basis_error_is_the_eckart_young_optimum_of_the_stacked_matrix(rank, damping):
    from fwsvd.core import EIGENVALUE_FLOOR, shared_basis_decomposition, shared_basis_svd

    weights, x, rows = _group(3)
    cov = x.T @ x
    lefts, right = shared_basis_svd(weights, rank, cov, damping=damping, row_weights=rows)
    # The error the basis is chosen for: sum_i ||diag(r_i) (W_i - A_i B) S||^2 with S S^T the damped
    # covariance, i.e. tr(diag(r_i^2) E_i C E_i^T), computed here without any square root.
    # (damping plus the eigenvalue floor, as whitened_decomposition applies them)
    damped = cov + (damping + EIGENVALUE_FLOOR) * cov.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    err = sum(float((r[:, None] ** 2 * ((w - a @ right) @ damped) * (w - a @ right)).sum()) for w, a, r in zip(weights, lefts, rows))
    # Eckart–Young on diag(r) [W_0; W_1; W_2] C^{1/2} (a symmetric square root, from eigh).
    e, q = torch.linalg.eigh(damped)
    root = q @ torch.diag(e.clamp_min(0).sqrt()) @ q.T
    s = torch.linalg.svdvals(torch.cat(rows)[:, None] * torch.cat(weights) @ root)
    # float64 throughout: rel 1e-8.
    assert err == pytest.approx(float(s[rank:].square().sum()), rel=1e-8)
    dec = shared_basis_decomposition(weights, cov, damping=damping, row_weights=rows)
    torch.testing.assert_close(dec.values, s, rtol=1e-8, atol=1e-8)
    # Separate factors with the same rank each can only do better (more parameters), member by member.
    for w, a, r in zip(weights, lefts, rows):
        a1, b1 = whitened_svd(w, min(rank, w.shape[0]), cov, damping=damping, row_weight=r)
        mine = float((r[:, None] ** 2 * ((w - a @ right) @ damped) * (w - a @ right)).sum())
        alone = float((r[:, None] ** 2 * ((w - a1 @ b1) @ damped) * (w - a1 @ b1)).sum())
        assert alone <= mine * (1 + 1e-9) + 1e-12


def test_shared_basis_recovers_members_that_truly_share_one():
    from fwsvd.core import shared_basis_svd

    g = torch.Generator().manual_seed(4)
    basis = torch.randn(3, 10, generator=g, dtype=torch.float64)
    weights = [torch.randn(o, 3, generator=g, dtype=torch.float64) @ basis for o in (7, 4, 4)]
    lefts, right = shared_basis_svd(weights, 3)
    # 15 x 10 of rank 3: three components reproduce every member (float64: 1e-10 relative).
    for w, a in zip(weights, lefts):
        assert torch.linalg.matrix_norm(a @ right - w) <= 1e-10 * torch.linalg.matrix_norm(w)


def test_shared_basis_rejects_bad_input():
    from fwsvd.core import shared_basis_svd

    weights, x, rows = _group(5)
    with pytest.raises(ValueError, match="input width"):
        shared_basis_svd([weights[0], weights[1][:, :5]], 2)
    with pytest.raises(ValueError, match="dtypes"):
        shared_basis_svd([weights[0], weights[1].float()], 2)
    with pytest.raises(ValueError, match="rank 9"):
        shared_basis_svd(weights, 9)
    with pytest.raises(ValueError, match="2 row weights for 3"):
        shared_basis_svd(weights, 2, row_weights=rows[:2])
    with pytest.raises(ValueError, match=r"row_weights\[1\]"):
        shared_basis_svd(weights, 2, row_weights=[rows[0], torch.zeros(3, dtype=torch.float64), rows[2]])
    with pytest.raises(ValueError, match="at least one"):
        shared_basis_svd([], 1)
