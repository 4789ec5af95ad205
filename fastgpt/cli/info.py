"""`fastgpt info`: what this machine can run, as text or JSON (fastgpt/verify/info.py builds the report)."""

from __future__ import annotations

import argparse

from fastgpt.run.atomic_file import interrupts_deferred

NAME = "info"
HELP = ("what this machine can run: versions, CPU and GPUs, the C++ extension's cache and build flags, each "
        "attention kernel path per dtype (available, or why not)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(NAME, help=HELP)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    import json

    with interrupts_deferred():  # a Ctrl-C during the imports waits for them (fastgpt/cli/__init__.py says why)
        from fastgpt.verify.info import render, report

    info = report()
    print(json.dumps(info, indent=1) if args.json else render(info))
    return 0
