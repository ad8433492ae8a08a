"""Few-shot evaluation over cached embeddings: embed every video of a split once, then run many episodes.

Test-time transforms are deterministic (centre crop, middle frame of each segment), so a video's embedding
is the same in every episode it appears in; embedding each test video once and gathering rows per episode
gives the same accuracies as embedding each episode afresh, at a fraction of the cost. Every scorer is
computed from the same embeddings in one pass.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tam_jax import fewshot
from tam_jax.data.episodes import EpisodeSampler

# Two-sided 95% normal quantile: the papers report mean accuracy +- 1.96 standard errors.
_Z95 = 1.959964


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", dynamic_ncols=True)


def embed_videos(
    embed: Callable[[np.ndarray], jax.Array],
    frames: np.ndarray,
    batch_size: int,
    progress: bool = True,
) -> np.ndarray:
    """Embed videos in batches: uint8 frames `[N, T, H, W, 3]` -> float32 features `[N, T, D]`.

    `embed` maps `[b, T, H, W, 3]` to `[b, T, D]`; the last batch is padded to `batch_size` so that it
    compiles once.
    """
    chex.assert_rank(frames, 5)
    outputs = []
    starts = range(0, len(frames), batch_size)
    for start in _progress(starts, len(starts), "embedding", progress):
        chunk = frames[start : start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outputs.append(np.asarray(embed(chunk), np.float32)[: batch_size - pad])
    return np.concatenate(outputs)


def episode_index_arrays(
    sampler: EpisodeSampler, indices: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Episodes -> rows of their videos: support `[E, way*shot]`, query `[E, Nq]`, query labels `[E, Nq]`."""
    episodes = [sampler.episode(int(i)) for i in indices]
    support = np.stack([e.support.reshape(-1) for e in episodes])
    query = np.stack([e.query for e in episodes])
    labels = np.stack([e.query_labels for e in episodes]).astype(np.int32)
    return support, query, labels


def episode_accuracies(
    support: jax.Array,
    query: jax.Array,
    labels: jax.Array,
    *,
    way: int,
    shot: int,
    scorers: tuple[str, ...],
    lam: float,
    bidirectional: bool,
    head_support: jax.Array | None = None,
    head_query: jax.Array | None = None,
) -> jax.Array:
    """Per-episode accuracy of each scorer.

    Args:
      support: `[E, way*shot, T, D]` features, class-major.
      query: `[E, Nq, T, D]` features.
      labels: `[E, Nq]` int, the episode class of each query.
      head_support, head_query: `[E, way*shot, F]`, `[E, Nq, F]` learned-head embeddings of the same
        videos (scorers "trn" / "cmn" only).

    Returns:
      `[len(scorers), E]` float32.
    """

    def one_episode(s, q, y, hs, hq):
        distances = fewshot.class_distances_for_scorers(
            q, s, way=way, shot=shot, scorers=scorers, lam=lam, bidirectional=bidirectional,
            head_query=hq, head_support=hs,
        )
        return jax.vmap(lambda d: fewshot.accuracy(-d, y))(distances)

    return jax.vmap(one_episode, out_axes=1)(support, query, labels, head_support, head_query)


@functools.partial(jax.jit, static_argnames=("way", "shot", "scorers", "lam", "bidirectional"))
def _cached_episode_accuracies(embeddings, head_embeddings, support_rows, query_rows, labels, **static):
    heads = {} if head_embeddings is None else {
        "head_support": head_embeddings[support_rows], "head_query": head_embeddings[query_rows]
    }
    return episode_accuracies(embeddings[support_rows], embeddings[query_rows], labels, **heads, **static)


def evaluate_cached(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    way: int,
    shot: int,
    queries: int,
    num_episodes: int,
    seed: int,
    scorers: Sequence[str],
    lam: float = 0.1,
    bidirectional: bool = False,
    episodes_per_batch: int = 250,
    class_names: Sequence[str] | None = None,
    drop_small_classes: bool = False,
    progress: bool = True,
    head_embeddings: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Accuracy of every scorer on `num_episodes` episodes drawn from embedded videos.

    Args:
      embeddings: `[N, T, D]` features of every video of the split.
      labels: `[N]` int class of each video.
      head_embeddings: `[N, F]` a learned head's embeddings of the same videos (`tam_jax.heads`), for the
        scorers "trn" / "cmn".

    Returns:
      scorer -> `[num_episodes]` per-episode accuracies (fractions).
    """
    scorers = tuple(scorers)
    sampler = EpisodeSampler(
        labels, way=way, shot=shot, queries=queries, seed=seed, class_names=class_names,
        drop_small_classes=drop_small_classes,
    )
    device_embeddings = jnp.asarray(embeddings)
    device_heads = None if head_embeddings is None else jnp.asarray(head_embeddings)
    static = dict(way=way, shot=shot, scorers=scorers, lam=lam, bidirectional=bidirectional)
    per_scorer = []
    starts = range(0, num_episodes, episodes_per_batch)
    for start in _progress(starts, len(starts), "episodes", progress):
        # Every chunk has the same shape (the last one padded) so the step compiles once.
        indices = np.arange(start, start + episodes_per_batch)
        support, query, episode_labels = episode_index_arrays(sampler, indices)
        accuracies = _cached_episode_accuracies(
            device_embeddings, device_heads, support, query, episode_labels, **static
        )
        per_scorer.append(np.asarray(accuracies)[:, : num_episodes - start])
    stacked = np.concatenate(per_scorer, axis=1)
    return {name: stacked[i] for i, name in enumerate(scorers)}


def mean_and_ci95(per_episode: np.ndarray) -> tuple[float, float]:
    """Mean accuracy and the half-width of its 95% confidence interval (1.96 standard errors)."""
    values = np.asarray(per_episode, np.float64)
    if values.size < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(_Z95 * values.std(ddof=1) / math.sqrt(values.size))


def result_records(
    per_scorer: dict[str, np.ndarray], *, split: str, way: int, shot: int
) -> list[dict]:
    """Per-scorer accuracies -> records {split, scorer, way, shot, episodes, accuracy, ci95}."""
    records = []
    for scorer, values in per_scorer.items():
        mean, ci95 = mean_and_ci95(values)
        records.append(
            dict(split=split, scorer=scorer, way=way, shot=shot, episodes=int(len(values)),
                 accuracy=mean, ci95=ci95)
        )
    return records


def write_results(path: str | os.PathLike, records: list[dict]) -> list[dict]:
    """Merge `records` into the JSON list at `path` (replacing ones with the same split, scorer, way and
    shot), write it atomically, and return the merged list."""
    key = lambda r: (r["split"], r["scorer"], r["way"], r["shot"])
    existing = []
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
    merged = {key(r): r for r in existing}
    merged.update({key(r): r for r in records})
    ordered = sorted(merged.values(), key=key)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(ordered, f, indent=2)
    os.replace(temporary, path)
    return ordered


def format_results(records: list[dict]) -> str:
    """Records -> a markdown table, accuracies in percent with their 95% intervals."""
    lines = ["| split | scorer | way | shot | episodes | accuracy (%) |", "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['split']} | {r['scorer']} | {r['way']} | {r['shot']} | {r['episodes']} | "
            f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} |"
        )
    return "\n".join(lines)
