"""The one way to embed videos: clips -> frame features `[N, T, D]` in inference mode, batched, padded and
sharded over this process's devices.

    embedder = Embedder(model, variables, mesh)
    embedder.embed(frames)                         # uint8 [N, T, H, W, 3] -> float32 [N, T, D]
    embedder.embed_paths(paths, spec)              # video files / frame folders -> features, kept, errors
    embed_share(embedder, share)                   # a split loaded in per-process shares -> [N, T, D]

Batches are padded (by repeating the last row) to a few shapes, so a run compiles a few times whatever the
number of videos: a full batch, or the next power of two for a smaller one, always a multiple of the
devices. Padding rows never change the real rows' features (BatchNorm uses its running statistics).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tam_jax import hosts, progress
from tam_jax.data.clips import ClipSpec, read_clips
from tam_jax.data.pipeline import ClipShare
from tam_jax.data.report import ClipError


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= value (and >= multiple)."""
    return max(multiple, -(-value // multiple) * multiple)


def padded_length(count: int, batch_size: int, multiple: int = 1) -> int:
    """Rows a batch of `count` is padded to: `batch_size` when full, else the next power of two (capped at
    `batch_size`), rounded up to `multiple`."""
    power_of_two = 1 << max(count - 1, 0).bit_length()
    return round_up(min(power_of_two, batch_size), multiple)


def pad_rows(array: np.ndarray, length: int) -> np.ndarray:
    """`[n, ...]` -> `[length, ...]` by repeating the last row (length >= n >= 1)."""
    missing = length - len(array)
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)]) if missing else array


def map_batches(
    fn: Callable[[np.ndarray], jax.Array], array: np.ndarray, batch_size: int, *, multiple: int = 1,
    desc: str = "embedding", show_progress: bool = False,
) -> np.ndarray:
    """`fn` over `array` `[N, ...]` in padded batches of at most `batch_size` rows -> float32 `[N, ...]`."""
    batch_size = round_up(batch_size, multiple)
    starts = range(0, len(array), batch_size)
    outputs = []
    for start in progress.track(starts, len(starts), desc, "batch", enabled=show_progress):
        chunk = array[start : start + batch_size]
        padded = pad_rows(chunk, padded_length(len(chunk), batch_size, multiple))
        outputs.append(np.asarray(fn(padded), np.float32)[: len(chunk)])
    return np.concatenate(outputs)


@functools.lru_cache(maxsize=8)
def inference_apply(model) -> Callable:
    """One jitted inference function per model, so repeated embeddings compile once per shape."""
    return jax.jit(lambda variables, frames: model.apply(variables, frames, train=False))


class Embedder:
    """A frame embedder with fixed weights on this process's devices of `mesh`.

    Args:
      model: a `tam_jax.models.FrameEmbedder`.
      variables: its {"params", "batch_stats"} (replicated arrays, possibly of a multi-process mesh).
      mesh: the run's mesh; only this process's devices are used.
      batch_size: videos per batch (rounded up to a multiple of the devices).
    """

    def __init__(self, model, variables: dict, mesh: Mesh, batch_size: int = 32):
        self.mesh = hosts.local_mesh(mesh)
        self.batch_size = round_up(batch_size, self.mesh.size)
        self._apply = inference_apply(model)
        self._sharded = NamedSharding(self.mesh, P("data"))
        self.variables = jax.device_put(hosts.local_copy(variables), NamedSharding(self.mesh, P()))

    def __call__(self, frames: np.ndarray) -> jax.Array:
        """uint8 `[B, T, H, W, 3]` (B a multiple of the devices) -> `[B, T, D]`, B sharded."""
        return self._apply(self.variables, jax.device_put(frames, self._sharded))

    def embed(self, frames: np.ndarray, *, show_progress: bool = True) -> np.ndarray:
        """uint8 `[N, T, H, W, 3]` -> float32 `[N, T, D]`."""
        return map_batches(self, frames, self.batch_size, multiple=self.mesh.size,
                           show_progress=show_progress)

    def embed_paths(
        self, paths: Sequence[str | os.PathLike], spec: ClipSpec, *, num_threads: int = 4,
        desc: str = "embedding", show_progress: bool = True,
    ) -> tuple[np.ndarray, list[int], list[ClipError]]:
        """Embed clips read from paths (video files or frame folders) with test-time transforms.

        Returns:
          (float32 `[n_ok, T, D]` features, indices into `paths` of those n_ok clips, errors of the others).
        """
        features, kept, errors, batch = [], [], [], []

        def flush():
            if batch:
                features.append(self.embed(np.stack(batch), show_progress=False))
                batch.clear()

        with progress.bar(len(paths), desc, "clip", enabled=show_progress, leave=False) as bar:
            for index, clip in read_clips(paths, spec, num_threads=num_threads):
                if isinstance(clip, ClipError):
                    errors.append(clip)
                else:
                    batch.append(clip)
                    kept.append(index)
                    if len(batch) == self.batch_size:
                        flush()
                bar.update(1)
        flush()
        if not features:
            return np.zeros((0, spec.num_frames, 0), np.float32), kept, errors
        return np.concatenate(features), kept, errors


def embed_share(embedder: Embedder, share: ClipShare, *, show_progress: bool = True) -> np.ndarray:
    """Every process embeds its share of a split once; all gather the result: float32 `[N, T, D]`."""
    return hosts.gather(embedder.embed(share.frames, show_progress=show_progress))[share.rows]
