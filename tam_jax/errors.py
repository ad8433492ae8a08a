"""The errors a user can cause, and how every command line reports them: one `error:` line, no traceback.

A mistake in the input (a config key, a flag, a file) raises a `UserError` subclass whose message names
the input and the fix; `run_command` prints it as `error: MESSAGE` and exits 1. `OSError`s (a missing or
unwritable path) are reported the same way, with the path. Anything else is a bug in tam_jax: one line
says so, where it happened and how to see the traceback (`TAM_JAX_TRACEBACK=1`), and the exit status is
70 (`EX_SOFTWARE`).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

TRACEBACK_VARIABLE = "TAM_JAX_TRACEBACK"
USER_ERROR_STATUS = 1
BUG_STATUS = 70


class UserError(Exception):
    """A mistake in what the user gave; the message names the input (key, flag, file) and the fix."""


class ConfigError(UserError, ValueError):
    """A config value that cannot run; the message starts with `config.KEY:`."""


class FlagError(UserError, ValueError):
    """A command-line flag that cannot run; the message names the flag (`--flag=value: ...`)."""


class DataError(UserError, ValueError):
    """Input files that cannot be used: data that cannot make the run's episodes (a class without readable
    videos, too few classes), a malformed split list, weights that do not fit; the message names the file."""


def describe(error: BaseException) -> str:
    """The one-line message for a user error: an OSError names its path and reason, not `[Errno N]`."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.filename}: {error.strerror}"
    return str(error).strip()


def bug_message(error: BaseException) -> str:
    """One line for an unexpected exception: a bug in tam_jax, where it happened, how to see more."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {os.path.relpath(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return (f"error: internal error in tam_jax (a bug; please report it): {type(error).__name__}: {error}"
            f"{where}. Run again with {TRACEBACK_VARIABLE}=1 to see the full traceback.")


def run_command(body: Callable[[], int | None], *, user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command's `body` and return its exit status, printing errors as one `error:` line.

    `UserError`, `OSError` and `user_errors` (a command's own, e.g. ImportError for a missing optional
    package) -> status 1; any other exception -> `bug_message`, status 70, or the traceback itself when
    `TAM_JAX_TRACEBACK` is set.
    """
    try:
        return body() or 0
    except (UserError, OSError, *user_errors) as e:
        print(f"error: {describe(e)}", file=sys.stderr)
        return USER_ERROR_STATUS
    except Exception as e:
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        print(bug_message(e), file=sys.stderr)
        return BUG_STATUS
