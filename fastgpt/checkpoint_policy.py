"""When a run evaluates and checkpoints, and its claim on out_dir.

A run claims its directory before writing anything there: the lock (one training per directory),
the guard (a new run never overwrites another's checkpoint unless asked), and the removal of the
temporary files a killed write left (safe once the lock is held: no one else writes there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from fastgpt.atomic_file import remove_temp_files
from fastgpt.checkpoint import CHECKPOINT_NAME
from fastgpt.run_lock import RunLock


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
        run refuses a directory that holds another run's checkpoint unless `overwrite`, which
        deletes that run's files first."""
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"--out-dir {str(self.out_dir)!r} is a file: name a directory (it is created if missing)")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RuntimeError(f"cannot create --out-dir {str(self.out_dir)!r}: {e.strerror}") from None
        lock = RunLock.acquire(self.out_dir)
        try:
            if self.resumed_at is None and (self.out_dir / CHECKPOINT_NAME).exists():
                if not overwrite:
                    raise ValueError(
                        f"--out-dir {str(self.out_dir)!r} already holds a run ({CHECKPOINT_NAME}): continue it with "
                        "--resume, start over with --overwrite (deletes its checkpoint and metrics), or choose "
                        "another --out-dir"
                    )
                for name in self.outputs:
                    (self.out_dir / name).unlink(missing_ok=True)
            removed = remove_temp_files(self.out_dir, self.outputs)
            if removed:
                print(f"fastgpt: removed {len(removed)} temporary file(s) left by an interrupted write: "
                      f"{', '.join(p.name for p in removed)}")
        except BaseException:
            lock.release()
            raise
        return lock
