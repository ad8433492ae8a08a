"""Few-shot evaluation: embed every video of a split once, then score many episodes on the embeddings.

Test-time transforms are deterministic (centre crop, middle frame of each segment), so a video's embedding
is the same in every episode it appears in; embedding each test video once and gathering rows per episode
gives the same accuracies as embedding each episode afresh, at a fraction of the cost. Every scorer is
computed from the same embeddings in one pass.

    evaluator = FewShotEvaluator.for_test(config, mesh, model, report)    # loads the split's clips once
    for name, value in evaluator.run(state):                              # embeds, scores, -> metrics
        ...                                                               # ("accuracy/tam/1shot", 0.73)

`FewShotEvaluator.for_validation` serves the training loop, `records` the `--mode=eval` run
(`tam_jax.eval_workdir`), and `tam_jax.visualize` re-scores one embedding at many lambdas with `score`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tam_jax import fewshot, heads, hosts, progress, results
from tam_jax.configuration import csv_values, eval_queries
from tam_jax.data import pipeline
from tam_jax.data.episodes import EpisodeSampler
from tam_jax.data.report import SkipReport
from tam_jax.embedding import Embedder, embed_share


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


def evaluate_embeddings(
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
    show_progress: bool = True,
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
    for start in progress.track(starts, len(starts), "episodes", "batch", enabled=show_progress):
        # Every chunk has the same shape (the last one padded) so the step compiles once.
        indices = np.arange(start, start + episodes_per_batch)
        support, query, episode_labels = episode_index_arrays(sampler, indices)
        accuracies = _cached_episode_accuracies(
            device_embeddings, device_heads, support, query, episode_labels, **static
        )
        per_scorer.append(np.asarray(accuracies)[:, : num_episodes - start])
    stacked = np.concatenate(per_scorer, axis=1)
    return {name: stacked[i] for i, name in enumerate(scorers)}


# ----------------------------------------------------------------------------------------------------
# Evaluators.

# Episodes of each split are drawn with config.seed + this offset (training episodes use config.seed),
# so validation and test episodes differ from each other and from training's.
EPISODE_SEED_OFFSETS = {"train": 0, "val": 1, "test": 2}


def episode_seed(config: ml_collections.ConfigDict, split: str) -> int:
    """The seed of the episodes a run evaluates on `split`."""
    return config.seed + EPISODE_SEED_OFFSETS.get(split, EPISODE_SEED_OFFSETS["test"])


def eval_scorers(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`config.eval.scorers`, led by the run's own scorer when it trained a head ("trn" / "cmn")."""
    scorers = csv_values(config.eval.scorers)
    scorer = config.fewshot.scorer
    if scorer in fewshot.HEAD_SCORERS and scorer not in scorers:
        scorers = (scorer, *scorers)
    return scorers


