"""TSN++ (Table 1's first baseline): mean-pooled frame features, compared with class prototypes.

A video is the mean of its T frame features; a class's prototype is the mean of its support videos'; the
distance is 1 - cos(query, prototype). No parameters; blind to frame order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tam_jax.methods import Method, class_means, cosine_distance, register


@register
class TSN(Method):
    name, label, baseline = "tsn", "TSN++", True
    tables = {1: 1}
    published = {"kinetics": (64.5, 77.9), "ssv2_full": (33.6, 43.0)}
    citation = "Cao et al., CVPR 2020, Table 1"

    def video_embeddings(self, params, frames: jax.Array) -> jax.Array:
        return jnp.mean(frames.astype(jnp.float32), axis=-2)  # [N, T, D] -> [N, D]

    def class_distances(self, params, query, support, support_labels, num_classes, *, rng=None) -> jax.Array:
        return prototype_distances(query, support, support_labels, num_classes)


def prototype_distances(query: jax.Array, support: jax.Array, labels: jax.Array,
                        num_classes: int) -> jax.Array:
    """1 - cos of each query vector `[Nq, E]` to each class's mean support vector (`[Ns, E]`, labels
    `[Ns]`): `[Nq, C]` (TSN++, TRN++)."""
    prototypes = class_means(support, labels, num_classes)  # [C, E]
    return cosine_distance(query.astype(jnp.float32), prototypes)
