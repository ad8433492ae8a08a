"""Video sources: random access to the videos of one split, by item index.

Every source has the same interface (`VideoSource`): items are numbered 0..len-1 in the split's
class-major order (`Split.items()`), `label(i)` is the class index within the split, `read(i,
frame_indices)` returns uint8 [T, H, W, 3], and bad input raises `VideoError`. Implementations:

- `FrameFolderSource`: JPEG frame folders, ``<root>/<class>/<video>/<numbered>.jpg`` or
  ``<root>/<video>/...`` (the class then comes from the split list only).
- `VideoFileSource`: video files, ``<root>/<class>/<video>.mp4|.webm|.avi|...`` or
  ``<root>/<video>.<ext>``.
- `tam_jax.data.tfds_source.TfdsSource`: a split built by `tam_jax.data.tfds_builders`.
- `tam_jax.data.demo.DemoSource`: the generated demo dataset, rendered in memory.

Paths are looked up as the public codebases lay them out (`candidate_paths`): under the class name
as listed, with spaces turned into underscores (Kinetics folders come both ways), under the folder a
``//`` list line names, and flat under `root`, and all of these again inside the split's folder
(``<root>/test/test0/10430`` for the line ``test0/10430`` of the test list). Without split lists, a
root of split folders (``<root>/{train,val,test}/<class>/<video>``) names the classes and videos
itself; see `tam_jax.data.layouts`. A missing video's skip entry names the paths tried, and a split
none of whose videos is found is an error saying which layouts were tried and what is on disk.

`find_usable` checks every item once before training, cheaply: it counts frames (from a folder listing
or the video's metadata) and decodes frame 0, as training will (a zero-byte or corrupt first JPEG, a
video whose first frame does not decode). It records the bad ones in a `SkipReport` and returns the rest.
A source whose frames were checked when it was stored (`frames_verified`) is only counted.
`build_source` makes any source from plain config values.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tam_jax.data import frames as frames_lib
from tam_jax.data import videos as videos_lib
from tam_jax.data.layouts import (
    describe_missing,
    format_tried,
    has_split_folders,
    read_split_folder,
    split_folder_names,
)
from tam_jax.data.report import SkipReport, VideoError
from tam_jax.data.splits import VIDEO_SUFFIXES, Split, find_split_files, read_split_list, video_id
from tam_jax.progress import track

SOURCE_KINDS = ("demo", "frames", "videos", "tfds")


@runtime_checkable
class VideoSource(Protocol):
    """Random access to one split's videos. Must be picklable: loader workers get a copy.

    Optional attribute `frames_verified`: True where frames were checked when stored (`find_usable`).
    """

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names of the split; `label(i)` indexes this tuple."""

    def __len__(self) -> int: ...

    def label(self, index: int) -> int:
        """Class index (within the split) of item `index`."""

    def location(self, index: int) -> str:
        """Where item `index` lives (a path, or a dataset/split/id string): used in skip reports."""

    def num_frames(self, index: int) -> int:
        """Number of frames of item `index`. Raises VideoError for a missing or unreadable video."""

    def read(self, index: int, frame_indices: Sequence[int]) -> np.ndarray:
        """uint8 [len(frame_indices), H, W, 3]; VideoError if missing, unreadable or truncated."""


class DirListings:
    """Cached listings: resolving 70k list lines costs one listdir per folder, not 70k stats."""

    def __init__(self) -> None:
        self._names: dict[Path, frozenset[str]] = {}

    def exists(self, path: Path) -> bool:
        names = self._names.get(path.parent)
        if names is None:
            try:
                names = frozenset(os.listdir(path.parent))
            except OSError:
                names = frozenset()
            self._names[path.parent] = names
        return path.name in names


