"""Files the library writes for users, written whole or not at all.

`atomic_write` writes to a temporary name beside the target, flushes it to disk and renames it over the
target, so a reader (or a run killed mid-write and restarted) never sees half a file: it sees the old
file or the new one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs):
    """`with atomic_write(path) as f: f.write(...)`: `path` gets the new content only if the block ends
    without an exception; the temporary file is removed otherwise. `mode` is "w" or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing ('w' or 'wb'), not {mode!r}.")
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_write`)."""
    with atomic_write(path) as f:
        f.write(text)
