"""Time cost of rematerialisation: seconds per train step with each `model.remat` and `train.embed_chunks`,
on whatever device runs it.

    python benchmarks/remat_time.py [--arch resnet18] [--image_size 64] [--remat none,block]
        [--embed_chunks 1,5] [--steps 5]

The full train step (`train_step.make_train_step`, `configuration.default_config()` with these shapes: 5-way
1-shot, 5 queries per class, T=4, one episode) on synthetic frames, compiled first, then the median of
`--steps` blocked steps after one warm-up step. Every remat value is run with every chunk count; prints each
setting's seconds and its ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tam_jax import hosts, models, train_state, train_step  # noqa: E402
from tam_jax.configuration import default_config  # noqa: E402


def median_step_seconds(config, steps: int, *, unroll: bool = False) -> float:
    """Median seconds of `steps` blocked train steps of `config` (its plan keys set, on
    `config.mesh.num_devices` devices) on random frames, after compiling and one warm-up step."""
    mesh = hosts.make_mesh(config.mesh.num_devices)
    model = models.build_embedder(config.model)
    optimizer = train_state.make_optimizer(config)
    state = train_state.create_train_state(config, model, optimizer, mesh)
    rng = np.random.default_rng(0)
    fs, episodes = config.fewshot, config.train.episodes_per_step
    clip = (config.data.num_frames, config.data.image_size, config.data.image_size, 3)
    batch = train_step.shard_batch({
        "support": rng.integers(0, 256, (episodes, fs.way * fs.shot, *clip), dtype=np.uint8),
        "query": rng.integers(0, 256, (episodes, fs.way * fs.queries, *clip), dtype=np.uint8),
        "query_labels": np.tile(np.repeat(np.arange(fs.way), fs.queries), (episodes, 1)).astype(np.int32),
    }, mesh)
    step = train_step.make_train_step(config, model, optimizer, mesh, unroll=unroll)
    step = step.lower(state, batch).compile()
    state, _ = jax.block_until_ready(step(state, batch))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, _ = jax.block_until_ready(step(state, batch))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_seconds(args, remat: str, embed_chunks: int) -> float:
    config = default_config()
    config.model.arch, config.model.remat, config.model.dtype = args.arch, remat, args.dtype
    config.train.embed_chunks = embed_chunks
    config.data.image_size, config.data.num_frames = args.image_size, args.num_frames
    config.fewshot.shot, config.fewshot.queries = args.shot, args.queries
    config.train.episodes_per_step = config.train.episodes_per_device_step = config.mesh.num_devices = 1
    return median_step_seconds(config, args.steps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--num_frames", type=int, default=4)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--remat", default="none,block")
    p.add_argument("--embed_chunks", default="1",
                   help="train.embed_chunks values (divisors of 5 * (shot + queries))")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    results = {
        (remat, int(chunks)): step_seconds(args, remat, int(chunks))
        for remat in args.remat.split(",") for chunks in args.embed_chunks.split(",")
    }
    first_setting, first = next(iter(results.items()))
    print(f"| remat | embed chunks | s/step | vs {first_setting[0]}, {first_setting[1]} |\n|---|---|---|---|")
    for (remat, chunks), seconds in results.items():
        print(f"| {remat} | {chunks} | {seconds:.3f} | {seconds / first:.2f}x |")
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {args}")
    return results


if __name__ == "__main__":
    main()