def candidate_paths(
    root: Path,
    class_name: str,
    reference: str,
    kind: str,
    split: str | None = None,
    listings: DirListings | None = None,
) -> Iterator[Path]:
    """Where a listed video may be, in lookup order (lazily: resolving stops at the first hit).

    kind: "frames" (a folder of JPEGs), "videos" (a file with a suffix of `VIDEO_SUFFIXES`) or "any"
    (either; folders first). Under `root`, then under the split's folder (``root/<split>``,
    ``root/<split>_256``) when it exists: the class name as listed, with spaces as underscores, the
    folder a ``//`` line names, and flat. A relative path (a ``//`` line, a split folder entry) is
    tried as given first.
    """
    listings = listings or DirListings()
    ref = PurePosixPath(reference)
    stem = video_id(reference)
    folders = [class_name, class_name.replace(" ", "_")]
    stems, files = [], []
    if len(ref.parts) > 1:  # A relative path: as given, then by its class folder.
        if ref.suffix.lower() in VIDEO_SUFFIXES:
            files.append(root.joinpath(*ref.parts))
        stems.append(root.joinpath(*ref.parent.parts, stem))
        folders.append(ref.parent.name)
    bases = [root] + [
        root / name for name in (split_folder_names(split) if split else ()) if listings.exists(root / name)
    ]
    for base in bases:
        stems += [base / folder / stem for folder in dict.fromkeys(folders)]
        stems.append(base / stem)
    stems = list(dict.fromkeys(stems))
    if kind in ("frames", "any"):
        yield from stems
    if kind in ("videos", "any"):
        yield from dict.fromkeys(files + [s.with_name(s.name + ext) for s in stems for ext in VIDEO_SUFFIXES])


def resolve_video(
    root: Path,
    class_name: str,
    reference: str,
    kind: str,
    listings: DirListings | None = None,
    split: str | None = None,
) -> tuple[Path | None, Path]:
    """(path found or None, the most likely path for error messages) of a listed video; the paths
    tried are `candidate_paths`."""
    listings = listings or DirListings()
    candidates = candidate_paths(root, class_name, reference, kind, split, listings)
    first = next(candidates)
    found = first if listings.exists(first) else next((p for p in candidates if listings.exists(p)), None)
    return found, first


class _SplitFiles:
    """A split's items resolved to paths under a root: the part both file sources share."""

    def __init__(self, root: str | Path, split: Split, kind: str, origin: str | None = None):
        """origin: where the split comes from, for errors (default: "the <name> split")."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Data root {self.root} does not exist or is not a folder.")
        self.split = split
        self._kind = kind
        self._what = {"frames": "frame folder", "videos": "video file"}[kind]
        self._items = split.items()
        self._labels = np.array([c for _, c in self._items], np.int64)
        listings = DirListings()
        resolved = [
            resolve_video(self.root, split.classes[c], ref, kind, listings, split.name)
            for ref, c in self._items
        ]
        self._paths: list[Path | None] = [found for found, _ in resolved]
        self._expected: list[Path] = [expected for _, expected in resolved]
        self._num_frames: dict[int, int] = {}
        if self._items and not any(self._paths):
            raise FileNotFoundError(
                describe_missing(
                    self.root, split, kind, self._tried(0), origin or f"the {split.name} split"
                )
            )

    def _tried(self, index: int) -> list[Path]:
        reference, c = self._items[index]
        return list(
            candidate_paths(self.root, self.split.classes[c], reference, self._kind, self.split.name)
        )

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.split.classes

    def __len__(self) -> int:
        return len(self._items)

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def path(self, index: int) -> Path:
        path = self._paths[index]
        if path is None:
            reference, c = self._items[index]
            raise VideoError(
                self._expected[index],
                f"missing: no {self._what} for {self.split.classes[c]}/{reference} "
                f"under {self.root}; tried {format_tried(self._tried(index))}",
            )
        return path

    def location(self, index: int) -> str:
        return str(self._paths[index] or self._expected[index])


class FrameFolderSource(_SplitFiles):
    """One split's videos as folders of numbered JPEGs (layouts: see the module docstring)."""

    def __init__(self, root: str | Path, split: Split, origin: str | None = None):
        super().__init__(root, split, "frames", origin)

    def num_frames(self, index: int) -> int:
        if index not in self._num_frames:
            self._num_frames[index] = len(frames_lib.list_frames(self.path(index)))
        return self._num_frames[index]

    def read(self, index: int, frame_indices: Sequence[int]) -> np.ndarray:
        return frames_lib.read_frames(self.path(index), frame_indices)


class VideoFileSource(_SplitFiles):
    """One split's videos stored as video files, decoded with PyAV up to the last frame needed."""

    def __init__(self, root: str | Path, split: Split, origin: str | None = None):
        super().__init__(root, split, "videos", origin)

    def num_frames(self, index: int) -> int:
        if index not in self._num_frames:
            self._num_frames[index] = videos_lib.count_frames(self.path(index))
        return self._num_frames[index]

    def read(self, index: int, frame_indices: Sequence[int]) -> np.ndarray:
        return videos_lib.read_video(self.path(index), frame_indices, self._num_frames.get(index))


