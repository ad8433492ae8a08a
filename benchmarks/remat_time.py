"""Time cost of rematerialisation: seconds per train step with each `model.remat` and `train.embed_chunks`,
on whatever device runs it.

    python benchmarks/remat_time.py [--arch resnet18] [--image_size 64] [--remat none,block]
        [--embed_chunks 1,5] [--steps 5]

The full train step (`train.make_train_step`, `configuration.default_config()` with these shapes: 5-way
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

from tam_jax import hosts, models, train, train_state  # noqa: E402
from tam_jax.configuration import default_config  # noqa: E402


def step_seconds(args, remat: str, embed_chunks: int) -> float:
    config = default_config()
    config.model.arch, config.model.remat, config.model.dtype = args.arch, remat, args.dtype
    config.train.embed_chunks = embed_chunks
    config.data.image_size, config.data.num_frames = args.image_size, args.num_frames
    config.fewshot.shot, config.fewshot.queries = args.shot, args.queries
    config.train.episodes_per_step = config.train.episodes_per_device_step = 1
    mesh = hosts.make_mesh(1)
    model = models.build_embedder(config.model)
    optimizer = train_state.make_optimizer(config)
    state = train_state.create_train_state(config, model, optimizer, mesh)
    rng = np.random.default_rng(0)
    way, clip = config.fewshot.way, (args.num_frames, args.image_size, args.image_size, 3)
    batch = train.shard_batch({
        "support": rng.integers(0, 256, (1, way * args.shot, *clip), dtype=np.uint8),
        "query": rng.integers(0, 256, (1, way * args.queries, *clip), dtype=np.uint8),
        "query_labels": np.repeat(np.arange(way), args.queries)[None].astype(np.int32),
    }, mesh)
    step = train.make_train_step(config, model, optimizer, mesh).lower(state, batch).compile()
    state, _ = jax.block_until_ready(step(state, batch))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, _ = jax.block_until_ready(step(state, batch))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
