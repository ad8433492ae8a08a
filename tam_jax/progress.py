"""The one progress bar of the library: tqdm, shown on the chief process only, and nowhere when disabled."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

_hidden = False  # set by `hidden()`: no bar anywhere (a command's --no-progress)


def bar(total: int | None, desc: str, unit: str, *, enabled: bool = True, initial: int = 0,
        leave: bool = True):
    """A tqdm bar over `total` units; disabled (a no-op object) when `enabled` is False, inside `hidden()`
    or off the chief."""
    from tqdm.auto import tqdm

    from tam_jax.hosts import is_chief

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave,
                disable=not (enabled and not _hidden and is_chief()))


@contextlib.contextmanager
def hidden(hide: bool = True) -> Iterator[None]:
    """No progress bar inside the block when `hide` (a command's --no-progress reaches every bar)."""
    global _hidden
    before, _hidden = _hidden, _hidden or hide
    try:
        yield
    finally:
        _hidden = before


def track(items: Iterable, total: int, desc: str, unit: str, *, enabled: bool = True):
    """Iterate `items` with a bar (see `bar`)."""
    with bar(total, desc, unit, enabled=enabled) as progress:
        for item in items:
            yield item
            progress.update(1)


def write(message: str) -> None:
    """Print a line above any open bar, on the chief process only."""
    from tqdm.auto import tqdm

    from tam_jax.hosts import is_chief

    if is_chief():
        tqdm.write(message)
