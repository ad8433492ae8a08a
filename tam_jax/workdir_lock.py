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

LOCK_NAME = "run.lock"


class WorkdirBusyError(RuntimeError):
    """Another live run holds the workdir; the message names it."""


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

    Raises WorkdirBusyError at once when a live process holds it.
    """
    if not hosts.is_chief():
        yield
        return
    path = Path(workdir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
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
