"""`fastgpt check`: the offline compile checks, Triton's then CUDA's; no GPU needed.

Its flags belong to the two checks, so they pass through the `fastgpt` parser untouched (--help
included) to a parser built in `run` from the checks' own options.
"""

from __future__ import annotations

import argparse

from fastgpt.run.atomic_file import interrupts_deferred

NAME = "check"
HELP = ("compile every shipped Triton config and every CUDA kernel for sm_80/sm_90 offline: registers, spills, "
        "shared memory (no GPU needed; `fastgpt check --help` for its options)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser(NAME, add_help=False, help=HELP)


def run(args: argparse.Namespace) -> int:
    with interrupts_deferred():  # a Ctrl-C during the imports waits for them (fastgpt/cli/__init__.py says why)
        from fastgpt.verify import compile_check
        from fastgpt.verify import cuda_compile as cuda_compile_check
        from fastgpt.verify import triton_compile as triton_compile_check

    parser = argparse.ArgumentParser(
        prog="fastgpt check",
        description="Offline compile checks (no GPU needed): every shipped Triton config "
                    "(fastgpt.verify.triton_compile), then every CUDA kernel of csrc/cuda/ with nvcc "
                    "(fastgpt.verify.cuda_compile), for sm_80 and sm_90: registers, spills, shared memory. "
                    "A Triton config that spills is reported as dropped at run time (on a GPU the autotuner "
                    "drops a config that spills there); exit status 1 if a Triton call has no spill-free config "
                    "left, a CUDA kernel spills, or anything overflows shared memory or fails to compile.")
    compile_check.add_arch_option(parser)
    triton_compile_check.add_options(parser)  # --dtype, --head-dim, --jobs, --full: the Triton check's only
    options = parser.parse_args(args.passthrough)
    triton_status = triton_compile_check.run(options)
    print(flush=True)
    cuda_status = cuda_compile_check.run(options.arch)
    return max(triton_status, cuda_status)
