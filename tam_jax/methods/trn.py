"""TRN++ (Table 1's third baseline): a learned temporal relation head on the fine-tuned frame features.

The head starts with a per-frame linear projection to `dim` channels (TRN's `img_feature_dim` layer) and
maps a video `[T, D]` to one embedding `[dim]`; it trains with the embedder (state.params["head"]).

TRN++ (Zhou et al., ECCV 2018, the multi-scale temporal relation module, replacing TSN++'s average):
for every scale k in 2..T, a fixed set of ordered k-frame tuples (all of them when there are at most
`max_tuples`, else `max_tuples` spread evenly through their lexicographic list; TRN draws them at random,
here they are deterministic so that a video's embedding is too), `g_k` (Linear + ReLU) on each tuple's
concatenated features, summed over tuples, then `h_k` (Linear); the embedding is the sum over scales.
Matching as TSN++: 1 - cos to the mean support embedding of each class. Order-sensitive: permuting the
frames changes the embedding.
"""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tam_jax.domains import at_least
from tam_jax.methods import HeadMethod, register
from tam_jax.methods.tsn import prototype_distances


def _unrank_combination(n: int, k: int, rank: int) -> tuple[int, ...]:
    """The `rank`-th k-subset of range(n) in lexicographic order, without listing the others."""
    chosen, start = [], 0
    for remaining in range(k, 0, -1):
        for value in range(start, n):
            count = math.comb(n - value - 1, remaining - 1)  # subsets that start with `value`
            if rank < count:
                chosen.append(value)
                start = value + 1
                break
            rank -= count
    return tuple(chosen)


def trn_tuples(num_frames: int, scale: int, max_tuples: int = 3) -> np.ndarray:
    """The ordered frame tuples TRN++ relates at one scale: int `[n, scale]`, n <= max(max_tuples, 1).

    All increasing `scale`-tuples of range(num_frames) when there are at most `max_tuples`; otherwise
    `max_tuples` of them evenly spaced through the lexicographic list (first and last included).
    """
    if not 1 <= scale <= num_frames:
        raise ValueError(f"TRN scale {scale} must be in 1..{num_frames} (the number of frames).")
    total = math.comb(num_frames, scale)
    ranks = range(total) if total <= max_tuples else np.linspace(0, total - 1, max_tuples).round()
    return np.array([_unrank_combination(num_frames, scale, int(r)) for r in ranks], np.int32)


class TRNHead(nn.Module):
    """TRN++: multi-scale temporal relations, `[B, T, D]` -> `[B, dim]` (T >= 2).

    Attributes:
      dim: width of the frame projection, of each g_k and of the embedding.
      max_tuples: ordered tuples per scale (TRN uses 3).
    """

    dim: int = 256
    max_tuples: int = 3

    @nn.compact
    def __call__(self, frames: jax.Array) -> jax.Array:
        chex.assert_rank(frames, 3)
        batch, num_frames, _ = frames.shape
        if num_frames < 2:
            raise ValueError(f"TRN++ relates at least 2 frames; got T={num_frames} (config.data.num_frames).")
        x = nn.Dense(self.dim, name="project")(frames.astype(jnp.float32))
        embedding = jnp.zeros((batch, self.dim), jnp.float32)
        for scale in range(2, num_frames + 1):
            tuples = trn_tuples(num_frames, scale, self.max_tuples)  # [n, scale], static
            related = x[:, tuples].reshape(batch, len(tuples), scale * self.dim)  # ordered concatenation
            g = nn.relu(nn.Dense(self.dim, name=f"g_{scale}")(related))
            embedding = embedding + nn.Dense(self.dim, name=f"h_{scale}")(jnp.sum(g, axis=1))
        return embedding


@register
class TRN(HeadMethod):
    name, label, baseline = "trn", "TRN++", True
    tables = {1: 3}
    published = {"kinetics": (68.4, 82.0), "ssv2_full": (38.6, 48.9)}
    citation = "Cao et al., CVPR 2020, Table 1"
    defaults = {"dim": 256, "tuples": 3}  # projection and relation width; ordered tuples per scale
    domains = {"dim": at_least(1), "tuples": at_least(1)}

    @property
    def head(self) -> TRNHead:
        return TRNHead(dim=self.options.dim, max_tuples=self.options.tuples)

    @classmethod
    def check(cls, config) -> None:
        from tam_jax.errors import ConfigError

        if config.data.num_frames < 2:
            raise ConfigError(f"config.data.num_frames: must be >= 2 for fewshot.scorer='trn' (TRN++ relates "
                              f"frame tuples), got {config.data.num_frames}.")

    def class_distances(self, params, query, support, support_labels, num_classes, *, rng=None):
        return prototype_distances(query, support, support_labels, num_classes)
