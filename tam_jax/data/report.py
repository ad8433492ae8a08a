"""Bad input: the error every reader raises, and the report that counts what was skipped.

Real copies of Kinetics or SSv2 always miss a few files. Every reader raises `VideoError` (naming
the path and what is wrong) for a missing, unreadable, truncated or empty video and for a corrupt
JPEG; the code that iterates over items catches it, records it in a `SkipReport` and moves on.
Nothing is dropped silently: each new path is logged once when first skipped, and
`SkipReport.summary()` gives the count and the paths at the end of a run.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable

from tam_jax.errors import UserError

_log = logging.getLogger(__name__)


class VideoError(UserError):
    """A video (or one of its frames) that cannot be used; `path` names the file or folder."""

    def __init__(self, path: object, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):
        # Worker processes send these back; the default pickling would lose `reason`.
        return (VideoError, (self.path, self.reason))


@dataclasses.dataclass(frozen=True)
class ClipError:
    """A clip given by path (prediction, figures) that could not be used, and why."""

    path: str
    error: str

    def to_json(self) -> dict:
        return {"path": self.path, "error": self.error}


@dataclasses.dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


class SkipReport:
    """Records skipped items, one entry per path (the first reason seen), logging each new one.

    Thread-safe, so the usability scan may record from threads. Worker processes cannot share it:
    they return `Skipped` entries with their results and the main process calls `extend`.
    """

    def __init__(self) -> None:
        self._entries: dict[str, Skipped] = {}
        self._lock = threading.Lock()

    def add(self, path: object, reason: str) -> bool:
        """Records a skipped path; returns True if it was not recorded before."""
        entry = Skipped(str(path), reason)
        with self._lock:
            if entry.path in self._entries:
                return False
            self._entries[entry.path] = entry
        _log.warning("Skipping %s: %s", entry.path, entry.reason)
        return True

    def add_error(self, error: VideoError) -> bool:
        return self.add(error.path, error.reason)

    def extend(self, entries: Iterable[Skipped]) -> None:
        for entry in entries:
            self.add(entry.path, entry.reason)

    @property
    def entries(self) -> tuple[Skipped, ...]:
        with self._lock:
            return tuple(self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def summary(self, max_lines: int = 20) -> str:
        """Lines for the end of a run: the count, then up to `max_lines` paths with reasons."""
        entries = self.entries
        if not entries:
            return "Skipped 0 videos: all listed input was readable."
        lines = [f"Skipped {len(entries)} unreadable or missing video(s)/frame(s):"]
        lines += [f"  {e.path}: {e.reason}" for e in entries[:max_lines]]
        if len(entries) > max_lines:
            lines.append(
                f"  ... and {len(entries) - max_lines} more (SkipReport.entries has them all)"
            )
        return "\n".join(lines)
