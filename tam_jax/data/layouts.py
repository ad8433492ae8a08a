"""How a dataset sits on disk: split folders, what counts as a video, and what to say when none is found.

Two ways to name a split's classes and videos (`config.data.root` = ROOT):

- Split lists (`config.data.split_dir`): ``<class>/<video>`` or ``<split><index>/<video>`` lines
  (`tam_jax.data.splits`), each looked up (`tam_jax.data.sources.resolve_video`) as
  ``ROOT/<class>/<video>``, ``ROOT/<video>``, a ``//`` line's own relative path, and the same inside
  the split's folder ``ROOT/<split>/`` or ``ROOT/<split>_256/``: a line ``test0/10430`` of the test
  list is found at ``ROOT/test/test0/10430``.
- Split folders, no lists (`split_dir` empty): ``ROOT/{train,val,test}/<class>/<video>``, the video a
  folder of frames (kind "frames") or a file ``<video>.mp4|.webm|...`` (kind "videos"). A split's
  classes are its sub-folders, sorted by name; their videos are their entries, sorted by name.

Hidden entries (names starting with "."; ``.DS_Store``, ``._clip.mp4``, ``.ipynb_checkpoints``) are
never classes, videos or frames.

When a whole split resolves to nothing, `describe_missing` says which layouts were tried and what the
nearest thing on disk looks like. Nothing here decodes a video.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from tam_jax.data.splits import SPLIT_NAMES, VIDEO_SUFFIXES, Split, video_id
from tam_jax.errors import DataError

_log = logging.getLogger(__name__)
# Which layout a run reads is worth one line in every run; absl's default verbosity (WARNING) would
# hide it.
_log.setLevel(logging.INFO)

LAYOUTS = (
    "<root>/<class>/<video>",
    "<root>/<video>",
    "<root>/<path a '//' list line gives>",
    "<root>/<split>/<class>/<video>",
    "<root>/<split>_256/<class>/<video>",
)
_SEARCH_DEPTH = 5  # levels below root searched for a listed video's name when nothing resolves
_SEARCH_ENTRIES = 50_000  # entries listed at most by that search


def is_hidden(name: str) -> bool:
    """True for names a listing must ignore: ``.DS_Store``, ``._x.mp4``, ``.ipynb_checkpoints``."""
    return name.startswith(".")


def split_folder_names(split: str) -> tuple[str, ...]:
    """Folder names a split may have under the data root: ``test`` -> ("test", "test_256")."""
    return (split, f"{split}_256")


def find_split_folder(root: str | Path, split: str) -> Path | None:
    """``root/<split>`` or ``root/<split>_256``, whichever is a folder (that order), else None."""
    for name in split_folder_names(split):
        if (Path(root) / name).is_dir():
            return Path(root) / name
    return None


def has_split_folders(root: str | Path) -> bool:
    """True if `root` holds a folder for at least one of train / val / test (see the module doc)."""
    return any(find_split_folder(root, split) for split in SPLIT_NAMES)


def _is_video_entry(entry: os.DirEntry, kind: str) -> bool:
    if is_hidden(entry.name):
        return False
    is_file = entry.is_file() and Path(entry.name).suffix.lower() in VIDEO_SUFFIXES
    return {"frames": entry.is_dir(), "videos": is_file, "any": entry.is_dir() or is_file}[kind]


def list_videos(folder: str | Path, kind: str) -> list[str]:
    """Sorted names of the videos in a class folder: sub-folders (kind "frames"), files with a
    suffix of `VIDEO_SUFFIXES` (kind "videos") or both ("any"); hidden entries left out."""
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries if _is_video_entry(entry, kind))


def list_classes(folder: str | Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of a split folder."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not is_hidden(e.name))


def read_split_folder(root: str | Path, split: str, kind: str) -> Split:
    """The `Split` of ``root/<split>/<class>/<video>`` (or ``root/<split>_256/...``).

    Video references are paths relative to `root` (``train/<class>/<video>[.mp4]``), so
    `resolve_video` finds them as a ``//`` list line's path. Raises naming the folder and the fix when
    the split folder is missing, holds no class folder, or no class holds a video of this `kind`.
    """
    root = Path(root)
    folder = find_split_folder(root, split)
    if folder is None:
        present = [s for s in SPLIT_NAMES if find_split_folder(root, s)]
        raise FileNotFoundError(
            f"{root} is read as split folders ({', '.join(f'{s}/' for s in present)}) but has no "
            f"folder for the {split} split: add {root / split}/<class>/<video>, or give split lists "
            "with --config.data.split_dir."
        )
    classes = list_classes(folder)
    if not classes:
        raise DataError(
            f"Split folder {folder} holds no class folders; lay it out as {folder}/<class>/<video>."
        )
    videos = {c: tuple(f"{folder.name}/{c}/{v}" for v in list_videos(folder / c, kind)) for c in classes}
    if not any(videos.values()):
        raise DataError(
            f"No class folder of {folder} holds a {_WHAT[kind]} ({folder / classes[0]} holds "
            f"{_contents(folder / classes[0])}).{_kind_hint(folder / classes[0], kind)}"
        )
    _log.info(
        "Reading split folders: %s, %d classes, %d videos (%s).",
        folder, len(classes), sum(map(len, videos.values())), _WHAT[kind] + "s",
    )
    return Split(split, tuple(classes), videos)


_WHAT = {"frames": "frame folder", "videos": "video file", "any": "video file or frame folder"}


def _contents(folder: Path) -> str:
    """A short account of a folder's entries: "3 folders, 12 .mp4 files, 1 hidden entry"."""
    counts: collections.Counter = collections.Counter()
    with os.scandir(folder) as entries:
        for e in entries:
            if is_hidden(e.name):
                counts["hidden entries"] += 1
            elif e.is_dir():
                counts["folders"] += 1
            else:
                counts[f"{Path(e.name).suffix.lower() or 'suffix-less'} files"] += 1
    return ", ".join(f"{n} {what}" for what, n in counts.most_common()) or "nothing"


