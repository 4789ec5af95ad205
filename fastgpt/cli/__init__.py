"""The `fastgpt` command: train, sample, parity, check, bench.

Every ModelConfig/TrainConfig field is a flag of `fastgpt train` (n_layer -> --n-layer); a flag
given on the command line overrides the preset's value.

One module per command (fastgpt/cli/<command>.py): `add_parser(subparsers)` registers its flags and
`run(args)` does its work, returning the exit status. Only the command being run has its flags
built, and each imports its library inside `run`, so a command loads what it needs and nothing
more: `fastgpt train` never loads the benchmarks or the GPU report.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from typing import Iterable, Optional, Sequence

from fastgpt.cli import bench, check, gpu_report, info, parity, sample, train
from fastgpt.run.atomic_file import interrupts_deferred, sigterm_raises, stop_status, stop_text

# Nothing here imports torch, and neither does importing the command modules: main() builds the
# parser and each command imports its library, so that a Ctrl-C during those imports of a second
# or more is answered in one line like any other.
COMMANDS = (train, sample, parity, check, bench, info, gpu_report)  # in the order `fastgpt --help` lists them

# Errors of the user's files and disks that one line explains (a full or read-only disk, a missing
# permission, a folder where a file belongs), wherever a command meets them.
_ONE_LINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
                              errno.ENOTDIR, errno.ENAMETOOLONG})


def build_parser(commands: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The `fastgpt` parser. `commands`: the names of the commands whose flags are built (default:
    all); the others are listed with their help line only, which is all `fastgpt --help` shows of
    them, so that running one command never builds, nor imports for, another's flags. A command
    listed only cannot be parsed: its namespace has no `func`."""
    build = {command.NAME for command in COMMANDS} if commands is None else set(commands)
    parser = argparse.ArgumentParser(prog="fastgpt", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        if command.NAME in build:
            command.add_parser(subparsers).set_defaults(func=command.run)
        else:
            subparsers.add_parser(command.NAME, help=command.HELP)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    with sigterm_raises():  # SIGTERM stops a command as Ctrl-C does: its cleanups run, its writes finish
        try:
            return _main(argv, command)
        except KeyboardInterrupt as stop:
            # A stop before the command could say where it stood (while the library imports): one line.
            print(f"fastgpt{f' {command}' if command else ''}: {stop_text(stop)}", file=sys.stderr)
            return stop_status(stop)


def _main(argv: list[str], command: Optional[str]) -> int:
    _log_fastgpt_messages()
    # A stop during these imports waits for them to end (a second or two): raised inside them, some
    # third-party import code takes it for a failed optional import and goes on half-initialised.
    # Each command's run() defers its own imports the same way.
    with interrupts_deferred():
        parser = build_parser([command] if command else [])
    args, passthrough = parser.parse_known_args(argv)
    if passthrough and args.command != "check":
        parser.error(f"unrecognized arguments: {' '.join(passthrough)}")
    args.passthrough = passthrough
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Bad input from the user: one clear line, not a traceback.
        print(f"fastgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _ONE_LINE_ERRNOS:
            raise  # not the user's to fix: the traceback is what a bug report needs
        where = f"{e.filename!r}: " if e.filename else ""
        print(f"fastgpt {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


def _log_fastgpt_messages() -> None:
    """Our own messages (which backend 'auto' picked) at INFO on stderr; other libraries' loggers untouched."""
    log = logging.getLogger("fastgpt")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fastgpt: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


if __name__ == "__main__":
    sys.exit(main())