class PathSource:
    """A `VideoSource` over a list of paths, each a video file or a frame folder (label 0)."""

    class_names: tuple[str, ...] = ()

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]
        self._num_frames: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def label(self, index: int) -> int:
        return 0

    def location(self, index: int) -> str:
        return str(self.paths[index])

    def num_frames(self, index: int) -> int:
        if index not in self._num_frames:
            path = self.paths[index]
            if path.is_dir():
                count = len(frames_lib.list_frames(path))
            elif path.exists():
                count = videos_lib.count_frames(path)
            else:
                raise VideoError(path, "no such video file or frame folder")
            self._num_frames[index] = count
        return self._num_frames[index]

    def read(self, index: int, frame_indices: Sequence[int]) -> np.ndarray:
        path = self.paths[index]
        if path.is_dir():
            return frames_lib.read_frames(path, frame_indices)
        return videos_lib.read_video(path, frame_indices, self.num_frames(index))


def find_usable(
    source: VideoSource,
    report: SkipReport,
    *,
    indices: Sequence[int] | None = None,
    num_threads: int = 8,
    progress: bool = True,
    read_frame: bool | None = None,
) -> np.ndarray:
    """Indices int64 [n_usable] of the items (of `indices`, default all) whose frames can be counted and
    whose frame 0 decodes; the others go to `report`.

    read_frame: decode frame 0 of every item (one JPEG, or a video's first frame: no seeking); default
      True unless the source sets `frames_verified` (demo videos, TFDS records the builder decoded).
    Counting also caches each count in the source, so workers started afterwards do not count again.
    """
    if read_frame is None:
        read_frame = not getattr(source, "frames_verified", False)

    def check(index: int) -> bool:
        try:
            if source.num_frames(index) <= 0:
                return False
            if read_frame:
                source.read(index, [0])
            return True
        except VideoError as e:
            report.add_error(e)
            return False

    indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        results = pool.map(check, indices)
        usable = list(track(results, len(indices), "Checking videos", "video", enabled=progress))
    return indices[np.array(usable, bool)].astype(np.int64)


def build_source(
    kind: str,
    split: str,
    *,
    root: str | Path | None = None,
    split_dir: str | Path | None = None,
    split_list: str | Path | None = None,
    tfds_name: str | None = None,
    data_dir: str | Path | None = None,
    demo_options: Mapping[str, Any] | None = None,
) -> VideoSource:
    """A source for split "train", "val" or "test" from plain config values.

    kind="demo": the generated dataset; `demo_options` are `DemoConfig` fields (e.g. {"seed": 0}).
    kind="frames" / "videos": `root` holds the frame folders / video files; the split list is
      `split_list`, or the file for `split` found in `split_dir` (see `find_split_files`).
    kind="tfds": `tfds_name` (e.g. "kinetics100_fewshot", "ssv2_fewshot/full") built in `data_dir`.
    """
    if kind == "demo":
        from tam_jax.data.demo import DemoConfig, DemoSource

        return DemoSource(DemoConfig(**(demo_options or {})), split)
    if kind == "tfds":
        if not tfds_name:
            raise ValueError(
                "build_source(kind='tfds') needs tfds_name, e.g. 'kinetics100_fewshot'."
            )
        from tam_jax.data.tfds_source import TfdsSource

        return TfdsSource(tfds_name, split, data_dir=data_dir)
    if kind not in SOURCE_KINDS:
        raise ValueError(f"Unknown data source kind {kind!r}; use one of {SOURCE_KINDS}.")
    if root is None:
        raise ValueError(f"build_source(kind={kind!r}) needs root: the folder holding the {kind}.")
    if split_list is None and split_dir is None:
        if not has_split_folders(root):
            raise ValueError(
                f"build_source(kind={kind!r}) needs split_list or split_dir, or split folders "
                f"{Path(root) / 'train'}/<class>/<video> (and val/, test/)."
            )
        split_obj, origin = read_split_folder(root, split, kind), None
    else:
        split_list = split_list or find_split_files(split_dir)[split]
        split_obj, origin = read_split_list(split_list, split), f"the {split} list {split_list}"
    cls = FrameFolderSource if kind == "frames" else VideoFileSource
    return cls(root, split_obj, origin)
