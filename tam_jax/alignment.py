"""Frame distances and video alignment scores: the Temporal Alignment Module (TAM) and Table 2's baselines.

Pure functions of distance matrices `[..., Tq, Ts]` (any leading batch axes; Tq and Ts may differ).
Equation numbers refer to Cao et al., "Few-Shot Video Classification via Temporal Alignment", CVPR 2020.

All functions are jittable, vmappable and differentiable, accept bfloat16, float32 (or float64) inputs and
accumulate in at least float32; results come back in that accumulation dtype (float32 for bf16 input).
Called outside `jax.jit`, the scores and paths run as one compiled program per input shape (`_compiled`).

The dynamic programmes (TAM and plain DTW) run as one `jax.lax.scan` over the anti-diagonals of the
cost matrix: cell (i, j) depends only on cells of diagonals i + j - 1 and i + j - 2, so every step updates
a whole diagonal, for every matrix of the batch at once. Gradients of the soft scores use the analytic
soft-DTW backward recursion, a second reverse scan (a custom VJP: reverse-mode only; measured against
autodiff of the forward scan in benchmarks/README.md); the hard scores and a traced lam use autodiff.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SCORERS = ("tam", "plain_dtw", "diagonal", "mean", "min")

# Stands in for +inf on cells outside the matrix. Finite, so that neither the soft-min nor its gradient
# ever meets inf - inf; large enough that exp(-(UNREACHABLE - m) / lam) underflows to 0 for any real cost.
_UNREACHABLE = 1e30
# Keeps the norm away from zero so that an all-zero feature vector has a finite cosine and gradient.
_NORM_EPS = 1e-8


@functools.partial(jax.jit, inline=True)  # one program when called outside jax.jit
def cosine_distance(x: jax.Array, y: jax.Array) -> jax.Array:
    """Frame-to-frame cosine distance, Eq. 1: D[l, m] = 1 - cos(x_l, y_m).

    Args:
      x: query frame features `[..., Tq, D]`.
      y: support frame features `[..., Ts, D]` (leading axes broadcast against x's).

    Returns:
      `[..., Tq, Ts]` distances in [0, 2]. An all-zero feature vector has cosine 0 to everything
      (distance 1), with a finite gradient.
    """
    dtype = _accumulation_dtype(jnp.result_type(x, y))
    x = x.astype(dtype)
    y = y.astype(dtype)
    x_unit = x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + _NORM_EPS)
    y_unit = y * jax.lax.rsqrt(jnp.sum(y * y, axis=-1, keepdims=True) + _NORM_EPS)
    return 1.0 - jnp.einsum("...ld,...md->...lm", x_unit, y_unit)


def _accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for half-precision and float32 input; float64 stays float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _is_hard(lam) -> bool:
    """lam == 0 (a Python number, as `_checked_lam` leaves every known lam) selects the hard minimum."""
    return isinstance(lam, (int, float)) and lam == 0


def _checked_lam(lam):
    """lam as a Python float when its value is known (Python, NumPy or concrete JAX scalar), else the tracer.

    A known lam selects its path at trace time: 0 the hard minimum, > 0 the soft-min with the analytic
    backward pass. A traced lam cannot be checked; `_soft_min3` treats a traced lam <= 0 as 0 (the hard
    minimum) rather than dividing by it.

    Raises:
      ValueError: a known lam that is negative, NaN or not a scalar.
    """
    if isinstance(lam, jax.core.Tracer):
        return lam
    value = np.asarray(lam)
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.number):
        raise ValueError(f"lam must be a scalar number (0 is the hard minimum), got {lam!r}.")
    value = float(value)
    if not value >= 0:  # also NaN
        raise ValueError(f"lam must be >= 0 (0 is the hard minimum), got {value}.")
    return value


def _compiled(function: Callable) -> Callable:
    """`function(dist, ...)` as one compiled program per input shape and option values.

    A call outside `jax.jit` runs fused, not op by op (the scan alone is slow eagerly), and so do its
    eager `grad` and `vmap`. Inside `jax.jit` the call is inlined into the caller's program, which is
    therefore the same as without this wrapper. A known lam (a Python, NumPy or concrete JAX scalar) is
    a static option, so that 0 selects the hard minimum and a positive lam the analytic backward pass at
    trace time; a traced lam stays traced.
    """
    signature = inspect.signature(function)
    options = tuple(name for name in signature.parameters if name != "dist")
    jitted = jax.jit(function, static_argnames=options, inline=True)

    @functools.wraps(function)
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        if "lam" in arguments:
            arguments["lam"] = _checked_lam(arguments["lam"])
            if isinstance(arguments["lam"], jax.core.Tracer):
                return function(**arguments)
        return jitted(**arguments)

    return call


def _soft_min3(a: jax.Array, b: jax.Array, c: jax.Array, lam) -> jax.Array:
    """Eq. 6 on three candidates: -lam * log(exp(-a / lam) + exp(-b / lam) + exp(-c / lam)).

    Shifted by the (gradient-free) minimum so that it stays finite for any magnitudes and any lam > 0.
    With lam == 0 (or a traced lam <= 0) it is the hard minimum, taken at the first smallest candidate so
    that its gradient is one-hot (which makes the gradient of a hard alignment score exactly its 0/1 path).
    """
    hard = jnp.where((a <= b) & (a <= c), a, jnp.where(b <= c, b, c))
    if _is_hard(lam):
        return hard
    if isinstance(lam, jax.core.Tracer):
        # A traced lam <= 0 is the hard minimum; the soft branch gets a harmless lam so that neither it nor
        # its gradient is NaN where it is not selected.
        positive = lam > 0
        soft = _soft_min3_with_weights(a, b, c, jnp.where(positive, lam, 1.0))[0]
        return jnp.where(positive, soft, hard)
    return _soft_min3_with_weights(a, b, c, lam)[0]


def _soft_min3_with_weights(a, b, c, lam):
    """Eq. 6 and its gradient: (soft-min, (d/da, d/db, d/dc)), the weights summing to 1."""
    smallest = jax.lax.stop_gradient(jnp.minimum(a, jnp.minimum(b, c)))
    ea, eb, ec = (jnp.exp((smallest - x) / lam) for x in (a, b, c))
    total = ea + eb + ec
    return smallest - lam * jnp.log(total), (ea / total, eb / total, ec / total)


def _shift_rows(diagonal: jax.Array, offset: int, fill) -> jax.Array:
    """`[R, B]` -> `[R, B]` whose row i holds row i - offset of the input (offset +-1), `fill` elsewhere."""
    pad = jnp.full_like(diagonal[:1], fill)
    if offset == 1:
        return jnp.concatenate([pad, diagonal[:-1]], axis=0)
    return jnp.concatenate([diagonal[1:], pad], axis=0)


@functools.lru_cache(maxsize=64)
def _diagonal_layout(rows: int, cols: int, vertical_columns: tuple[bool, ...]):
    """Static masks of a `[rows, cols]` matrix laid out by anti-diagonal: diagonal k holds cell
    (i, k - i) at position i. Each is `[K, rows, 1]` bool (K = rows + cols - 1): the cell exists; a
    path may enter it from above (its column is one of `vertical_columns`); it is the start (0, 0).
    """
    diagonals = np.arange(rows + cols - 1)[:, None]
    col_index = diagonals - np.arange(rows)[None, :]
    valid = (col_index >= 0) & (col_index < cols)
    can_go_down = np.asarray(vertical_columns)[np.clip(col_index, 0, cols - 1)] & valid
    is_start = np.zeros_like(valid)
    is_start[0, 0] = True
    return valid[..., None], can_go_down[..., None], is_start[..., None]


def _skew(cost: jax.Array) -> jax.Array:
    """`[B, R, C]` -> `[K, R, B]` (K = R + C - 1) with [k, i, b] = cost[b, i, k - i], zero off the matrix.

    Padding each row with R zeros and re-reading the rows with one element less shifts row i right by i:
    a pad, two reshapes and transposes, cheaper than a gather (and its scatter-add gradient).
    """
    batch, rows, cols = cost.shape
    diagonals = rows + cols - 1
    by_row = jnp.pad(jnp.transpose(cost, (1, 2, 0)), ((0, 0), (0, rows), (0, 0)))  # [R, C + R, B]
    flat = by_row.reshape(rows * (cols + rows), batch)[: rows * diagonals]
    return jnp.transpose(flat.reshape(rows, diagonals, batch), (1, 0, 2))


def _accumulate(diagonal_costs: jax.Array, lam, layout_key, with_weights: bool = False):
    """The recursion, one anti-diagonal per scan step: `[K, R, B]` costs -> `[K, R, B]` gamma, or, with
    `with_weights`, (gamma of the last cell `[B]`, the soft-min weights of every cell's diagonal,
    horizontal and vertical predecessors, each `[K, R, B]`)."""
    valid, can_go_down, is_start = _diagonal_layout(*layout_key)

    def step(carry, inputs):
        previous, before_previous = carry  # gamma on diagonals k-1 and k-2, [R, B]
        costs, is_valid, vertical_ok, starts_here = inputs
        diagonal_move = _shift_rows(before_previous, 1, _UNREACHABLE)  # from (i-1, j-1)
        horizontal_move = previous  # from (i, j-1)
        vertical_move = jnp.where(vertical_ok, _shift_rows(previous, 1, _UNREACHABLE), _UNREACHABLE)
        if with_weights:
            best, weights = _soft_min3_with_weights(diagonal_move, horizontal_move, vertical_move, lam)
        else:
            best = _soft_min3(diagonal_move, horizontal_move, vertical_move, lam)
        # The path starts at (0, 0), which has no predecessor.
        best = jnp.where(starts_here, 0.0, best)
        current = jnp.where(is_valid, costs + best, _UNREACHABLE)
        return (current, previous), (weights if with_weights else current)

    unreachable = jnp.full(diagonal_costs.shape[1:], _UNREACHABLE, diagonal_costs.dtype)
    inputs = (diagonal_costs, valid, can_go_down, is_start)
    (last, _), outputs = jax.lax.scan(step, (unreachable, unreachable), inputs)
    return (last[-1], outputs) if with_weights else outputs


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _soft_accumulate_last(diagonal_costs: jax.Array, lam: float, layout_key) -> jax.Array:
    """gamma of the last cell, `[K, R, B]` -> `[B]`, with the analytic soft-DTW backward pass."""
    return _accumulate(diagonal_costs, lam, layout_key)[-1, -1]


def _soft_accumulate_last_fwd(diagonal_costs, lam, layout_key):
    return _accumulate(diagonal_costs, lam, layout_key, with_weights=True)


def _soft_accumulate_last_bwd(lam, layout_key, weights, cotangent):
    """Backward recursion of soft DTW (Cuturi & Blondel, 2017), generalised to per-column moves.

    E(p) = d gamma_end / d gamma(p) = sum over successors s of E(s) * w(s <- p), where w(s <- p) is the
    soft-min weight s gave p in the forward pass (stored there, so this pass is multiply-adds only);
    and d gamma_end / d cost(p) = E(p).
    """
    valid = _diagonal_layout(*layout_key)[0]
    from_diagonal, from_left, from_above = weights  # each [K, R, B], indexed by the successor
    zeros = jnp.zeros_like(from_left[-1])

    def step(carry, inputs):
        next_e, after_next_e = carry  # E on diagonals k+1 and k+2
        left_weight, above_weight, diagonal_weight, is_valid = inputs
        e = (
            next_e * left_weight  # to (i, j+1)
            + _shift_rows(next_e * above_weight, -1, 0.0)  # to (i+1, j)
            + _shift_rows(after_next_e * diagonal_weight, -1, 0.0)  # to (i+1, j+1)
        )
        e = jnp.where(is_valid, e, 0.0)
        return (e, next_e), e

    last_e = zeros.at[-1].set(cotangent)
    # Step k reads the weights of its successors on diagonals k+1 (left, above) and k+2 (diagonal).
    diagonal_after_next = jnp.concatenate([from_diagonal[2:], zeros[None]], axis=0)
    inputs = (from_left[1:], from_above[1:], diagonal_after_next, valid[:-1])
    _, earlier_e = jax.lax.scan(step, (last_e, zeros), inputs, reverse=True)
    return (jnp.concatenate([earlier_e, last_e[None]], axis=0),)


_soft_accumulate_last.defvjp(_soft_accumulate_last_fwd, _soft_accumulate_last_bwd)


def _dynamic_programme(cost: jax.Array, lam, vertical_columns: np.ndarray) -> jax.Array:
    """Accumulated cost gamma(R-1, C-1) of a monotone alignment through `cost`.

    gamma(i, j) = cost(i, j) + softmin(gamma(i-1, j-1), gamma(i, j-1), [gamma(i-1, j)]), where the
    vertical predecessor (i-1, j) is allowed only in the columns flagged by `vertical_columns`;
    gamma(0, 0) = cost(0, 0); cells outside the matrix are unreachable.

    A positive Python-number lam uses the analytic backward pass (custom VJP: reverse mode only); lam = 0
    and traced lam use autodiff of the scan.

    Args:
      cost: `[B, R, C]`, float32 or float64.
      lam: soft-min temperature (Eq. 6); 0 for the hard minimum.
      vertical_columns: `[C]` bool, columns where a path may move down.

    Returns:
      `[B]`, in the dtype of `cost`.
    """
    _, rows, cols = cost.shape
    layout_key = (rows, cols, tuple(bool(v) for v in vertical_columns))
    # [K, R, B]: the cost of each cell laid out by anti-diagonal, the batch on the fastest axis so that
    # every step is a vector operation over the batch.
    diagonal_costs = _skew(cost)
    if isinstance(lam, (int, float)) and lam > 0:
        return _soft_accumulate_last(diagonal_costs, float(lam), layout_key)
    return _accumulate(diagonal_costs, lam, layout_key)[-1, -1]


def _flatten_batch(dist: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """`[..., Tq, Ts]` -> (`[B, Tq, Ts]` in the accumulation dtype, leading shape)."""
    if dist.ndim < 2:
        raise ValueError(f"Expected distances of shape [..., Tq, Ts], got shape {dist.shape}.")
    leading = dist.shape[:-2]
    flat = dist.reshape((-1,) + dist.shape[-2:])
    return flat.astype(_accumulation_dtype(dist.dtype)), leading


def _tam_one_direction(dist: jax.Array, lam) -> jax.Array:
    """Eq. 5-7 on `[..., Tq, Ts]` -> `[...]`, without the reverse direction."""
    flat, leading = _flatten_batch(dist)
    # Eq. 5: one zero column before and after the support axis; only those two allow vertical moves,
    # so a path may start and end at any query frame and sums one entry of every support column.
    padded = jnp.pad(flat, ((0, 0), (0, 0), (1, 1)))
    cols = padded.shape[-1]
    vertical_columns = np.zeros(cols, bool)
    vertical_columns[[0, cols - 1]] = True
    return _dynamic_programme(padded, lam, vertical_columns).reshape(leading)


@_compiled
def tam_distance(dist: jax.Array, lam=0.1, bidirectional: bool = False) -> jax.Array:
    """Temporal Alignment Module video distance, Eq. 5-7.

    The support axis is padded with one zero column on each side (T x (T+2) for Tq = Ts = T). In the two
    padded columns the predecessors of (i, j) are (i-1, j-1), (i-1, j) and (i, j-1); in the inner columns
    only (i-1, j-1) and (i, j-1); the first query row accumulates from the left. The minimum is relaxed to
    the soft-min of Eq. 6 with temperature `lam` (0: the hard minimum). The score is gamma(Tq, Ts + 1)
    (Eq. 7, 1-indexed): every path sums exactly one entry of each support column.

    Args:
      dist: frame distances `[..., Tq, Ts]` (Eq. 1), query frames along Tq.
      lam: soft-min temperature, >= 0 (a Python, NumPy or JAX scalar; 0: the hard minimum).
      bidirectional: also add the support->query score (the same recursion on the transposed matrix),
        as public PyTorch reimplementations train with.

    Returns:
      `[...]` video distances.
    """
    lam = _checked_lam(lam)
    score = _tam_one_direction(dist, lam)
    if bidirectional:
        score = score + _tam_one_direction(jnp.swapaxes(dist, -1, -2), lam)
    return score


@_compiled
def plain_dtw_distance(dist: jax.Array, lam=0.1) -> jax.Array:
    """Table 2's Plain DTW: no padding, paths from (1, 1) to (Tq, Ts), predecessors (i-1, j-1),
    (i-1, j) and (i, j-1) everywhere; soft-min of Eq. 6 with temperature `lam` (0: hard minimum).

    Args:
      dist: `[..., Tq, Ts]` frame distances.

    Returns:
      `[...]`.
    """
    lam = _checked_lam(lam)
    flat, leading = _flatten_batch(dist)
    vertical_columns = np.ones(flat.shape[-1], bool)
    return _dynamic_programme(flat, lam, vertical_columns).reshape(leading)


def diagonal_distance(dist: jax.Array) -> jax.Array:
    """Table 2's Diagonal: the mean of D[l, l] ("an average over the diagonal of the distance matrix"),
    frames compared in order; needs Tq == Ts.

    `[..., T, T]` -> `[...]`, in [0, 2] for cosine distances, as Mean and Min (TAM's sum is in [0, 2T]).
    """
    if dist.shape[-1] != dist.shape[-2]:
        raise ValueError(
            "diagonal_distance needs as many query as support frames (Tq == Ts), got "
            f"Tq={dist.shape[-2]}, Ts={dist.shape[-1]}. Sample the same number of frames per video "
            "or use another scorer."
        )
    on_diagonal = jnp.diagonal(dist.astype(_accumulation_dtype(dist.dtype)), axis1=-2, axis2=-1)
    return jnp.mean(on_diagonal, axis=-1)


def mean_distance(dist: jax.Array) -> jax.Array:
    """Table 2's Mean: the mean of all frame distances, order-blind. `[..., Tq, Ts]` -> `[...]`."""
    return jnp.mean(dist.astype(_accumulation_dtype(dist.dtype)), axis=(-2, -1))


def min_distance(dist: jax.Array) -> jax.Array:
    """Table 2's Min: the smallest frame distance over all frame pairs. `[..., Tq, Ts]` -> `[...]`."""
    return jnp.min(dist.astype(_accumulation_dtype(dist.dtype)), axis=(-2, -1))


def _scorer(scorer: str, lam, bidirectional: bool) -> Callable[[jax.Array], jax.Array]:
    """The scoring function `[..., Tq, Ts]` -> `[...]` for a scorer name."""
    if scorer == "tam":
        return functools.partial(tam_distance, lam=lam, bidirectional=bidirectional)
    if bidirectional:
        raise ValueError(f"bidirectional=True applies to scorer 'tam' only, got scorer {scorer!r}.")
    if scorer == "plain_dtw":
        return functools.partial(plain_dtw_distance, lam=lam)
    if scorer == "diagonal":
        return diagonal_distance
    if scorer == "mean":
        return mean_distance
    if scorer == "min":
        return min_distance
    raise ValueError(f"Unknown alignment scorer {scorer!r}; valid scorers are {', '.join(SCORERS)}.")


@_compiled
def alignment_distance(dist: jax.Array, scorer: str, lam=0.1, bidirectional: bool = False) -> jax.Array:
    """Video distance `[..., Tq, Ts]` -> `[...]` by scorer: one of "tam", "plain_dtw", "diagonal", "mean",
    "min" (Table 2). `lam` is used by "tam" and "plain_dtw"; `bidirectional` by "tam"."""
    return _scorer(scorer, lam, bidirectional)(dist)


# lam is static: 0 selects the hard minimum at trace time.
@functools.partial(jax.jit, static_argnames=("scorer", "lam", "bidirectional"))
def pairwise_distance(
    query: jax.Array,
    support: jax.Array,
    scorer: str = "tam",
    lam=0.1,
    bidirectional: bool = False,
) -> jax.Array:
    """Distance of every query video to every support video.

    Args:
      query: `[Nq, Tq, D]` frame features.
      support: `[Ns, Ts, D]` frame features.
      scorer, lam, bidirectional: as in `alignment_distance`.

    Returns:
      `[Nq, Ns]`.
    """
    score = _scorer(scorer, lam, bidirectional)
    per_support = jax.vmap(lambda q, s: score(cosine_distance(q, s)), in_axes=(None, 0))
    return jax.vmap(per_support, in_axes=(0, None))(query, support)


@_compiled
def soft_alignment(dist: jax.Array, scorer: str = "tam", lam=0.1) -> jax.Array:
    """Expected alignment: the gradient of the soft distance with respect to `dist`, `[..., Tq, Ts]`.

    Entry (l, m) is the probability that query frame l is matched to support frame m under the Gibbs
    distribution over paths at temperature `lam`; for TAM each column sums to 1 (Fig. 3-4 of the paper).
    """
    if scorer not in ("tam", "plain_dtw"):
        raise ValueError(f"soft_alignment needs an alignment scorer ('tam' or 'plain_dtw'), got {scorer!r}.")
    score = _scorer(scorer, lam, False)
    return jax.grad(lambda d: jnp.sum(score(d)))(dist.astype(_accumulation_dtype(dist.dtype)))


@_compiled
def alignment_path(dist: jax.Array, scorer: str = "tam") -> jax.Array:
    """The optimal hard path (lam = 0) as a 0/1 matrix `[..., Tq, Ts]` (ties broken towards the diagonal).

    Computed as the gradient of the hard distance, which the first-argmin minimum makes one-hot along
    the backtracked path. For TAM, each support column holds exactly one 1.
    """
    return soft_alignment(dist, scorer, lam=0)
