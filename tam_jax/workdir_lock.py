"""One workdir, one run: an exclusive lock on `WORKDIR/run.lock` held for as long as a run lives.

The lock is an `fcntl.flock` on the file, so the kernel releases it when the process ends however it ends
(SIGKILL, out of memory, a crash): a crashed run never leaves a stale lock behind. The file records who
holds it (host, process id, start time, command) so that a second run can say which one is in its way.
Only the chief process of a multi-host run takes the lock; the others share the workdir as before.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from tam_jax import hosts
from tam_jax.errors import UserError

LOCK_NAME = "run.lock"


class WorkdirBusyError(UserError, RuntimeError):
    """Another live run holds the workdir; the message names it."""


def check_workdir(workdir: str | os.PathLike, *, must_exist: bool = False) -> None:
    """Raise UserError, naming `--workdir` and the fix, unless `workdir` is a folder this process can
    write (or can be created, unless `must_exist`). Creates nothing."""
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--workdir={workdir} is a file, not a folder; give a folder (created if missing).")
    if not path.exists():
        if must_exist:
            raise UserError(f"--workdir={workdir} does not exist; give the workdir of a trained run, or "
                            "train into it first (--mode=train).")
        parent = next(p for p in path.absolute().parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"--workdir={workdir} cannot be created: {parent} is not a folder you can write "
                            "to; give a path under one that is.")
    elif not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--workdir={workdir} is not writable by this user; give a folder you can write to.")


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (f"process {info.get('pid')} on {info.get('host')} (started {info.get('started')}: "
            f"{info.get('command')})")


@contextlib.contextmanager
def hold_workdir(workdir: str | os.PathLike):
    """Hold the workdir's lock for the duration of the block (chief process only).

    Raises WorkdirBusyError at once when a live process holds it. A workdir this call created is removed
    again when the block leaves nothing in it but the lock (a run that stopped before writing anything).
    """
    if not hosts.is_chief():
        yield
        return
    path = Path(workdir) / LOCK_NAME
    created = not path.parent.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir={workdir} cannot be created ({e.strerror}); give a folder you can write "
                        "to.") from None
    try:
        with _locked(path, workdir):
            yield
    finally:
        if created and [p.name for p in path.parent.iterdir()] == [LOCK_NAME]:
            path.unlink()
            path.parent.rmdir()


@contextlib.contextmanager
def _locked(path: Path, workdir: str | os.PathLike):
    """Hold the lock file `path` (see `hold_workdir`)."""
    with open(path, "a+") as handle:  # closing the file releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusyError(
                f"{workdir} is in use by {_holder(path)}. Wait for that run to finish (or stop it), or use "
                "another --workdir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        }))
        handle.flush()
        yield
