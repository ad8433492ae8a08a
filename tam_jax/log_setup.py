"""Logging of tam_jax's commands: the package's own messages (its `logging.getLogger(__name__)` loggers) at
INFO on stderr, Orbax's and grain's INFO chatter (every checkpoint save and restore, every data read) not.

Orbax and grain do not log through loggers named after their packages: they log through `absl.logging`,
the one "absl" logger that every absl user shares (and a few lines through the root logger), so no logger
level can quiet them alone. `setup` puts a filter on those two loggers that drops the records below
WARNING whose source file lies inside the orbax or grain package folders; their warnings and errors, and
everything else, pass. Commands run by `absl.app` (main, reproduce) show INFO by default (`--verbosity`
still applies); the argparse commands (visualize, tools.import_weights) get a stderr handler on the root
logger and tam_jax's loggers at INFO. A module run with `python -m` names its logger by `__spec__.name`,
as `__name__` is then "__main__", outside the tam_jax logger.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

QUIET_PACKAGES = ("orbax", "grain")


def _package_folders(names) -> tuple[str, ...]:
    """The folders of the installed packages `names` (as found on sys.path, and with links resolved),
    each ending in a path separator; without importing them."""
    folders = set()
    for name in names:
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            folders |= {os.path.join(folder, ""), os.path.join(os.path.realpath(folder), "")}
    return tuple(sorted(folders))


class QuietLibraries(logging.Filter):
    """Drops the records below WARNING logged from a file inside `QUIET_PACKAGES`."""

    def __init__(self, names=QUIET_PACKAGES):
        super().__init__()
        self.folders = _package_folders(names)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.folders)


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever `sys.stderr` is when a record comes (capture may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup() -> None:
    """Quiet Orbax and grain below WARNING; show tam_jax's INFO messages on stderr. Safe to call again."""
    for logger in (logging.getLogger("absl"), logging.getLogger()):
        if not any(isinstance(f, QuietLibraries) for f in logger.filters):
            logger.addFilter(QuietLibraries())
    if not logging.getLogger().handlers:  # not an absl app (its handler sits on the root): plain lines
        logging.basicConfig(format="%(message)s", handlers=[_Stderr()])
        logging.getLogger("tam_jax").setLevel(logging.INFO)
