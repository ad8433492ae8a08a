"""CMN++ (Table 1's second baseline): a learned multi-saliency embedding, matched by nearest neighbour.

The head starts with a per-frame linear projection to `dim` channels and maps a video `[T, D]` to one
embedding `[num_saliency * dim]`; it trains with the embedder (state.params["head"]).

CMN++ (Zhu & Yang, ECCV 2018, the multi-saliency embedding and compound memory): `num_saliency` learned
saliency queries attend over the T projected frames (softmax over time, scaled by 1/sqrt(dim)); the M
attended vectors are concatenated (CMN's flattened multi-saliency descriptor; normalisation happens in the
cosine). The compound memory is simplified to its read in an episode: the memory holds the support keys
grouped by class, and a class's distance is 1 - the largest cosine similarity between the query key and
that class's keys (nearest neighbour, CMN's memory read). No positional information is added, so CMN++ is,
like the paper's, permutation-invariant: an order-blind baseline, as TSN++ is.
"""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from tam_jax.domains import at_least
from tam_jax.methods import HeadMethod, class_minimum, cosine_distance, register


class CMNHead(nn.Module):
    """CMN++: multi-saliency embedding, `[B, T, D]` -> `[B, num_saliency * dim]` (permutation-invariant).

    Attributes:
      dim: width of the frame projection and of each saliency vector.
      num_saliency: M, the learned saliency queries.
    """

    dim: int = 256
    num_saliency: int = 4

    @nn.compact
    def __call__(self, frames: jax.Array) -> jax.Array:
        chex.assert_rank(frames, 3)
        x = nn.Dense(self.dim, name="project")(frames.astype(jnp.float32))  # [B, T, dim]
        queries = self.param("saliency", nn.initializers.normal(1.0), (self.num_saliency, self.dim))
        weights = jax.nn.softmax(jnp.einsum("md,btd->bmt", queries, x) / math.sqrt(self.dim), axis=-1)
        descriptors = jnp.einsum("bmt,btd->bmd", weights, x)  # [B, M, dim]
        return descriptors.reshape(x.shape[0], -1)


@register
class CMN(HeadMethod):
    name, label, baseline = "cmn", "CMN++", True
    tables = {1: 2}
    published = {"kinetics": (65.4, 78.8), "ssv2_full": (34.4, 43.8)}
    citation = "Cao et al., CVPR 2020, Table 1"
    defaults = {"dim": 256, "saliencies": 4}  # projection width; saliency queries M (embedding M * dim)
    domains = {"dim": at_least(1), "saliencies": at_least(1)}

    @property
    def head(self) -> CMNHead:
        return CMNHead(dim=self.options.dim, num_saliency=self.options.saliencies)

    def class_distances(self, params, query, support, support_labels, num_classes, *, rng=None):
        """1 - the largest cos of each query embedding to a class's support embeddings (CMN's memory read)."""
        per_video = cosine_distance(query.astype(jnp.float32), support.astype(jnp.float32))
        return class_minimum(per_video, support_labels, num_classes)
