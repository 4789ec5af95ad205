"""One training per run directory at a time: an exclusive flock on `train.lock` in it.

The kernel drops a flock when its process exits, however it exits (kill -9 included), so a
killed run never leaves the directory locked; the pid written into the file only names the
holder in the refusal.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "train.lock"


class RunDirectoryBusy(RuntimeError):
    """Another process holds the run directory's lock."""


class RunLock:
    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: str | os.PathLike) -> "RunLock":
        """The lock of `directory` (which must exist), or RunDirectoryBusy naming the holder's pid."""
        path = Path(directory) / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirectoryBusy(
                    f"another training (pid {holder}) is writing to {str(path.parent)!r}: wait for it to end, or "
                    "choose another --out-dir"
                ) from None
            # The previous holder removes the file as it releases: if it did so between our open and
            # our flock, we hold a file nobody else can find. Start over on the current one.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked, so no one can take the old file
        os.close(self._fd)  # drops the flock
        self._fd = None
