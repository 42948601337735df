"""One daemon per state directory: an exclusive, non-blocking flock on `state_dir/edge-gateway.lock`.

The lock lives as long as the open file descriptor, i.e. the process (a SIGHUP reload keeps it);
the kernel releases it when the process ends, however it ends, so a stale file never blocks a
start. The file holds the PID of the holder, for the message a second instance prints. The file
itself is never removed (removing it would let two processes lock two different files).
`buffer stats|dump` read the buffer without taking this lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "edge-gateway.lock"


class AlreadyRunning(Exception):
    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        holder = f"PID {pid}" if pid else "another process (PID not known)"
        super().__init__(f"{path} is locked by {holder}: an edge-gateway already runs on this state directory")


def write_durably(path: Path, text: str) -> None:
    """Replace a small state file so that a crash leaves the old or the new text, never a torn
    one: write beside it, fsync, rename over it."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def acquire(state_dir: str | Path) -> int:
    """Take the lock and write our PID into the file; return the descriptor (keep it open).

    Raises AlreadyRunning when another process holds it, OSError when the file cannot be opened."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(fd)
        os.close(fd)
        raise AlreadyRunning(path, pid) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    os.fsync(fd)
    return fd


def _holder(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
