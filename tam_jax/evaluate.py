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

from tam_jax import fewshot, hosts, methods, progress, results
from tam_jax.configuration import csv_values, eval_queries
from tam_jax.data import pipeline
from tam_jax.data.episodes import EpisodeSampler
from tam_jax.data.report import SkipReport
from tam_jax.embedding import Embedder, embed_share, map_batches


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
    scorers: tuple[methods.Method, ...],
    params,
    support: tuple[jax.Array, ...],
    query: tuple[jax.Array, ...],
    labels: jax.Array,
    *,
    way: int,
    shot: int,
) -> jax.Array:
    """Per-episode accuracy of each method.

    Args:
      scorers: the methods (`tam_jax.methods`).
      params: the learned method's parameters (state.params["head"]), or None.
      support: per method, its video embeddings of each episode's support, `[E, way*shot, ...]`, class-major.
      query: per method, `[E, Nq, ...]`.
      labels: `[E, Nq]` int, the episode class of each query.

    Returns:
      `[len(scorers), E]` float32.
    """
    support_labels = methods.episode_labels(way, shot)

    def one_episode(s, q, y):
        return jnp.stack([
            fewshot.accuracy(-method.class_distances(params, qi, si, support_labels, way), y)
            for method, si, qi in zip(scorers, s, q, strict=True)
        ])

    return jax.vmap(one_episode, out_axes=1)(support, query, labels)


def frame_episode_accuracies(scorers: tuple[methods.Method, ...], params, support: jax.Array,
                             query: jax.Array, labels: jax.Array, *, way: int, shot: int) -> jax.Array:
    """`episode_accuracies` from frame features, support `[E, way*shot, T, D]` and query `[E, Nq, T, D]`:
    each method embeds the videos itself (`video_embeddings`). Returns `[len(scorers), E]`."""
    embed = lambda m, x: jax.vmap(functools.partial(m.video_embeddings, params))(x)
    return episode_accuracies(scorers, params, tuple(embed(m, support) for m in scorers),
                              tuple(embed(m, query) for m in scorers), labels, way=way, shot=shot)


def embedding_key(method: methods.Method) -> str:
    """Methods that compare the frame features themselves share them ("frames"); any other's embeddings
    are its own (its name)."""
    return "frames" if type(method).video_embeddings is methods.Method.video_embeddings else method.name


@functools.partial(jax.jit, static_argnames=("scorers", "way", "shot"))
def _cached_episode_accuracies(embeddings: dict, params, support_rows, query_rows, labels, *, scorers, way,
                               shot):
    """`episode_accuracies` on rows of the embedded split: each embedding gathered once per batch, however
    many methods share it."""
    gathered = {k: (v[support_rows], v[query_rows]) for k, v in embeddings.items()}
    keys = [embedding_key(m) for m in scorers]
    return episode_accuracies(scorers, params, tuple(gathered[k][0] for k in keys),
                              tuple(gathered[k][1] for k in keys), labels, way=way, shot=shot)


def method_embeddings(scorers, params, features: np.ndarray | dict[str, np.ndarray],
                      batch_size: int = 256) -> dict[str, np.ndarray]:
    """Each method's video embeddings of a split's frame features `[N, T, D]`, by `embedding_key`; "frames"
    is `features` itself. `features` may be such a dict already: only what it lacks is computed."""
    found = dict(features) if isinstance(features, dict) else {"frames": features}
    features = found["frames"]
    for method in scorers:
        key = embedding_key(method)
        if key not in found:
            embed = functools.partial(_video_embeddings, method, params)
            found[key] = map_batches(embed, features, batch_size)
    return found


@functools.partial(jax.jit, static_argnums=0)
def _video_embeddings(method: methods.Method, params, frames: jax.Array) -> jax.Array:
    """`method.video_embeddings`, compiled once per method and shape (methods are hashable)."""
    return method.video_embeddings(params, frames)


