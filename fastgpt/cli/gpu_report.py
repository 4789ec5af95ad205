"""`fastgpt gpu-report`: the GPU stages in one call (fastgpt/bench/gpu_report.py runs them).

The stages' flags are defined beside the stages, so building this command's parser, and only
this command's, imports the GPU report.
"""

from __future__ import annotations

import argparse

from fastgpt.run.atomic_file import interrupts_deferred

NAME = "gpu-report"
HELP = ("the GPU half proven in one call: build, parity, sanitizer, attention speed, training, generation, each "
        "stage within a time budget; report.json/.md and plots")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from fastgpt.bench.gpu_report import add_arguments

    parser = subparsers.add_parser(NAME, help=HELP)
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    with interrupts_deferred():  # a Ctrl-C during the imports waits for them (fastgpt/cli/__init__.py says why)
        from fastgpt.bench.gpu_report import main as gpu_report_main

    return gpu_report_main(args)