def eval_shots(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The shots the final evaluation scores: `config.eval.shots`, or `config.fewshot.shot`."""
    return csv_values(config.eval.shots, int) or (config.fewshot.shot,)


def prepare_eval_split(
    config: ml_collections.ConfigDict, split: str, report: SkipReport, shots: Sequence[int]
) -> pipeline.UsableSplit:
    """`split` checked as evaluation samples it: episodes of every shot of `shots` with `eval_queries`
    queries per class. Raises DataError (naming the split and the fix) if they cannot be drawn."""
    return pipeline.prepare_split(config, split, report, shots=tuple(shots), queries=eval_queries(config))


@dataclasses.dataclass
class Embedded:
    """A split embedded with one state: frame features `[N, T, D]`, the learned head's video embeddings
    `[N, F]` (None without a head), and labels `[N]`."""

    features: np.ndarray
    head_features: np.ndarray | None
    labels: np.ndarray


class FewShotEvaluator:
    """Few-shot accuracy of a state on one split: the split's clips are loaded once (each process its
    share), then `run(state)` embeds them with the state's weights and scores `num_episodes` episodes of
    every shot with every scorer.

    Args:
      config: the run's config (data, fewshot, alignment, eval, head, seed).
      split: "val" or "test" (or "train").
      mesh: the run's mesh; each process embeds its share on its own devices.
      model: the frame embedder.
      report: where unreadable videos are recorded.
      scorers, shots, num_episodes: what to evaluate.
      show_progress: progress bars while embedding and scoring (on the chief process).
    """

    def __init__(self, config, split: str, mesh, model, report: SkipReport, *, scorers: Sequence[str],
                 shots: Sequence[int], num_episodes: int, show_progress: bool = True):
        self.config, self.split, self.mesh, self.model = config, split, mesh, model
        self.show_progress = show_progress
        self.scorers, self.shots, self.num_episodes = tuple(scorers), tuple(shots), int(num_episodes)
        self.report = report
        self.data = prepare_eval_split(config, split, report, self.shots)

    @functools.cached_property
    def clips(self) -> pipeline.ClipShare:
        """This process's share of the split's test-time clips, loaded on first use."""
        return pipeline.load_clip_share(self.config, self.data, self.report)

    @classmethod
    def for_validation(cls, config, mesh, model, report: SkipReport) -> FewShotEvaluator:
        """The training loop's model selection: the run's own scorer and shot on `train.val_episodes`."""
        return cls(config, "val", mesh, model, report, scorers=(config.fewshot.scorer,),
                   shots=(config.fewshot.shot,), num_episodes=config.train.val_episodes, show_progress=False)

    @classmethod
    def for_test(cls, config, mesh, model, report: SkipReport, *, split: str | None = None,
                 shots: Sequence[int] = (), num_episodes: int | None = None,
                 show_progress: bool = True) -> FewShotEvaluator:
        """The final evaluation: `eval_scorers` on `eval.split`, every shot of `eval.shots` (or
        `fewshot.shot`), `eval.num_episodes` episodes; each can be overridden."""
        shots = tuple(shots) or eval_shots(config)
        return cls(config, split or config.eval.split, mesh, model, report, scorers=eval_scorers(config),
                   shots=shots, num_episodes=num_episodes or config.eval.num_episodes,
                   show_progress=show_progress)

    def embed(self, state) -> Embedded:
        """Embed the split with `state`'s embedder (and its head, if it has one)."""
        from tam_jax.train_state import embedder_variables

        embedder = Embedder(self.model, embedder_variables(state), self.mesh,
                            batch_size=self.config.eval.embed_batch_size)
        features = embed_share(embedder, self.clips, show_progress=self.show_progress)
        head = heads.build_head(self.config)
        head_features = None
        if head is not None:
            head_features = heads.embed_features(head, hosts.local_copy(state.params["head"]), features)
        return Embedded(features, head_features, self.clips.labels)

    def score(self, embedded: Embedded, *, lam: float | None = None, scorers: Sequence[str] | None = None,
              show_progress: bool = True) -> list[dict]:
        """Records {split, scorer, way, shot, episodes, accuracy, ci95} of every shot and scorer, at the
        config's `alignment.lam` unless `lam` is given."""
        config, scorers = self.config, tuple(scorers or self.scorers)
        lam = config.alignment.lam if lam is None else lam
        records = []
        for shot in self.shots:
            per_scorer = evaluate_embeddings(
                embedded.features, embedded.labels, way=config.fewshot.way, shot=shot,
                queries=eval_queries(config), num_episodes=self.num_episodes,
                seed=episode_seed(config, self.split), scorers=scorers, lam=float(lam),
                bidirectional=config.alignment.bidirectional,
                episodes_per_batch=min(config.eval.episodes_per_batch, self.num_episodes),
                class_names=self.data.source.class_names, drop_small_classes=config.data.drop_small_classes,
                show_progress=self.show_progress and show_progress,
                head_embeddings=embedded.head_features,
            )
            records += results.result_records(per_scorer, split=self.split, way=config.fewshot.way, shot=shot)
        return records

    def records(self, state) -> list[dict]:
        """`score(embed(state))`: the records of every shot and scorer."""
        return self.score(self.embed(state))

    def run(self, state) -> Iterator[tuple[str, float]]:
        """(name, value) of every metric, e.g. ("accuracy/tam/1shot", 0.73), ("ci95/tam/1shot", 0.004)."""
        yield from results.metrics(self.records(state))

    @property
    def selection_metric(self) -> str:
        """The metric that picks the best checkpoint: the first scorer's accuracy at the first shot."""
        return results.metric_name("accuracy", self.scorers[0], self.shots[0])
