"""Pairs per second of the alignment scores, forward and forward+backward, against tslearn's soft-DTW.

    python benchmarks/alignment.py [--lengths 8,32,64,128] [--pairs 625,8192] [--out FILE.json]
    python benchmarks/alignment.py --eager

`--eager` times the public functions called outside `jax.jit` on one episode's 25 8x8 matrices instead:
the first call (tracing and compiling included) and the median call after it.

For each sequence length T and batch of N query-support pairs (625 = one 5-way 5-shot episode of 25
queries; 8192 = a large batch), times on random float32 cost matrices `[N, T, T]`:
- `tam_distance` and `plain_dtw_distance` (lam=0.1), jitted: the value; value+gradient with the
  analytic backward pass (the default); value+gradient by autodiff of the forward scan (for comparison);
- when tslearn is installed, its batched, parallel numba soft-DTW kernels on the same matrices (float64,
  the only dtype they take): `_njit_soft_dtw_batch` for the value, plus `_njit_soft_dtw_grad_batch` for
  value+gradient. Plain soft DTW is the same work as `plain_dtw_distance`, so the ratio compares them.
Each figure is the median of several timed repeats after a warm-up call (compilation excluded).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tam_jax import alignment

LAM = 0.1


def median_seconds(fn, min_total=1.0, max_repeats=20):
    """Median wall time of fn() over repeats that add up to about `min_total` seconds (after warm-up)."""
    fn()
    times = []
    while len(times) < 3 or (sum(times) < min_total and len(times) < max_repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_timers(scorer):
    """(value, value+gradient with the analytic backward, value+gradient by autodiff of the scan)."""
    score = lambda d, lam: alignment.alignment_distance(d, scorer, lam=lam)
    forward = jax.jit(functools.partial(score, lam=LAM))
    both = jax.jit(jax.value_and_grad(lambda d: jnp.sum(score(d, LAM))))
    # A traced lam makes alignment fall back to autodiff of the forward scan.
    both_autodiff = jax.jit(jax.value_and_grad(lambda d, lam: jnp.sum(score(d, lam))))
    return (
        lambda d: forward(d).block_until_ready(),
        lambda d: jax.block_until_ready(both(d)),
        lambda d: jax.block_until_ready(both_autodiff(d, jnp.float32(LAM))),
    )


def tslearn_timers():
    try:
        from tslearn.metrics.soft_dtw_fast import _njit_soft_dtw_batch, _njit_soft_dtw_grad_batch
    except ImportError:
        return None

    def forward(cost):
        n, t, s = cost.shape
        accumulated = np.zeros((n, t + 2, s + 2))
        _njit_soft_dtw_batch(cost, accumulated, LAM)
        return accumulated

    def both(cost):
        n, t, s = cost.shape
        accumulated = forward(cost)
        padded = np.zeros((n, t + 1, s + 1))
        padded[:, :t, :s] = cost
        expected = np.zeros((n, t + 2, s + 2))
        _njit_soft_dtw_grad_batch(padded, accumulated, expected, LAM)
        return accumulated[:, t, s], expected[:, 1 : t + 1, 1 : s + 1]

    return forward, both


def check_tslearn_agrees(tslearn_both, rng):
    """The two implementations compute the same soft DTW value and gradient."""
    cost = rng.uniform(0, 2, size=(4, 8, 8))
    value, grad = tslearn_both(cost)
    ours, our_grad = jax.value_and_grad(
        lambda d: jnp.sum(alignment.plain_dtw_distance(d, lam=LAM))
    )(jnp.asarray(cost, jnp.float32))
    np.testing.assert_allclose(value.sum(), ours, rtol=1e-4)
    np.testing.assert_allclose(grad, our_grad, atol=1e-4)


def run(lengths, pair_counts):
    rng = np.random.default_rng(0)
    reference = tslearn_timers()
    if reference is not None:
        check_tslearn_agrees(reference[1], rng)
    rows = []
    for length in lengths:
        for pairs in pair_counts:
            cost64 = rng.uniform(0, 2, size=(pairs, length, length))
            cost = jnp.asarray(cost64, jnp.float32)
            row = {"T": length, "pairs": pairs}
            for scorer in ("tam", "plain_dtw"):
                forward, both, both_autodiff = jax_timers(scorer)
                row[f"{scorer}_fwd"] = pairs / median_seconds(functools.partial(forward, cost))
                row[f"{scorer}_fwd_bwd"] = pairs / median_seconds(functools.partial(both, cost))
                row[f"{scorer}_fwd_bwd_autodiff"] = pairs / median_seconds(
                    functools.partial(both_autodiff, cost)
                )
            if reference is not None:
                forward, both = reference
                row["tslearn_fwd"] = pairs / median_seconds(functools.partial(forward, cost64))
                row["tslearn_fwd_bwd"] = pairs / median_seconds(functools.partial(both, cost64))
                row["ratio_fwd"] = row["plain_dtw_fwd"] / row["tslearn_fwd"]
                row["ratio_fwd_bwd"] = row["plain_dtw_fwd_bwd"] / row["tslearn_fwd_bwd"]
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def eager_calls():
    """{name: (first call, later calls) in seconds} of the public functions called outside `jax.jit`."""
    cost = jnp.asarray(np.random.default_rng(0).uniform(0, 2, size=(25, 8, 8)), jnp.float32)
    calls = {
        "tam_distance": lambda: alignment.tam_distance(cost),
        "alignment_distance plain_dtw": lambda: alignment.alignment_distance(cost, "plain_dtw"),
        "soft_alignment": lambda: alignment.soft_alignment(cost),
        "alignment_path": lambda: alignment.alignment_path(cost),
        "grad of tam_distance": lambda: jax.grad(lambda d: jnp.sum(alignment.tam_distance(d)))(cost),
    }
    times = {}
    for name, call in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(call())
        first = time.perf_counter() - start
        times[name] = (first, median_seconds(lambda call=call: jax.block_until_ready(call())))
        print(f"| {name} | {first * 1e3:,.0f} ms | {times[name][1] * 1e3:,.2f} ms |", flush=True)
    return times


COLUMNS = (
    "T", "pairs", "tam_fwd", "tam_fwd_bwd", "tam_fwd_bwd_autodiff",
    "plain_dtw_fwd", "plain_dtw_fwd_bwd", "plain_dtw_fwd_bwd_autodiff",
    "tslearn_fwd", "tslearn_fwd_bwd", "ratio_fwd", "ratio_fwd_bwd",
)


def format_row(row):
    cells = []
    for key in COLUMNS:
        value = row.get(key)
        if value is None:
            cells.append("-")
        elif key.startswith("ratio"):
            cells.append(f"{value:.2f}x")
        elif isinstance(value, float):
            cells.append(f"{value:,.0f}")
        else:
            cells.append(str(value))
    return "| " + " | ".join(cells) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--lengths", default="8,32,64,128")
    parser.add_argument("--pairs", default="625,8192")
    parser.add_argument("--out", default=None, help="write the figures and versions as JSON here")
    parser.add_argument("--eager", action="store_true", help="time calls outside jax.jit instead")
    args = parser.parse_args()
    if args.eager:
        print("| call | first call | later calls (median) |\n|---|---|---|")
        eager_calls()
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    pair_counts = [int(x) for x in args.pairs.split(",")]
    print("pairs per second (higher is better); ratio = plain_dtw (ours) / tslearn")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    rows = run(lengths, pair_counts)
    if args.out:
        meta = {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
