"""Replacing a file atomically: write a temporary file beside it, sync it, rename it over the old one.

A crash at any moment leaves the old file or the new one, never half of one. What a crash can
leave behind is the temporary file (`.NAME.tmp-PID`); `remove_temp_files` deletes those on the
next start, once nothing else can be writing them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator


def temp_path(path: Path) -> Path:
    """Where this process writes the next version of `path`: hidden, beside it (a rename within
    one directory is atomic), and named after the process, so two writers never share one."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def replace_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Calls write(f) on a temporary file, syncs it to disk, then renames it over `path`.
    Ctrl-C or SIGTERM during the write is held back until the new file is in place, then raised."""
    path = Path(path)
    tmp = temp_path(path)
    with interrupts_deferred():
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _sync_directory(path.parent)


def remove_temp_files(directory: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Deletes the temporary files of `names` in `directory` that a killed process left, and
    returns them. Only safe where no other process can be writing them (under the run's lock)."""
    removed = []
    for name in names:
        for tmp in Path(directory).glob(f".{name}.tmp-*"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return sorted(removed)


# The signals that stop a run: Ctrl-C, and SIGTERM (kill, a job scheduler, torchrun ending its workers).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt: the same cleanups run and the same
    deferral protects a write, where Python's default would end the process mid-write."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated for the block, where it has its default disposition (an ignored
    SIGTERM or a handler of the caller's is left alone)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stop_text(stop: KeyboardInterrupt) -> str:
    """How a command stopped by a signal says so."""
    return "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"


def stop_status(stop: KeyboardInterrupt) -> int:
    """The exit status of a command stopped by a signal: the shell's 128 + the signal's number."""
    return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Holds SIGINT and SIGTERM back for the block, then delivers them to the handlers from before.
    A KeyboardInterrupt raised inside torch.save's C++ writer surfaces as a cryptic RuntimeError
    and loses the new file, and SIGTERM's default kills the process with the temporary file half
    written; finishing the write first costs a moment and keeps the newest checkpoint.
    Blocks nest: an inner one hands a held-back signal on to the outer one."""
    # Python runs signal handlers in the main thread only, and one set from C cannot be restored.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = [signum for signum in STOP_SIGNALS if signal.getsignal(signum) is not None]
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):  # each once, in the order they came
            signal.raise_signal(signum)


def _sync_directory(directory: Path) -> None:
    """Persists a rename (the directory entry itself), where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
