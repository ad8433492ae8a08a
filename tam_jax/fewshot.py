"""One episode's embeddings -> class distances -> logits, loss and accuracy (Eq. 8).

Scorers: the alignment methods of `tam_jax.alignment` ("tam", "plain_dtw", "diagonal", "mean", "min"),
which compare every query video with every support video frame by frame, and "tsn" (TSN++ of Table 1),
which compares mean-pooled video features. The learned scorers "trn" and "cmn" (TRN++ and CMN++ of
Table 1) compare the video embeddings of a trained head (`tam_jax.heads`), passed in as `head_query` and
`head_support`. Support videos are ordered class-major: the k shots of class c are rows c*k .. c*k + k - 1.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

from tam_jax import alignment

SCORERS = (*alignment.METHODS, "tsn")  # need only frame features
HEAD_SCORERS = ("trn", "cmn")  # need the video embeddings of a learned head (tam_jax.heads)
ALL_SCORERS = (*SCORERS, *HEAD_SCORERS)  # every scorer a run can train with (config.fewshot.scorer)


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
    method: str = "tam",
    lam: float = 0.1,
    bidirectional: bool = False,
) -> jax.Array:
    """Distance of each query video to each class of the episode.

    With an alignment method, a class's distance is the mean over its `shot` support videos of the
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
        query, support, way=way, shot=shot, scorers=(method,), lam=lam, bidirectional=bidirectional,
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
    """Eq. 8's logits, -distance / temperature: `[..., way]` -> `[..., way]`."""
    return -distances / temperature


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over queries (Eq. 8): logits `[..., Nq, way]`, labels `[..., Nq]` int."""
    chex.assert_equal_shape_prefix([logits, labels], labels.ndim)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of queries whose nearest class is right: logits `[..., Nq, way]`, labels `[..., Nq]`."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
