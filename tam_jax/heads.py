"""The learned heads of Table 1's baselines: TRN++ and CMN++ on the fine-tuned frame features.

Each head maps the frame features of a video `[T, D]` to one video embedding `[E]`; the scorers "trn" and
"cmn" of `tam_jax.fewshot` then compare query and support embeddings by cosine distance. Both start with a
per-frame linear projection to `dim` channels (TRN's `img_feature_dim` layer). Heads train jointly with the
embedder; their parameters are `state.params["head"]`, present only when `fewshot.scorer` is "trn" or
"cmn".

TRN++ (Zhou et al., ECCV 2018, the multi-scale temporal relation module, replacing TSN++'s average):
for every scale k in 2..T, a fixed set of ordered k-frame tuples (all of them when there are at most
`max_tuples`, else `max_tuples` spread evenly through their lexicographic list; TRN draws them at random,
here they are deterministic so that a video's embedding is too), `g_k` (Linear + ReLU) on each tuple's
concatenated features, summed over tuples, then `h_k` (Linear); the embedding is the sum over scales.
Matching as TSN++: 1 - cos to the mean support embedding of each class. Order-sensitive: permuting the
frames changes the embedding.

CMN++ (Zhu & Yang, ECCV 2018, the multi-saliency embedding and compound memory): `num_saliency` learned
saliency queries attend over the T projected frames (softmax over time, scaled by 1/sqrt(dim)); the M
attended vectors are concatenated (CMN's flattened multi-saliency descriptor; normalisation happens in the
cosine). The compound memory is simplified to its read in an episode: the memory holds the support keys
grouped by class, and a class's distance is 1 - the largest cosine similarity between the query key and
that class's keys (nearest neighbour, CMN's memory read). No positional information is added, so CMN++ is,
like the paper's, permutation-invariant: an order-blind baseline, as TSN++ is.
"""

from __future__ import annotations

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tam_jax import fewshot


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


def build_head(config: ml_collections.ConfigDict) -> nn.Module | None:
    """The head `config.fewshot.scorer` trains ("trn", "cmn"), or None for the parameter-free scorers."""
    scorer = config.fewshot.scorer
    if scorer == "trn":
        return TRNHead(dim=config.head.dim, max_tuples=config.head.trn_tuples)
    if scorer == "cmn":
        return CMNHead(dim=config.head.dim, num_saliency=config.head.cmn_saliencies)
    assert scorer not in fewshot.HEAD_SCORERS, f"no head built for {scorer!r}"
    return None


def init_params(head: nn.Module, num_frames: int, feature_dim: int, rng: jax.Array) -> dict:
    """Fresh parameters of `head` for T=`num_frames` frames of `feature_dim`-wide features."""
    return head.init(rng, jnp.zeros((1, num_frames, feature_dim), jnp.float32))["params"]


def video_embeddings(head: nn.Module, params, features: jax.Array) -> jax.Array:
    """Frame features `[..., T, D]` -> video embeddings `[..., E]` (any leading axes)."""
    leading = features.shape[:-2]
    out = head.apply({"params": params}, features.reshape((-1,) + features.shape[-2:]))
    return out.reshape(leading + out.shape[-1:])


@functools.lru_cache(maxsize=8)
def _jitted_embeddings(head: nn.Module):
    """One jitted `video_embeddings` per head, so repeated evaluations compile once."""
    return jax.jit(lambda params, features: video_embeddings(head, params, features))


def embed_features(head: nn.Module, params, features: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Frame features of a whole split `[N, T, D]` -> float32 video embeddings `[N, E]`, in padded batches."""
    from tam_jax.embedding import map_batches

    apply = _jitted_embeddings(head)
    return map_batches(lambda chunk: apply(params, chunk), features, batch_size)
