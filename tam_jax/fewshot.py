"""One episode's embeddings -> class distances -> logits, loss and accuracy (Eq. 8).

Scorers: the alignment scorers of `tam_jax.alignment` ("tam", "plain_dtw", "diagonal", "mean", "min"),
which compare every query video with every support video frame by frame, and "tsn" (TSN++ of Table 1),
which compares mean-pooled video features. The learned scorers "trn" and "cmn" (TRN++ and CMN++ of
Table 1) compare the video embeddings of a trained head (`tam_jax.heads`), passed in as `head_query` and
`head_support`. Support videos are ordered class-major: the k shots of class c are rows c*k .. c*k + k - 1.

Logits (Eq. 8) are -scale * distance / temperature. TAM's distance sums T cosine distances, in [0, 2T];
every other scorer but plain DTW gives one cosine distance (or a mean of them), in [0, 2], whose softmax at
temperature 1 is nearly flat: the lowest 5-way loss it allows is log(1 + 4 e^-2) = 0.43 (`loss_floor`).
`logit_scale` gives each scorer its factor (config.fewshot.logit_scale): by default the paper's Eq. 8 for
the scorers the paper trains with it, and TAM's range for the baselines it takes from other papers.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import optax

from tam_jax import alignment

SCORERS = (*alignment.SCORERS, "tsn")  # need only frame features
HEAD_SCORERS = ("trn", "cmn")  # need the video embeddings of a learned head (tam_jax.heads)
ALL_SCORERS = (*SCORERS, *HEAD_SCORERS)  # every scorer a run can train with (config.fewshot.scorer)
# Scorers whose video distance sums frame distances along an alignment path: TAM one per support frame,
# in [0, 2T]; plain DTW T to 2T - 1 of them. Every other scorer's is in [0, 2].
SUMMING_SCORERS = ("tam", "plain_dtw")
# Table 1's baselines (TSN++, TRN++, CMN++), adapted from other papers; the paper does not say how their
# distances enter Eq. 8, and at scale 1 they cannot fit (see `loss_floor`).
BASELINE_SCORERS = ("tsn", "trn", "cmn")
# config.fewshot.logit_scale -> the scorers whose distances it multiplies by T (see `logit_scale`).
SCALED_SCORERS = {
    "paper": BASELINE_SCORERS,
    "frames": tuple(s for s in ALL_SCORERS if s not in SUMMING_SCORERS),
    "none": (),
}
LOGIT_SCALES = tuple(SCALED_SCORERS)


def check_scorer(name: str, *, learned: bool = False) -> None:
    """Raise a ValueError naming the valid scorers when `name` is not one of them (`learned`: of
    ALL_SCORERS)."""
    valid = ALL_SCORERS if learned else SCORERS
    if name not in valid:
        raise ValueError(f"Unknown scorer {name!r}; valid scorers are {', '.join(valid)}.")


def class_distances(
    query: jax.Array,
    support: jax.Array,
    head_query: jax.Array | None = None,
    head_support: jax.Array | None = None,
    *,
    way: int,
    shot: int,
    scorer: str = "tam",
    lam: float = 0.1,
    bidirectional: bool = False,
) -> jax.Array:
    """Distance of each query video to each class of the episode.

    With an alignment scorer, a class's distance is the mean over its `shot` support videos of the
    query-support video distance (Eq. 8's setting for k > 1). With "tsn", frame features are mean-pooled
    into one vector per video and the distance is 1 - cos(query, mean of the class's support vectors).
    "trn" does the same with the head's embeddings; "cmn" takes 1 - the largest cosine similarity to the
    class's support embeddings.

    Args:
      query: `[Nq, Tq, D]` frame features.
      support: `[way * shot, Ts, D]` frame features, class-major.
      head_query, head_support: `[Nq, E]` and `[way * shot, E]` head embeddings of the same videos
        ("trn" and "cmn" only).

    Returns:
      `[Nq, way]` float32 distances.
    """
    return class_distances_for_scorers(
        query, support, way=way, shot=shot, scorers=(scorer,), lam=lam, bidirectional=bidirectional,
        head_query=head_query, head_support=head_support,
    )[0]


def class_distances_for_scorers(
    query: jax.Array,
    support: jax.Array,
    *,
    way: int,
    shot: int,
    scorers: tuple[str, ...],
    lam: float = 0.1,
    bidirectional: bool = False,
    head_query: jax.Array | None = None,
    head_support: jax.Array | None = None,
) -> jax.Array:
    """`class_distances` for several scorers at once, sharing one frame-distance computation.

    Returns:
      `[len(scorers), Nq, way]` float32.
    """
    for name in scorers:
        check_scorer(name, learned=True)
        if name in HEAD_SCORERS and (head_query is None or head_support is None):
            raise ValueError(
                f"Scorer {name!r} compares the embeddings of its learned head: pass head_query and "
                "head_support (tam_jax.heads.video_embeddings of a run trained with "
                f"config.fewshot.scorer={name!r})."
            )
    chex.assert_rank([query, support], 3)
    chex.assert_axis_dimension(support, 0, way * shot)
    num_queries = query.shape[0]
    frame_distances = None
    results = []
    for name in scorers:
        if name == "tsn":
            pooled_query = jnp.mean(query.astype(jnp.float32), axis=1)
            pooled_support = jnp.mean(support.astype(jnp.float32), axis=1)
            results.append(prototype_distances(pooled_query, pooled_support, way=way, shot=shot))
            continue
        if name == "trn":
            results.append(prototype_distances(head_query, head_support, way=way, shot=shot))
            continue
        if name == "cmn":
            results.append(nearest_support_distances(head_query, head_support, way=way, shot=shot))
            continue
        if frame_distances is None:  # [Nq, way * shot, Tq, Ts], Eq. 1
            frame_distances = alignment.cosine_distance(query[:, None], support[None])
        per_video = alignment.alignment_distance(
            frame_distances, name, lam, bidirectional and name == "tam"
        )
        results.append(jnp.mean(per_video.reshape(num_queries, way, shot), axis=-1))
    return jnp.stack(results)


def class_distances_by_label(
    query: jax.Array,
    support: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    scorer: str = "tam",
    lam: float = 0.1,
    bidirectional: bool = False,
) -> jax.Array:
    """`class_distances` for any number of support videos per class (prediction's support sets).

    A class's distance is the mean over its support videos of the query-video distance ("tsn": 1 - cos of
    the mean-pooled query and the mean of the class's mean-pooled videos). With equal shots, class-major,
    this equals `class_distances`. Frame-feature scorers only (`SCORERS`).

    Args:
      query: `[Nq, T, D]` frame features.
      support: `[Ns, T, D]` frame features.
      labels: int `[Ns]`, each support video's class in 0..num_classes-1, every class at least once.

    Returns:
      float32 `[Nq, num_classes]`.
    """
    check_scorer(scorer)
    chex.assert_rank([query, support], 3)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # [Ns, C]
    averaging = one_hot / jnp.sum(one_hot, axis=0)
    if scorer == "tsn":
        prototypes = averaging.T @ jnp.mean(support.astype(jnp.float32), axis=1)  # [C, D]
        return alignment.cosine_distance(jnp.mean(query.astype(jnp.float32), axis=1), prototypes)
    per_video = alignment.pairwise_distance(query, support, scorer, lam, bidirectional and scorer == "tam")
    return per_video.astype(jnp.float32) @ averaging


def prototype_distances(query: jax.Array, support: jax.Array, *, way: int, shot: int) -> jax.Array:
    """1 - cos of each query vector to each class's mean support vector: `[Nq, E]`, `[way*shot, E]` ->
    `[Nq, way]` (TSN++ and TRN++)."""
    prototypes = jnp.mean(support.astype(jnp.float32).reshape(way, shot, -1), axis=1)
    return alignment.cosine_distance(query.astype(jnp.float32), prototypes)


def nearest_support_distances(query: jax.Array, support: jax.Array, *, way: int, shot: int) -> jax.Array:
    """1 - the largest cos of each query vector to a class's support vectors (CMN++'s memory read):
    `[Nq, E]`, `[way*shot, E]` -> `[Nq, way]`."""
    per_video = alignment.cosine_distance(query.astype(jnp.float32), support.astype(jnp.float32))
    return jnp.min(per_video.reshape(query.shape[0], way, shot), axis=-1)


def logits_from_distances(distances: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """Eq. 8's logits, -distance / temperature: `[..., way]` -> `[..., way]`.

    `temperature` is the effective one: a scorer's `logit_scale` divides it (`tam_jax.train.temperature`).
    """
    return -distances / temperature


def logit_scale(scorer: str, num_frames: int, mode: str = "paper") -> float:
    """The factor a scorer's distances are multiplied by in Eq. 8's logits, -scale * distance / temperature.

    A distance that is one cosine distance or a mean of them lies in [0, 2]; at scale 1 it cannot get below
    `loss_floor(way, 2)` (0.43, 5-way) and trains weakly. T = `num_frames` puts it on TAM's [0, 2T].
    - "paper" (the default): 1 for the scorers of the paper's Table 2 (tam, plain_dtw, diagonal, mean, min),
      Eq. 8 as the paper trains them; T for Table 1's baselines (tsn, trn, cmn), so they can learn.
    - "frames": T for every [0, 2] scorer (the baselines and diagonal, mean, min); 1 for tam, plain_dtw.
    - "none": 1 for every scorer, Eq. 8 as written.
    Accuracy never depends on the scale (the nearest class is the same); only the training signal does.
    """
    check_scorer(scorer, learned=True)
    if mode not in LOGIT_SCALES:
        raise ValueError(f"config.fewshot.logit_scale={mode!r} is not one of {', '.join(LOGIT_SCALES)}.")
    return float(num_frames) if scorer in SCALED_SCORERS[mode] else 1.0


def loss_floor(way: int, distance_range: float, temperature: float = 1.0) -> float:
    """The lowest mean cross-entropy (Eq. 8) logits -distance / temperature allow when distances lie in
    [0, distance_range]: the right class at 0 and the way - 1 others at distance_range, for every query.

    `loss_floor(5, 2.0)` = log(1 + 4 e^-2) = 0.432: a [0, 2] scorer at temperature 1.
    """
    return math.log1p((way - 1) * math.exp(-distance_range / temperature))


def bounded_temperature(log_temperature: jax.Array, low: float, high: float) -> jax.Array:
    """A learned temperature exp(log_temperature) clamped to [low, high], scalar -> scalar.

    The clamp is on the logarithm, so exp never overflows; beyond a bound the gradient is 0 and the optimiser
    stops pushing it (a temperature going to 0 makes the logits overflow, to infinity the softmax flat).
    """
    chex.assert_rank(log_temperature, 0)
    if not 0 < low <= high:
        raise ValueError(
            f"Temperature bounds must satisfy 0 < low <= high, got [{low}, {high}] "
            "(config.fewshot.min_temperature, config.fewshot.max_temperature)."
        )
    return jnp.exp(jnp.clip(log_temperature, math.log(low), math.log(high)))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over queries (Eq. 8): logits `[..., Nq, way]`, labels `[..., Nq]` int."""
    chex.assert_equal_shape_prefix([logits, labels], labels.ndim)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of queries whose nearest class is right: logits `[..., Nq, way]`, labels `[..., Nq]`."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
