"""One episode's embeddings -> class distances -> logits, loss and accuracy (Eq. 8).

Scorers: the alignment methods of `tam_jax.alignment` ("tam", "plain_dtw", "diagonal", "mean", "min"),
which compare every query video with every support video frame by frame, and "tsn" (TSN++ of Table 1),
which compares mean-pooled video features. Support videos are ordered class-major: the k shots of
class c are rows c*k .. c*k + k - 1.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

from tam_jax import alignment

SCORERS = (*alignment.METHODS, "tsn")


def check_scorer(name: str) -> None:
    """Raise a ValueError naming the valid scorers when `name` is not one of them."""
    if name not in SCORERS:
        raise ValueError(f"Unknown scorer {name!r}; valid scorers are {', '.join(SCORERS)}.")


def class_distances(
    query: jax.Array,
    support: jax.Array,
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

    Args:
      query: `[Nq, Tq, D]` frame features.
      support: `[way * shot, Ts, D]` frame features, class-major.

    Returns:
      `[Nq, way]` float32 distances.
    """
    return class_distances_for_scorers(
        query, support, way=way, shot=shot, scorers=(method,), lam=lam, bidirectional=bidirectional
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
) -> jax.Array:
    """`class_distances` for several scorers at once, sharing one frame-distance computation.

    Returns:
      `[len(scorers), Nq, way]` float32.
    """
    for name in scorers:
        check_scorer(name)
    chex.assert_rank([query, support], 3)
    chex.assert_axis_dimension(support, 0, way * shot)
    num_queries = query.shape[0]
    frame_distances = None
    results = []
    for name in scorers:
        if name == "tsn":
            pooled_query = jnp.mean(query.astype(jnp.float32), axis=1)
            pooled_support = jnp.mean(support.astype(jnp.float32), axis=1)
            prototypes = jnp.mean(pooled_support.reshape(way, shot, -1), axis=1)
            results.append(alignment.cosine_distance(pooled_query, prototypes))
            continue
        if frame_distances is None:  # [Nq, way * shot, Tq, Ts], Eq. 1
            frame_distances = alignment.cosine_distance(query[:, None], support[None])
        per_video = alignment.alignment_distance(
            frame_distances, name, lam, bidirectional and name == "tam"
        )
        results.append(jnp.mean(per_video.reshape(num_queries, way, shot), axis=-1))
    return jnp.stack(results)


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