def evaluate_embeddings(
    embeddings: np.ndarray | dict[str, np.ndarray],
    labels: np.ndarray,
    *,
    way: int,
    shot: int,
    queries: int,
    num_episodes: int,
    seed: int,
    scorers: Sequence[methods.Method],
    params=None,
    episodes_per_batch: int = 250,
    class_names: Sequence[str] | None = None,
    drop_small_classes: bool = False,
    show_progress: bool = True,
) -> dict[str, np.ndarray]:
    """Accuracy of every method on `num_episodes` episodes drawn from embedded videos.

    Args:
      embeddings: `[N, T, D]` frame features of every video of the split, or `method_embeddings`' dict.
      labels: `[N]` int class of each video.
      scorers: the methods (`tam_jax.methods.build`).
      params: the learned method's parameters, or None.

    Returns:
      method name -> `[num_episodes]` per-episode accuracies (fractions).
    """
    scorers = tuple(scorers)
    embeddings = method_embeddings(scorers, params, embeddings)
    sampler = EpisodeSampler(
        labels, way=way, shot=shot, queries=queries, seed=seed, class_names=class_names,
        drop_small_classes=drop_small_classes,
    )
    needed = {embedding_key(m) for m in scorers}
    device_embeddings = {k: jnp.asarray(v) for k, v in embeddings.items() if k in needed}
    params = None if params is None else jax.device_put(params)  # once, not with every batch
    per_scorer = []
    starts = range(0, num_episodes, episodes_per_batch)
    for start in progress.track(starts, len(starts), "episodes", "batch", enabled=show_progress):
        # Every chunk has the same shape (the last one padded) so the step compiles once.
        indices = np.arange(start, start + episodes_per_batch)
        support, query, episode_labels = episode_index_arrays(sampler, indices)
        accuracies = _cached_episode_accuracies(
            device_embeddings, params, support, query, episode_labels, scorers=scorers, way=way, shot=shot
        )
        per_scorer.append(np.asarray(accuracies)[:, : num_episodes - start])
    stacked = np.concatenate(per_scorer, axis=1)
    return {method.name: stacked[i] for i, method in enumerate(scorers)}


# ----------------------------------------------------------------------------------------------------
# Evaluators.

# Episodes of each split are drawn with config.seed + this offset (training episodes use config.seed),
# so validation and test episodes differ from each other and from training's.
EPISODE_SEED_OFFSETS = {"train": 0, "val": 1, "test": 2}


def episode_seed(config: ml_collections.ConfigDict, split: str) -> int:
    """The seed of the episodes a run evaluates on `split`."""
    return config.seed + EPISODE_SEED_OFFSETS.get(split, EPISODE_SEED_OFFSETS["test"])


def eval_scorers(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The methods a run's final evaluation scores (`tam_jax.methods.evaluated`)."""
    return methods.evaluated(config)


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
    """A split embedded with one state: frame features `[N, T, D]`, labels `[N]`, the learned method's
    parameters (None without one) and each method's video embeddings (`method_embeddings`, filled in as
    methods are scored)."""

    features: np.ndarray
    labels: np.ndarray
    params: object = None
    embeddings: dict = dataclasses.field(default_factory=dict)


class FewShotEvaluator:
    """Few-shot accuracy of a state on one split: the split's clips are loaded once (each process its
    share), then `run(state)` embeds them with the state's weights and scores `num_episodes` episodes of
    every shot with every scorer.

    Args:
      config: the run's config (data, fewshot, alignment, methods, eval, seed).
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
        """Embed the split with `state`'s embedder; keep its learned method's parameters, if any."""
        from tam_jax.train_state import embedder_variables

        embedder = Embedder(self.model, embedder_variables(state), self.mesh,
                            batch_size=self.config.eval.embed_batch_size)
        features = embed_share(embedder, self.clips, show_progress=self.show_progress)
        params = state.params.get("head")
        return Embedded(features, self.clips.labels, None if params is None else hosts.local_copy(params))

    def scoring_methods(self) -> tuple[methods.Method, ...]:
        """The methods this evaluator scores, with the config's settings."""
        return tuple(methods.build(name, self.config) for name in self.scorers)

    def score(self, embedded: Embedded, *, scorers: Sequence[methods.Method] | None = None,
              show_progress: bool = True) -> list[dict]:
        """Records {split, scorer, way, shot, episodes, accuracy, ci95} of every shot and method (`scorers`,
        default `scoring_methods()`)."""
        config, scorers = self.config, tuple(scorers or self.scoring_methods())
        embedded.embeddings = method_embeddings(scorers, embedded.params,
                                                {"frames": embedded.features, **embedded.embeddings})
        records = []
        for shot in self.shots:
            per_scorer = evaluate_embeddings(
                embedded.embeddings, embedded.labels, way=config.fewshot.way, shot=shot,
                queries=eval_queries(config), num_episodes=self.num_episodes,
                seed=episode_seed(config, self.split), scorers=scorers, params=embedded.params,
                episodes_per_batch=min(config.eval.episodes_per_batch, self.num_episodes),
                class_names=self.data.source.class_names, drop_small_classes=config.data.drop_small_classes,
                show_progress=self.show_progress and show_progress,
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