def _kind_hint(class_folder: Path, kind: str) -> str:
    other = {"frames": "videos", "videos": "frames"}.get(kind)
    if other and list_videos(class_folder, other):
        return f" These are {_WHAT[other]}s: set --config.data.kind={other}."
    return ""


# ---------------------------------------------------------------------------------------------------
# When nothing is found


def find_named(root: Path, names: Sequence[str]) -> Path | None:
    """The first entry (breadth first, sorted, within `_SEARCH_DEPTH` levels and `_SEARCH_ENTRIES`
    listed entries) whose name, or name without a video suffix, is one of `names`."""
    wanted = set(names)
    queue = collections.deque([(root, 0)])
    listed = 0
    while queue and listed < _SEARCH_ENTRIES:
        folder, depth = queue.popleft()
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not is_hidden(e.name)), key=lambda e: e.name)
        except OSError:
            continue
        listed += len(entries)
        for entry in entries:
            if entry.name in wanted or video_id(entry.name) in wanted:
                return Path(entry.path)
        if depth + 1 < _SEARCH_DEPTH:
            queue.extend((Path(e.path), depth + 1) for e in entries if e.is_dir())
    return None


def _closest_match(root: Path, split: Split, kind: str) -> str:
    """A sentence on where the listed videos really are, or what `root` holds instead."""
    ids = [video_id(ref) for ref, _ in split.items()[:20]]
    hit = find_named(root, ids)
    if hit is None:
        try:
            shown = sorted(n for n in os.listdir(root) if not is_hidden(n))
        except OSError:
            shown = []
        held = ", ".join(shown[:10]) + (", ..." if len(shown) > 10 else "") or "nothing"
        return (
            f"Nothing named like a listed video ({', '.join(ids[:3])}, ...) is within {_SEARCH_DEPTH} "
            f"levels of {root}, which holds: {held}. Check that the split lists belong to this data."
        )
    found = f"Found {hit}"
    if kind == "frames" and hit.is_file():
        return f"{found}: a video file; set --config.data.kind=videos."
    if kind == "videos" and hit.is_dir():
        return f"{found}: a frame folder; set --config.data.kind=frames."
    parts = hit.relative_to(root).parts
    split_names = {n: s for s in SPLIT_NAMES for n in split_folder_names(s)}
    at = next((i for i, p in enumerate(parts[:-1]) if p in split_names), None)
    if at is not None:
        if at > 0:
            new_root = root.joinpath(*parts[:at])
            return (
                f"{found}: this looks like split folders one level down; set "
                f"--config.data.root={new_root}."
            )
        return (
            f"{found}: this looks like split folders, but under {parts[0]}/ while this is the "
            f"{split.name} list; check that the lists match the folders."
        )
    return (
        f"{found}: point --config.data.root at the folder holding <class>/<video> or the videos "
        f"themselves (here {hit.parent.parent} or {hit.parent})."
    )


def describe_missing(root: Path, split: Split, kind: str, tried: Sequence[Path], where: str) -> str:
    """The error for a split none of whose listed videos is found under `root`: the paths tried for
    its first video, the layouts read, and the closest match on disk. `where` names the list."""
    reference, c = split.items()[0]
    return (
        f"None of the {split.num_videos} videos of {where} was found under {root} "
        f"(kind={kind!r}). For the first, {split.classes[c]}/{reference}, tried: "
        f"{format_tried(tried)}. Layouts read: {', '.join(LAYOUTS)}. {_closest_match(root, split, kind)}"
    )


def format_tried(paths: Sequence[Path], limit: int = 8) -> str:
    """Candidate paths, one suffix group per stem: ``a/x{.mp4,.webm}, a/y``."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        suffix = path.suffix if path.suffix.lower() in VIDEO_SUFFIXES else ""
        stem = str(path)[: len(str(path)) - len(suffix)] if suffix else str(path)
        groups.setdefault(stem, []).append(suffix)
    shown = [
        stem + ("{" + ",".join(s) + "}" if len(s) > 1 else s[0]) for stem, s in groups.items()
    ]
    more = f", ... ({len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more
