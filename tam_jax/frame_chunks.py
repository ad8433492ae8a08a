"""Embedding a training batch in chunks of videos, each recomputed alone in the backward pass.

One 5-way 5-shot episode with 5 queries per class is 400 frames; even with every ResNet block recomputed
(`model.remat="block"`), the block inputs of all 400 frames stay alive until the backward pass. Accumulation
(`train.episodes_per_device_step`) cannot split an episode: its loss couples every frame through the
alignment. `embed_in_chunks` splits the embedding instead (`train.embed_chunks`): the forward pass embeds
one chunk of videos at a time and keeps only the frames, and the backward pass recomputes each chunk and
takes its VJP, one chunk after another (a `lax.scan`), so the activations of one chunk are alive at a time.
The loss and its gradients are unchanged, but for one thing:

BatchNorm normalises each chunk with that chunk's own statistics (the "ghost batch" of the PyTorch code's
`nn.DataParallel`, where each of the paper's four GPUs normalised its own share of the batch), and the
running averages are updated from the mean of the chunks' statistics. With frozen BatchNorm
(`model.freeze_bn`) the chunked step equals the unchunked one to float tolerance (tests/test_frame_chunks.py).
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

# (params, batch_stats, videos [B, T, H, W, 3]) -> (features [B, T, D], new batch_stats)
ApplyFn = Callable[[dict, dict, jax.Array], tuple[jax.Array, dict]]


def chunks_for(config, max_videos_per_chunk: int) -> int:
    """The fewest `train.embed_chunks` that leave at most `max_videos_per_chunk` videos of a training episode
    per chunk (a divisor of its way * (shot + queries) videos)."""
    fs = config.fewshot
    videos = fs.way * (fs.shot + fs.queries)
    return next(n for n in range(1, videos + 1) if videos % n == 0 and videos // n <= max_videos_per_chunk)


def to_chunks(videos: jax.Array, num_chunks: int) -> jax.Array:
    """`[E, V, ...]` -> `[num_chunks, E * V / num_chunks, ...]`: chunk c holds videos c*V/num_chunks ..
    (c+1)*V/num_chunks - 1 of every episode, so the episode axis (sharded over devices) stays whole."""
    episodes, per_episode = videos.shape[:2]
    if per_episode % num_chunks:
        raise ValueError(
            f"train.embed_chunks={num_chunks} does not divide the {per_episode} videos of an episode "
            "(way * (shot + queries)); choose a divisor."
        )
    split = videos.reshape(episodes, num_chunks, per_episode // num_chunks, *videos.shape[2:])
    return jnp.swapaxes(split, 0, 1).reshape(num_chunks, -1, *videos.shape[2:])


def from_chunks(chunked: jax.Array, episodes: int) -> jax.Array:
    """The inverse of `to_chunks`: `[num_chunks, E * V / num_chunks, ...]` -> `[E, V, ...]`."""
    num_chunks, per_chunk = chunked.shape[:2]
    split = chunked.reshape(num_chunks, episodes, per_chunk // episodes, *chunked.shape[2:])
    return jnp.swapaxes(split, 0, 1).reshape(episodes, -1, *chunked.shape[2:])


def _zero_cotangent(x: jax.Array):
    """A zero cotangent for `x`: float0 for integer arrays (the uint8 frames), zeros otherwise."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def embed_in_chunks(apply_fn: ApplyFn, params, batch_stats, videos: jax.Array, num_chunks: int, *,
                    unroll: bool = False):
    """`apply_fn` over `videos` uint8 `[E, V, T, H, W, 3]` in `num_chunks` chunks of V / num_chunks videos
    per episode (`to_chunks`), recomputing each chunk in the backward pass. Both passes loop over the
    chunks (`lax.scan`); `unroll` writes the loops out (for XLA:CPU, `tam_jax.train_step`).

    Returns:
      (features `[E, V, T, D]`, batch_stats with the running averages of the chunks' mean statistics).
      Gradients flow to `params` only (the frames and the statistics get zero cotangents).
    """
    chex.assert_rank(videos, 6)
    episodes = videos.shape[0]

    def forward_all(params, batch_stats, chunks):
        _, (features, stats) = jax.lax.scan(lambda _, chunk: (None, apply_fn(params, batch_stats, chunk)),
                                            None, chunks, unroll=unroll)
        return features, jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)

    @jax.custom_vjp
    def embed(params, batch_stats, chunks):
        return forward_all(params, batch_stats, chunks)

    def forward(params, batch_stats, chunks):
        return forward_all(params, batch_stats, chunks), (params, batch_stats, chunks)

    def backward(residuals, cotangents):
        params, batch_stats, chunks = residuals
        features_cotangent, _ = cotangents  # the statistics are not differentiated

        def one_chunk(gradient, chunk_and_cotangent):
            chunk, cotangent = chunk_and_cotangent
            _, vjp = jax.vjp(lambda p: apply_fn(p, batch_stats, chunk)[0], params)
            return jax.tree.map(jnp.add, gradient, vjp(cotangent)[0]), None

        # Unrolled, XLA:CPU overlapped the chunks and saved under half as much (benchmarks/README.md,
        # "Chunks of an episode"): the plan unrolls only where memory is not what limits it.
        gradient, _ = jax.lax.scan(one_chunk, jax.tree.map(jnp.zeros_like, params),
                                   (chunks, features_cotangent), unroll=unroll)
        return gradient, jax.tree.map(jnp.zeros_like, batch_stats), _zero_cotangent(chunks)

    embed.defvjp(forward, backward)
    features, batch_stats = embed(params, batch_stats, to_chunks(videos, num_chunks))
    return from_chunks(features, episodes), batch_stats
