"""Frames per second of the FrameEmbedder: inference, and one forward+backward training step.

Run by hand (not a test), on a machine doing nothing else:

    python benchmarks/embedder.py                      # tiny@64, tiny@224, resnet50@224
    python benchmarks/embedder.py --case resnet18:112 --frames 16 --iters 10

Each case is jitted, run `--warmup` times, then timed over `--iters` calls (blocking on the
result); the table reports the compile time, the median seconds per call and frames per second.
The training step is grad of mean(features**2) with respect to the parameters, BatchNorm in
training mode (statistics updated), without an optimizer update.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tam_jax.models import FrameEmbedder

DEFAULT_CASES = ("tiny:64", "tiny:224", "resnet50:224")


def _time_calls(fn, args, warmup: int, iters: int) -> tuple[float, float]:
    """(seconds of the first call, i.e. compile + run; median seconds per later call)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times)


def bench_case(arch: str, size: int, frames: int, dtype, warmup: int, iters: int) -> list[dict]:
    """Inference and training-step timings of `arch` on `[1, frames, size, size, 3]` uint8."""
    embedder = FrameEmbedder(arch=arch, dtype=dtype)
    video = np.random.default_rng(0).integers(0, 256, (1, frames, size, size, 3), dtype=np.uint8)
    video = jnp.asarray(video)
    variables = jax.jit(lambda v: embedder.init(jax.random.key(0), v, train=False))(video)

    infer = jax.jit(lambda v, x: embedder.apply(v, x, train=False))

    def loss(params, stats, x):
        out, new_state = embedder.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(out**2), new_state["batch_stats"]

    train_step = jax.jit(jax.grad(loss, has_aux=True))

    rows = []
    for mode, fn, args in (
        ("inference", infer, (variables, video)),
        ("train step", train_step, (variables["params"], variables["batch_stats"], video)),
    ):
        compile_s, per_call = _time_calls(fn, args, warmup, iters)
        rows.append(
            dict(
                arch=arch,
                size=size,
                mode=mode,
                compile_s=compile_s,
                per_call=per_call,
                fps=frames / per_call,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--case",
        action="append",
        help=f"ARCH:SIZE, repeatable (default: {' '.join(DEFAULT_CASES)})",
    )
    parser.add_argument("--frames", type=int, default=8, help="frames per call (B=1, T=frames)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    print(
        f"{args.frames} frames per call, {args.dtype}, median of {args.iters} after "
        f"{args.warmup} warm-up calls\n"
    )
    print("| arch | px | mode | first call s | s / call | frames/s |")
    print("|---|---|---|---|---|---|")
    for case in args.case or DEFAULT_CASES:
        arch, size = case.split(":")
        for r in bench_case(
            arch, int(size), args.frames, jnp.dtype(args.dtype), args.warmup, args.iters
        ):
            print(
                f"| {r['arch']} | {r['size']} | {r['mode']} | {r['compile_s']:.2f} | "
                f"{r['per_call']:.4f} | {r['fps']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
