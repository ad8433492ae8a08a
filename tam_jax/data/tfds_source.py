"""A `VideoSource` over a split built by `tam_jax.data.tfds_builders`, read by `tfds.data_source`.

No TensorFlow is needed: the ArrayRecord files are read by `tfds.data_source`, and only the frames a
clip needs are JPEG-decoded (with Pillow). Labels, frame counts and video ids come from the
dataset's ``metadata.json`` (written by the builder), so building the episode sampler does not read
any record.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from tam_jax.data.frames import decode_image, gather_frames
from tam_jax.data.report import VideoError
from tam_jax.errors import DataError


class _KeepJpegBytes(tfds.decode.Decoder):
    """Leaves the stored JPEGs encoded; `TfdsSource.read` decodes only the frames a clip needs."""

    def decode_example(self, serialized):
        return serialized

    def decode_example_np(self, serialized):
        return serialized

    def decode_batch_example_np(self, serialized):
        return serialized


def check_built(name: str, data_dir: str | Path | None) -> None:
    """Raise DataError, saying how to build it, when TFDS dataset `name` is not built in `data_dir`
    (`tfds.data_source` would otherwise try to build it, from a manual folder that is not there)."""
    try:
        prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except tfds.core.registered.DatasetNotFoundError:
        prepared = False
    if not prepared:
        where = data_dir or "TFDS's default folder (~/tensorflow_datasets)"
        raise DataError(
            f"TFDS dataset {name!r} is not built in {where}: build it with `python -m "
            f"tam_jax.data.tfds_builders {name.split('/')[0]} --manual_dir DATA --data_dir DIR`, then set "
            "--config.data.tfds_data_dir=DIR (or use --config.data.kind=frames with the same DATA)."
        )


class TfdsSource:
    """Split "train", "val" or "test" of `name` ("kinetics100_fewshot", "ssv2_fewshot/full")."""

    # The builder decoded every frame it stored; checking one would read the whole record (all its JPEGs).
    frames_verified = True

    def __init__(self, name: str, split: str, data_dir: str | Path | None = None):
        self.name, self.split = name, split
        check_built(name, data_dir)
        self._data = tfds.data_source(
            name, split=split, data_dir=data_dir, decoders={"frames": _KeepJpegBytes()}
        )
        metadata = self._data.dataset_info.metadata or {}
        if split not in metadata.get("splits", {}):
            raise DataError(
                f"TFDS dataset {name!r} in {self._data.dataset_info.data_dir} has no tam_jax "
                f"metadata for split {split!r}; build it with "
                f"`python -m tam_jax.data.tfds_builders {name.split('/')[0]} ...`."
            )
        info = metadata["splits"][split]
        self._classes = tuple(metadata["classes"][split])
        self._labels = np.asarray(info["labels"], np.int64)
        self._num_frames = np.asarray(info["num_frames"], np.int64)
        self._video_ids = list(info["video_ids"])
        if len(self._labels) != len(self._data):
            raise DataError(
                f"TFDS dataset {name!r} split {split!r}: metadata lists {len(self._labels)} "
                f"videos but the records hold {len(self._data)}; the build was interrupted "
                "or altered. Rebuild it."
            )

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._classes

    def __len__(self) -> int:
        return len(self._labels)

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def location(self, index: int) -> str:
        return f"tfds://{self.name}/{self.split}/{self._video_ids[index]}"

    def num_frames(self, index: int) -> int:
        return int(self._num_frames[index])

    def read(self, index: int, frame_indices: Sequence[int]) -> np.ndarray:
        try:
            jpegs = self._data[index]["frames"]
        except (
            Exception
        ) as e:  # Whatever the reader raises, the record is at fault: report it, skip it.
            raise VideoError(self.location(index), f"record cannot be read ({e})") from None
        where = self.location(index)
        return gather_frames(
            frame_indices, len(jpegs), lambda i: decode_image(jpegs[i], f"{where}#{i}"), where
        )
