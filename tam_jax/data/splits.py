"""Few-shot split lists: the classes of a split and each class's videos.

Two public line formats are read, detected per file:

- ``<class>/<video>`` (CMN and ARN lists), e.g. ``air drumming/-VtLx-mcPds_000012_000022``. The
  class is the part before the last ``/``; classes keep the order of their first line.
- ``<split><class index>//<relative path>`` or ``<split><class index>/<video id>`` (the HyRSM family
  of codebases), e.g. ``train0//train_256/air_drumming/-VtLx-mcPds_000012_000022.mp4`` or
  ``train8/78687``. Classes are ordered by index. With a path, the class name is the path's parent
  folder (``air_drumming``); with a bare id (SSv2) no name is given and the class is named by its
  token (``train8``).

A video reference (`Split.videos` values) is the id of the first and second forms and the relative
path of the ``//`` form; `video_id` turns either into the bare id. Nothing here touches video files.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path, PurePosixPath

from tam_jax.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov")

_INDEXED_LINE = re.compile(r"^(train|val|test)(\d+)(//?)(.+)$")
# The split word at the start of a file name or after a non-letter: trainlist03, test_few_shot,
# my-val.txt.
_SPLIT_WORD = re.compile(r"(?:^|[^a-z])(train|val|test)")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a few-shot benchmark.

    name: "train", "val" or "test" (or the list file's stem when its name holds none of these).
    classes: class names; a class's index in this tuple is its label within the split.
    videos: class name -> that class's video references, in list order.
    """

    name: str
    classes: tuple[str, ...]
    videos: dict[str, tuple[str, ...]]

    def items(self) -> list[tuple[str, int]]:
        """All (video reference, class index) pairs, class-major: every source's item order."""
        return [(video, c) for c, name in enumerate(self.classes) for video in self.videos[name]]

    @property
    def num_videos(self) -> int:
        return sum(len(v) for v in self.videos.values())


def video_id(reference: str) -> str:
    """The bare id of a video reference: ``train_256/a_b/xyz.mp4`` -> ``xyz``; ``78`` -> ``78``."""
    name = PurePosixPath(reference).name
    stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
    return stem if f".{suffix.lower()}" in VIDEO_SUFFIXES else name


def split_name_of(path: str | Path) -> str | None:
    """The split word (train/val/test) in a file name, or None: ``trainlist03.txt`` -> ``train``."""
    words = set(_SPLIT_WORD.findall(Path(path).name.lower()))
    return words.pop() if len(words) == 1 else None


def read_split_list(path: str | Path, name: str | None = None) -> Split:
    """Parses a split list file in either format (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Split list {path} does not exist.")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line]
    if not lines:
        raise DataError(f"Split list {path} is empty.")
    name = name or split_name_of(path) or path.stem
    indexed = [_INDEXED_LINE.match(line) for _, line in lines]
    if all(indexed):
        return _parse_indexed(path, name, lines, indexed)
    if any(indexed):
        n, line = next((n, line) for (n, line), m in zip(lines, indexed, strict=True) if not m)
        raise DataError(
            f"{path}:{n}: {line!r} is not of the form <split><index>/<video> like the other lines."
        )
    return _parse_class_video(path, name, lines)


def _parse_class_video(path: Path, name: str, lines: list[tuple[int, str]]) -> Split:
    videos: dict[str, list[str]] = {}
    for n, line in lines:
        cls, sep, video = line.rpartition("/")
        if not sep or not cls or not video:
            raise DataError(f"{path}:{n}: {line!r} is not of the form <class>/<video>.")
        videos.setdefault(cls, []).append(video)
    return _make_split(path, name, list(videos), videos)


def _parse_indexed(path, name, lines, matches) -> Split:
    by_index: dict[int, list[str]] = {}
    names: dict[int, str] = {}
    for (n, line), m in zip(lines, matches, strict=True):
        split_word, index, sep, video = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        # A path names its class by its parent folder; a bare id (SSv2) only by the index token.
        cls = PurePosixPath(video).parent.name if sep == "//" else f"{split_word}{index}"
        if not cls:
            raise DataError(f"{path}:{n}: {line!r} has a path without a class folder.")
        if names.setdefault(index, cls) != cls:
            raise DataError(
                f"{path}:{n}: class index {index} is {cls!r} here but {names[index]!r} earlier."
            )
        by_index.setdefault(index, []).append(video)
    order = sorted(by_index)
    return _make_split(
        path, name, [names[i] for i in order], {names[i]: by_index[i] for i in order}
    )


def _make_split(path: Path, name: str, classes: list[str], videos: dict[str, list[str]]) -> Split:
    for cls, refs in videos.items():
        if len(set(refs)) != len(refs):
            dup = next(r for r in refs if refs.count(r) > 1)
            raise DataError(f"{path}: video {dup!r} is listed twice in class {cls!r}.")
    return Split(name, tuple(classes), {c: tuple(videos[c]) for c in classes})


def find_split_files(split_dir: str | Path) -> dict[str, Path]:
    """Finds the train, val and test list (*.txt) in a folder by the split word in their names.

    Returns {"train": path, "val": path, "test": path}. Raises naming the folder if one is missing
    or two files claim the same split.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"Split folder {split_dir} does not exist.")
    found: dict[str, list[Path]] = {s: [] for s in SPLIT_NAMES}
    for path in sorted(split_dir.glob("*.txt")):
        split = split_name_of(path)
        if split is not None:
            found[split].append(path)
    problems = []
    for split, paths in found.items():
        if not paths:
            problems.append(f"no *.txt file with '{split}' in its name")
        elif len(paths) > 1:
            problems.append(f"several files for '{split}': {', '.join(p.name for p in paths)}")
    if problems:
        raise DataError(
            f"Split folder {split_dir}: {'; '.join(problems)}. Keep exactly one train, val and "
            "test list there (e.g. trainlist03.txt, vallist03.txt, testlist03.txt)."
        )
    return {split: paths[0] for split, paths in found.items()}


def read_splits(split_dir: str | Path) -> dict[str, Split]:
    """All three splits of a folder: {"train": Split, "val": Split, "test": Split}."""
    return {
        split: read_split_list(path, split) for split, path in find_split_files(split_dir).items()
    }
