"""Seconds for 10,000 5-way 5-shot episodes over cached embeddings, against embedding every episode afresh.

    python benchmarks/evaluate.py [--workdir runs/demo] [--episodes 10000] [--fresh_episodes 40] [--out F]

On the demo's test split (10 classes x 20 videos) with the tiny ResNet of configs/demo.py (the trained
weights of `--workdir` when given, else random ones: the timing does not depend on them):
- cached: load every test video once, embed it once, then run all episodes for every scorer
  (tam, plain_dtw, diagonal, mean, min, tsn) on the cached embeddings;
- fresh: for each of `--fresh_episodes` episodes, load and embed that episode's 40 videos, then score;
  the per-episode time is extrapolated to `--episodes`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import jax
import numpy as np

from tam_jax import checkpoints, evaluate, hosts, methods, models, train_state
from tam_jax.data import pipeline
from tam_jax.data.clips import load_clip
from tam_jax.data.episodes import EpisodeSampler
from tam_jax.data.report import SkipReport

REPO = Path(__file__).resolve().parents[1]


def demo_config():
    spec = importlib.util.spec_from_file_location("demo", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("shot=5")
    config.mesh.num_devices = 1
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--workdir", default=None, help="a demo training run whose latest weights to use")
    parser.add_argument("--episodes", type=int, default=10_000)
    parser.add_argument("--fresh_episodes", type=int, default=40)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    config = demo_config()
    mesh = hosts.make_mesh(config.mesh.num_devices)
    model = models.build_embedder(config.model)
    state = train_state.create_train_state(config, model, train_state.make_optimizer(config), mesh)
    if args.workdir:
        manager = checkpoints.CheckpointManager(str(Path(args.workdir) / "checkpoints"))
        state = manager.restore(manager.latest_step(), state)
    scorers = methods.names(learned=False)
    way, shot, queries = config.fewshot.way, config.fewshot.shot, config.fewshot.queries
    evaluator = evaluate.FewShotEvaluator(config, "test", mesh, model, SkipReport(), scorers=scorers,
                                          shots=(shot,), num_episodes=args.episodes)
    split = evaluator.data

    start = time.perf_counter()
    labels = evaluator.clips.labels  # loads the split's clips
    loaded = time.perf_counter()
    embedded_split = evaluator.embed(state)
    embedded = time.perf_counter()
    records = evaluator.score(embedded_split)
    finished = time.perf_counter()
    cached_total = finished - start
    cached_parts = {"load": loaded - start, "embed": embedded - loaded, "episodes": finished - embedded}

    seed = evaluate.episode_seed(config, "test")  # the same episodes as the cached evaluation
    sampler = EpisodeSampler(labels, way=way, shot=shot, queries=queries, seed=seed)
    variables = train_state.embedder_variables(state)
    spec = pipeline.clip_spec(config)
    embed = jax.jit(lambda v, x: model.apply(v, x, train=False))
    built = tuple(methods.build(name, config) for name in scorers)
    score = jax.jit(
        lambda s, q, y: evaluate.frame_episode_accuracies(built, None, s[None], q[None], y[None], way=way,
                                                          shot=shot)
    )

    def fresh_episode(index):
        episode = sampler.episode(index)
        rows = np.concatenate([episode.support.reshape(-1), episode.query])
        clips = np.stack([load_clip(split.source, int(split.items[r]), spec) for r in rows])
        features = embed(variables, clips)
        return score(features[: way * shot], features[way * shot :], episode.query_labels).block_until_ready()

    fresh_episode(0)  # compile
    start = time.perf_counter()
    for index in range(1, args.fresh_episodes + 1):
        fresh_episode(index)
    fresh_per_episode = (time.perf_counter() - start) / args.fresh_episodes
    fresh_total = fresh_per_episode * args.episodes

    result = {
        "episodes": args.episodes,
        "videos": int(len(labels)),
        "scorers": list(scorers),
        "cached_seconds_total": cached_total,
        "cached_seconds_parts": cached_parts,
        "fresh_seconds_per_episode": fresh_per_episode,
        "fresh_seconds_extrapolated": fresh_total,
        "speedup": fresh_total / cached_total,
        "accuracy": {r["scorer"]: r["accuracy"] for r in records},
        "backend": jax.default_backend(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
