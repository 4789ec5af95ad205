"""When a run evaluates and checkpoints, and its claim on out_dir.

A run claims its directory before writing anything there: the lock (one training per directory),
the guard (a new run never overwrites another's files unless asked), and the removal of the
temporary files a killed write left (safe once the lock is held: no one else writes there).
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Optional, Sequence

from fastgpt.run.atomic_file import remove_temp_files
from fastgpt.run.checkpoint import CHECKPOINT_NAME
from fastgpt.run.lock import LOCK_NAME, RunLock


class CheckpointPolicy:
    def __init__(self, out_dir: Path, eval_interval: int, max_iters: int, resumed_at: Optional[int],
                 outputs: Sequence[str]):
        """resumed_at: the iteration of the checkpoint the run continues (None for a new run);
        outputs: the names of the files a run writes in out_dir."""
        self.out_dir = out_dir
        self.eval_interval = eval_interval
        self.max_iters = max_iters
        self.resumed_at = resumed_at
        self.outputs = outputs

    def evaluates_at(self, it: int) -> bool:
        """Every eval_interval steps and at the end; not where the run resumed, which its
        checkpoint and metrics already hold."""
        return (it % self.eval_interval == 0 or it >= self.max_iters) and it != self.resumed_at

    def claim(self, overwrite: bool) -> RunLock:
        """Takes out_dir for this run and returns its lock (release it when the run ends). A new
        run refuses a directory that holds another run's files unless `overwrite`, which deletes
        them first. Everything that would stop the run at its first write or at its end (a
        read-only directory, a folder where a file goes) is refused here, before training."""
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"--out-dir {str(self.out_dir)!r} is a file: name a directory (it is created if missing)")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RuntimeError(f"cannot create --out-dir {str(self.out_dir)!r}: {e.strerror}") from None
        lock = self._lock()
        try:
            self._refuse_folders()
            if self.resumed_at is None:
                self._refuse_another_run(overwrite)
            removed = remove_temp_files(self.out_dir, self.outputs)
            if removed:
                print(f"fastgpt: removed {len(removed)} temporary file(s) left by an interrupted write: "
                      f"{', '.join(p.name for p in removed)}")
        except BaseException:
            lock.release()
            raise
        return lock

    def _lock(self) -> RunLock:
        try:
            return RunLock.acquire(self.out_dir)
        except OSError as e:
            # the lock is the run's first write there: a directory it cannot write fails here, before training
            why = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable by this user",
                   errno.EPERM: "is not writable by this user"}.get(e.errno, "cannot be written")
            raise RuntimeError(f"--out-dir {str(self.out_dir)!r} {why} ({e.strerror} on creating {LOCK_NAME}): "
                               "choose a directory you can write with --out-dir") from None

    def _refuse_folders(self) -> None:
        """A folder (or anything but a file) where the run writes one of its files: the run would fail
        at that write, the loss curve's only after training."""
        for name in self.outputs:
            path = self.out_dir / name
            if (path.exists() or path.is_symlink()) and not path.is_file():
                what = "a directory" if path.is_dir() else "not a regular file"
                raise ValueError(f"{str(path)!r} is {what}, where the run writes its {name}: move it out of "
                                 "--out-dir (a run deletes no folder), or choose another --out-dir")

    def _refuse_another_run(self, overwrite: bool) -> None:
        """A new run in a directory that holds another run's files: refused unless `overwrite`, which
        deletes them. Files without a checkpoint (metrics.jsonl, the plot) are still that run's history;
        an empty one (a run stopped before its first record) holds none."""
        found = [name for name in self.outputs
                 if (self.out_dir / name).exists() and (name == CHECKPOINT_NAME or (self.out_dir / name).stat().st_size)]
        if not found:
            return
        if not overwrite:
            if CHECKPOINT_NAME in found:
                raise ValueError(
                    f"--out-dir {str(self.out_dir)!r} already holds a run ({CHECKPOINT_NAME}): continue it with "
                    "--resume, start over with --overwrite (deletes its checkpoint and metrics), or choose "
                    "another --out-dir"
                )
            raise ValueError(
                f"--out-dir {str(self.out_dir)!r} holds an earlier run's {' and '.join(found)} (no {CHECKPOINT_NAME}, "
                "so it cannot be resumed): start over with --overwrite (deletes them), or choose another --out-dir"
            )
        for name in found:
            (self.out_dir / name).unlink(missing_ok=True)
