"""Data: files -> frames -> clips -> episodes.

Modules (each imported on first use, so `import tam_jax.data` pulls in neither PyAV nor
tensorflow_datasets):

- `splits`: split list files -> `Split` (classes and their videos).
- `layouts`: split folders (``<root>/{train,val,test}/<class>/<video>``), hidden entries, and what
  to say when a split's videos are found nowhere.
- `sources`: `VideoSource` and the frame-folder / video-file sources, `find_usable`, `build_source`.
- `frames`, `videos`: reading JPEG frame folders and video files (PyAV).
- `sampling`, `transforms`, `clips`: which frames, how they are resized/cropped/flipped, one item ->
  one clip.
- `episodes`: the (seed, index)-deterministic n-way k-shot `EpisodeSampler`.
- `loader`: grain-based `TrainBatches` and `load_split`.
- `report`: `VideoError` and the `SkipReport` of skipped bad input.
- `demo`: the generated temporal-order demo dataset.
- `tfds_builders` / `tfds_source`: building and reading the TFDS datasets (need tensorflow_datasets,
  not TF).
"""

import importlib

_EXPORTS = {
    "Split": "splits",
    "read_split_list": "splits",
    "read_splits": "splits",
    "find_split_files": "splits",
    "VideoSource": "sources",
    "FrameFolderSource": "sources",
    "VideoFileSource": "sources",
    "find_usable": "sources",
    "build_source": "sources",
    "tsn_frame_indices": "sampling",
    "train_transform": "transforms",
    "test_transform": "transforms",
    "ClipSpec": "clips",
    "load_clip": "clips",
    "Episode": "episodes",
    "EpisodeSampler": "episodes",
    "batch_episode_indices": "episodes",
    "host_episode_indices": "episodes",
    "TrainBatches": "loader",
    "SplitArrays": "loader",
    "load_split": "loader",
    "VideoError": "report",
    "SkipReport": "report",
    "load_episode": "loader",
    "TfdsSource": "tfds_source",
    "DemoConfig": "demo",
    "demo_splits": "demo",
    "DemoSource": "demo",
    "write_demo": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
