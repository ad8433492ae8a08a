"""tam_jax.alignment against brute-force path enumeration, gradient checks and stress inputs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tam_jax import alignment
from tests.helpers import lowered_programs

LAMS = (0.0, 0.01, 0.1, 1.0)
SIZES = list(itertools.product(range(1, 6), range(1, 6)))


def enumerate_paths(rows, cols, vertical_columns):
    """Every monotone path from (0, 0) to (rows-1, cols-1) with steps right, down-right, and down
    (down only inside `vertical_columns`), as lists of cells."""
    paths = []

    def extend(path):
        i, j = path[-1]
        if (i, j) == (rows - 1, cols - 1):
            paths.append(list(path))
            return
        steps = [(i, j + 1), (i + 1, j + 1)]
        if j in vertical_columns:
            steps.append((i + 1, j))
        for ni, nj in steps:
            if ni < rows and nj < cols:
                extend(path + [(ni, nj)])

    extend([(0, 0)])
    return paths


def score_over_paths(cost, paths, lam):
    """Hard: min over paths of the summed cost; soft: -lam * log(sum over paths of exp(-cost / lam))."""
    totals = np.array([sum(cost[i, j] for i, j in path) for path in paths], np.float64)
    if lam == 0:
        return totals.min()
    smallest = totals.min()
    return smallest - lam * np.log(np.sum(np.exp(-(totals - smallest) / lam)))


def brute_tam(dist, lam):
    rows, cols = dist.shape
    padded = np.pad(dist, ((0, 0), (1, 1)))
    return score_over_paths(padded, enumerate_paths(rows, cols + 2, {0, cols + 1}), lam)


def brute_plain_dtw(dist, lam):
    rows, cols = dist.shape
    return score_over_paths(dist, enumerate_paths(rows, cols, set(range(cols))), lam)


@pytest.mark.parametrize("lam", LAMS)
def test_tam_equals_enumeration_of_admissible_paths(lam):
    rng = np.random.default_rng(0)
    for tq, ts in SIZES:
        dist = rng.uniform(0, 2, size=(tq, ts))
        expected = brute_tam(dist, lam)
        got = alignment.tam_distance(jnp.asarray(dist, jnp.float32), lam=lam)
        np.testing.assert_allclose(float(got), expected, rtol=1e-5, atol=1e-5, err_msg=f"{tq}x{ts}")


@pytest.mark.parametrize("lam", LAMS)
def test_plain_dtw_equals_enumeration_of_admissible_paths(lam):
    rng = np.random.default_rng(1)
    for tq, ts in SIZES:
        dist = rng.uniform(0, 2, size=(tq, ts))
        expected = brute_plain_dtw(dist, lam)
        got = alignment.plain_dtw_distance(jnp.asarray(dist, jnp.float32), lam=lam)
        np.testing.assert_allclose(float(got), expected, rtol=1e-5, atol=1e-5, err_msg=f"{tq}x{ts}")


def test_every_tam_path_sums_one_entry_of_each_support_column():
    for tq, ts in SIZES:
        for path in enumerate_paths(tq, ts + 2, {0, ts + 1}):
            inner_columns = [j for _, j in path if 1 <= j <= ts]
            assert sorted(inner_columns) == list(range(1, ts + 1))


def test_tam_is_order_sensitive_where_mean_is_not():
    rng = np.random.default_rng(2)
    frames = rng.normal(size=(6, 16)).astype(np.float32)
    reversed_frames = frames[::-1]
    same = alignment.cosine_distance(frames, frames)
    flipped = alignment.cosine_distance(frames, reversed_frames)
    assert float(alignment.tam_distance(same, lam=0)) == pytest.approx(0.0, abs=1e-5)
    assert float(alignment.tam_distance(flipped, lam=0)) > 0.5
    np.testing.assert_allclose(
        alignment.mean_distance(same), alignment.mean_distance(flipped), rtol=1e-5
    )


def test_bidirectional_adds_the_transposed_alignment():
    dist = jnp.asarray(np.random.default_rng(3).uniform(0, 2, size=(4, 5, 3)), jnp.float32)
    both = alignment.tam_distance(dist, lam=0.1, bidirectional=True)
    forward = alignment.tam_distance(dist, lam=0.1)
    backward = alignment.tam_distance(jnp.swapaxes(dist, -1, -2), lam=0.1)
    np.testing.assert_allclose(both, forward + backward, rtol=1e-6)
    assert not np.allclose(forward, backward)


def test_baseline_scorers():
    dist = np.random.default_rng(4).uniform(0, 2, size=(2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(
        alignment.diagonal_distance(dist), np.trace(dist, axis1=-2, axis2=-1) / 4, rtol=1e-6
    )
    np.testing.assert_allclose(alignment.mean_distance(dist), dist.mean(axis=(-2, -1)), rtol=1e-6)
    np.testing.assert_allclose(alignment.min_distance(dist), dist.min(axis=(-2, -1)), rtol=1e-6)


def test_diagonal_needs_equal_lengths():
    with pytest.raises(ValueError, match="Tq == Ts"):
        alignment.diagonal_distance(jnp.zeros((3, 4)))


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="tam, plain_dtw, diagonal, mean, min"):
        alignment.alignment_distance(jnp.zeros((3, 3)), "otam")


def test_negative_lam_is_rejected():
    with pytest.raises(ValueError, match="lam"):
        alignment.tam_distance(jnp.zeros((3, 3)), lam=-0.1)


@pytest.mark.parametrize("scorer", alignment.SCORERS)
def test_dispatch_matches_direct_call_with_any_batch_axes(scorer):
    dist = jnp.asarray(np.random.default_rng(5).uniform(0, 2, size=(2, 3, 5, 5)), jnp.float32)
    got = alignment.alignment_distance(dist, scorer, lam=0.1)
    assert got.shape == (2, 3)
    for a, b in itertools.product(range(2), range(3)):
        single = alignment.alignment_distance(dist[a, b], scorer, lam=0.1)
        np.testing.assert_allclose(got[a, b], single, rtol=1e-6)


def test_cosine_distance_matches_numpy_and_handles_zero_vectors():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 5, 8)).astype(np.float32)
    y = rng.normal(size=(3, 4, 8)).astype(np.float32)
    xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=-1, keepdims=True)
    np.testing.assert_allclose(
        alignment.cosine_distance(x, y), 1 - np.einsum("bld,bmd->blm", xn, yn), atol=1e-5
    )
    x[0, 1] = 0.0
    value, grad = jax.value_and_grad(lambda a: alignment.cosine_distance(a, y).sum())(x)
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(alignment.cosine_distance(x, y)[0, 1], 1.0, atol=1e-6)


@pytest.mark.parametrize("scorer", ["tam", "plain_dtw"])
def test_gradients_match_finite_differences(scorer):
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        dist = jnp.asarray(rng.uniform(0, 2, size=(2, 4, 5)), jnp.float64)
        fn = lambda d: alignment.alignment_distance(d, scorer, lam=0.1)
        # The soft scores have an analytic backward pass (a custom VJP), so reverse mode only.
        check_grads(fn, (dist,), order=2, modes=("rev",))


@pytest.mark.parametrize("scorer", ["tam", "plain_dtw"])
def test_analytic_backward_matches_autodiff_of_the_scan(scorer):
    dist = jnp.asarray(np.random.default_rng(17).uniform(0, 2, size=(3, 6, 7)), jnp.float32)
    # A traced lam takes the autodiff path; a known one (Python float) the analytic backward recursion.
    analytic = jax.grad(lambda d: alignment.alignment_distance(d, scorer, 0.1).sum())(dist)
    autodiff = jax.jit(jax.grad(
        lambda d, lam: alignment.alignment_distance(d, scorer, lam).sum()
    ))(dist, jnp.float32(0.1))
    np.testing.assert_allclose(analytic, autodiff, rtol=1e-5, atol=1e-6)


def test_cosine_and_pairwise_gradients_match_finite_differences():
    rng = np.random.default_rng(8)
    with jax.enable_x64(True):
        query = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float64)
        support = jnp.asarray(rng.normal(size=(3, 5, 6)), jnp.float64)
        check_grads(
            lambda q, s: alignment.pairwise_distance(q, s, "tam", 0.1), (query, support),
            order=1, modes=("rev",),
        )


def test_soft_alignment_columns_sum_to_one_for_tam():
    dist = jnp.asarray(np.random.default_rng(9).uniform(0, 2, size=(3, 6, 8)), jnp.float32)
    soft = alignment.soft_alignment(dist, "tam", lam=0.1)
    assert soft.shape == dist.shape
    np.testing.assert_allclose(soft.sum(axis=-2), 1.0, atol=1e-5)
    assert np.all(soft >= 0)


def test_alignment_path_is_the_optimal_path():
    rng = np.random.default_rng(10)
    for tq, ts in [(4, 4), (3, 5), (5, 3)]:
        dist = rng.uniform(0, 2, size=(tq, ts))
        path = np.asarray(alignment.alignment_path(jnp.asarray(dist, jnp.float32), "tam"))
        assert set(np.unique(path)) <= {0.0, 1.0}
        np.testing.assert_array_equal(path.sum(axis=0), 1.0)
        np.testing.assert_allclose((path * dist).sum(), brute_tam(dist, 0), rtol=1e-5)
        dtw_path = np.asarray(alignment.alignment_path(jnp.asarray(dist, jnp.float32), "plain_dtw"))
        assert dtw_path[0, 0] == 1 and dtw_path[-1, -1] == 1
        np.testing.assert_allclose((dtw_path * dist).sum(), brute_plain_dtw(dist, 0), rtol=1e-5)


@pytest.mark.parametrize("lam", [1e-3, 0.1, 1.0])
@pytest.mark.parametrize("scorer", ["tam", "plain_dtw"])
def test_stable_for_small_lam_large_entries_and_long_sequences(scorer, lam):
    rng = np.random.default_rng(11)
    for dist in (
        rng.uniform(0, 1e3, size=(2, 16, 16)),
        rng.uniform(0, 2, size=(1, 512, 512)),
    ):
        value, grad = jax.value_and_grad(
            lambda d: alignment.alignment_distance(d, scorer, lam=lam).sum()
        )(jnp.asarray(dist, jnp.float32))
        assert np.isfinite(value)
        assert np.all(np.isfinite(grad))


def test_zero_feature_vectors_give_finite_values_and_gradients():
    query = jnp.zeros((2, 8, 16))
    support = jnp.asarray(np.random.default_rng(12).normal(size=(3, 8, 16)), jnp.float32)
    for scorer in alignment.SCORERS:
        value, grads = jax.value_and_grad(
            lambda q, s, m=scorer: alignment.pairwise_distance(q, s, m, 1e-3).sum(), argnums=(0, 1)
        )(query, support)
        assert np.isfinite(value)
        assert all(np.all(np.isfinite(g)) for g in grads)


def test_bfloat16_input_accumulates_in_float32():
    dist = np.random.default_rng(13).uniform(0, 2, size=(4, 8, 8)).astype(np.float32)
    low = alignment.tam_distance(jnp.asarray(dist, jnp.bfloat16), lam=0.1)
    assert low.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(dist, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(low, alignment.tam_distance(rounded, lam=0.1), rtol=1e-6)
    grad = jax.grad(lambda d: alignment.tam_distance(d).sum())(jnp.asarray(dist, jnp.bfloat16))
    assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize(
    ("scorer", "bidirectional"), [(m, False) for m in alignment.SCORERS] + [("tam", True)]
)
def test_pairwise_distance_equals_loop_over_pairs(scorer, bidirectional):
    rng = np.random.default_rng(14)
    query = rng.normal(size=(3, 6, 10)).astype(np.float32)
    support = rng.normal(size=(4, 6, 10)).astype(np.float32)
    got = alignment.pairwise_distance(query, support, scorer, 0.1, bidirectional)
    assert got.shape == (3, 4)
    for a, b in itertools.product(range(3), range(4)):
        dist = alignment.cosine_distance(query[a], support[b])
        expected = alignment.alignment_distance(dist, scorer, 0.1, bidirectional)
        np.testing.assert_allclose(got[a, b], expected, rtol=1e-5, atol=1e-6)


def test_pairwise_distance_with_hard_minimum():
    rng = np.random.default_rng(18)
    query = rng.normal(size=(2, 5, 8)).astype(np.float32)
    support = rng.normal(size=(3, 5, 8)).astype(np.float32)
    got = alignment.pairwise_distance(query, support, "tam", 0.0)
    for a, b in itertools.product(range(2), range(3)):
        dist = np.asarray(alignment.cosine_distance(query[a], support[b]), np.float64)
        np.testing.assert_allclose(got[a, b], brute_tam(dist, 0), rtol=1e-5)


def test_pairwise_distance_with_different_frame_counts():
    rng = np.random.default_rng(15)
    query = rng.normal(size=(2, 5, 8)).astype(np.float32)
    support = rng.normal(size=(3, 7, 8)).astype(np.float32)
    assert alignment.pairwise_distance(query, support, "tam").shape == (2, 3)


@pytest.mark.parametrize(
    "fn",
    [
        lambda d: alignment.tam_distance(d, 0.1),
        lambda d: alignment.tam_distance(d, 0.1, bidirectional=True),
        lambda d: alignment.plain_dtw_distance(d, 0.1),
        alignment.diagonal_distance,
        alignment.mean_distance,
        alignment.min_distance,
        lambda d: alignment.soft_alignment(d, "tam"),
        lambda d: alignment.alignment_path(d, "tam"),
        lambda d: alignment.cosine_distance(d, d[..., ::-1, :]),
    ],
)
def test_jit_and_vmap_agree_with_eager(fn):
    dist = jnp.asarray(np.random.default_rng(16).uniform(0, 2, size=(3, 5, 5)), jnp.float32)
    eager = fn(dist)
    np.testing.assert_allclose(jax.jit(fn)(dist), eager, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(fn)(dist), eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "fn",
    [
        lambda d: alignment.tam_distance(d, 0.1, bidirectional=True),
        lambda d: alignment.plain_dtw_distance(d, 0.0),
        lambda d: alignment.alignment_distance(d, "tam", np.float32(0.5)),
        lambda d: alignment.soft_alignment(d, "plain_dtw"),
        lambda d: alignment.alignment_path(d, "tam"),
        lambda d: alignment.cosine_distance(d, d),  # frame features here
    ],
)
def test_an_eager_call_is_one_program_and_a_traced_call_inlines_it(fn):
    dist = jnp.asarray(np.random.default_rng(17).uniform(0, 2, size=(2, 3, 7)), jnp.float32)  # a new shape
    with lowered_programs() as lowered:
        eager = fn(dist)
    assert len(lowered) == 1
    # Inside another transformation the call is part of the caller's program, not a nested one.
    public = {"cosine_distance", "tam_distance", "plain_dtw_distance", "alignment_distance", "soft_alignment",
              "alignment_path"}
    assert not [eqn for eqn in jax.make_jaxpr(fn)(dist).eqns if eqn.params.get("name") in public]
    np.testing.assert_allclose(jax.jit(fn)(dist), eager, rtol=1e-6, atol=1e-6)
