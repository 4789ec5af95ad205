"""metrics.jsonl: one JSON record per evaluation, appended as a run goes.

The file is strict JSON, one object per line: a number that is not finite (which json.dumps would
write as the non-standard NaN or Infinity) is written as null. A resumed run keeps the records up
to its checkpoint's iteration, rewriting the file atomically; a last line cut short by a kill
mid-append is dropped, with a note, instead of blocking the resume, and a record that is not one
(a field missing or of the wrong kind) is refused before the resumed run trains. An append that
fails (a full disk) takes back what it wrote: the file holds whole records only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from fastgpt.run.atomic_file import replace_atomically

METRICS_NAME = "metrics.jsonl"


def json_line(record: dict[str, Any]) -> str:
    """`record` as one line of strict JSON, non-finite numbers as null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


# What every record holds (a number, or null where it was not finite), and what some do.
LOSSES = ("train_loss", "val_loss")
NUMBERS = ("step_loss", "tokens_per_s", "mfu_estimate", "elapsed_s", "lr")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of the metrics file at `path` ([] if there is none). A torn last line is dropped
    with a note; a damaged line elsewhere, or a record with a field that is missing or not what
    fastgpt writes, is refused, naming the line and the field."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")  # "" last when the file ends with a newline
    records = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            record = json.loads(line)  # lenient: older runs wrote NaN, which is rewritten as null
            if not isinstance(record, dict) or "iter" not in record:
                raise ValueError
        except ValueError:
            if number == len(lines):  # no newline after it: the write was cut short
                print(f"fastgpt: {path}: dropped its last line, cut short by an interrupted write: {line[:60]!r}")
                continue
            raise ValueError(f"{str(path)!r} line {number} is not a metrics record ({line[:60]!r}): repair or remove "
                             "that line to resume") from None
        problem = record_problem(record)
        if problem:
            raise ValueError(f"{str(path)!r} line {number}: {problem}: repair or remove that line to resume")
        records.append(record)
    return records


def record_problem(record: dict[str, Any]) -> Optional[str]:
    """What is wrong with a parsed record (None if nothing): the field and its value."""
    it = record["iter"]
    if not isinstance(it, int) or isinstance(it, bool) or it < 0:
        return f"iter is {it!r}, not an iteration (an integer >= 0)"
    for name in LOSSES:
        if name not in record:
            return f"the record has no {name}"
    for name in (*LOSSES, *NUMBERS):
        value = record.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            return f"{name} is {value!r:.40}, not a number (or null)"
    if not isinstance(record.get("backend", ""), str):
        return f"backend is {record['backend']!r:.40}, not a backend's name"
    return None


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict[str, Any]] = []  # the ones this run wrote

    @classmethod
    def start(cls, path: str | Path, resumed_at: Optional[int]) -> "MetricsLog":
        """The log of a new run (empty), or of a run resumed from a checkpoint at iteration
        `resumed_at`: the records past it are dropped (the interrupted run wrote them after its
        last checkpoint, and the resumed run writes them again)."""
        path = Path(path)
        kept = [] if resumed_at is None else [r for r in read_records(path) if r["iter"] <= resumed_at]
        text = "".join(json_line(r) for r in kept)
        replace_atomically(path, lambda f: f.write(text.encode("utf-8")))
        return cls(path)

    def append(self, record: dict[str, Any]) -> None:
        """Appends the record's line. If the write fails (a full disk), what it wrote is cut off
        again: the file keeps whole records only, and the error is raised."""
        data = json_line(record).encode("utf-8")  # serialised before the file is opened: a bad record writes nothing
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data):]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        self.records.append(record)
