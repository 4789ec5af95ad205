"""The Triton kernels' offline compile check (no GPU needed): every shipped attention config compiles
for sm_80 and sm_90 within the shared memory of one block, and every call has a config that spills
no register.

    python -m fastgpt.verify.triton_compile [--arch 80 --arch 90] [--dtype fp16 --dtype bf16 --dtype fp32]
                                                   [--full] [--jobs N] [--json FILE]

`fastgpt check` runs it, then the CUDA kernels' check (fastgpt.verify.cuda_compile); the limits
and the table layout are fastgpt.verify.compile_check's, shared by both.

For each (kernel, arch, input dtype, head dim, dropout on/off, shipped config; fp32 inputs have
configs of their own), for the attention options' variants (OPTION_VARIANTS: each option a
compile-time switch, at OPTION_HEAD_DIMS in 16-bit), for packed sequences (VARLEN_VARIANTS: the
VARLEN switch, its tensors (1, H, total, D) views with a z stride of 0) and for a paged KV cache
(PAGED_VARIANTS: the forward's PAGED switch, keys through a block table), it compiles the kernel with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, runs the bundled
`ptxas -v` on the PTX (Triton's own cubin step, whose -v report is captured) and reads registers
and spill bytes from that report, shared memory from the kernel metadata.

A config that spills is not a failure by itself: on a GPU the autotuner compiles the candidates
of each call and drops those that spill there (flash_attention_ops._spill_pruner), since spills
move with the ptxas each triton bundles. It is reported as "dropped at run time". Exit status 1
if some call (kernel, arch, dtype, head dim, dropout) has no spill-free config left, or a config
overflows shared memory or fails to compile.

The kernels are specialised as a launch from the GPT specialises them: 16-byte aligned pointers,
strides divisible by 16 except the unit stride of the head dim. T (T_q, T_k) and H are never
specialised (do_not_specialize), so the one variant checked is the one that runs for every T.
"fwd_decode" is the forward kernel with the decode configs (few queries over a KV cache).

With dropout, the table also gives the Philox rounds per attention weight, counted in the PTX:
each Philox4x32 round is two 32-bit high multiplies (`mul.hi.u32`, which nothing else in these
kernels emits), over one thread's share of a tile in each of the kernel's two copies of its loop
(off and on the diagonal). One 10-round call per weight would be 10; the kernels draw eight
weights per call (kernels/flash_attention.py, _dropout_keep), so at most 1.25.

It must run in a process where Triton is not interpreting (TRITON_INTERPRET=1 turns the kernels
into Python functions that cannot be compiled); when called from such a process it re-runs itself
in a fresh one. The ptxas numbers are kept in the kernel metadata, so Triton's cache
(~/.triton/cache, TRITON_CACHE_DIR) makes a second run take seconds.

The results depend only on the kernels' sources, this check's own, the triton that compiles them
and the compiler's environment: `--json` writes them with that key (record_key), and the test suite
reads the committed record, benchmarks/results/triton_compile_check.json, instead of compiling
again while its key matches (tests/test_triton_compile_check.py). After a change to the kernels,
refresh it from the checkout's root with

    python -m fastgpt.verify.triton_compile --json benchmarks/results/triton_compile_check.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastgpt.verify import compile_check
from fastgpt.kernels import flash_attention_configs as cfg
from fastgpt.kernels.flash_attention_configs import CHECKED_HEAD_DIMS, MAX_HEAD_DIM, MIN_HEAD_DIM

DTYPES = ("fp16", "bf16", "fp32")
# A representative GPT call: q, k, v are views of one (B, T, 3, H, D) buffer, outputs (B, T, H, D).
EXAMPLE_H, EXAMPLE_T = 6, 256


@dataclass(frozen=True)
class Job:
    kernel: str  # "fwd", "fwd_decode", "bwd_dkdv", "bwd_dq", "bwd_preprocess"
    arch: int
    dtype: str
    head_dim: int
    dropout: bool
    config: cfg.KernelConfig
    grouped: bool = False  # the grouped-query variant (GROUP > 1, a runtime value) instead of GROUP = 1
    # the options compiled in (OPTION_VARIANTS, VARLEN_VARIANTS, PAGED_VARIANTS), in OPTIONS' order
    options: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The kernel and its variant: "bwd_dkdv/gqa", "fwd+window+softcap"."""
        return self.kernel + ("/gqa" if self.grouped else "") + "".join(f"+{o}" for o in self.options)


@dataclass
class Result:
    job: Job
    registers: int = -1
    spill_bytes: int = -1  # stores + loads
    shared_bytes: int = -1
    error: Optional[str] = None
    philox_rounds_per_weight: Optional[float] = None  # dropout variants only

    @property
    def verdict(self) -> str:
        return compile_check.verdict(self.job.arch, self.spill_bytes, self.shared_bytes, self.error)

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


def _kernel_fn(kernel: str):
    from fastgpt.kernels.flash_attention import _attn_fwd
    from fastgpt.kernels.flash_attention_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess

    return {"fwd": _attn_fwd, "fwd_decode": _attn_fwd, "bwd_dkdv": _attn_bwd_dkdv, "bwd_dq": _attn_bwd_dq,
            "bwd_preprocess": _attn_bwd_preprocess}[kernel]


def _int_arg(value: int, specialize: bool) -> tuple[str, bool]:
    """What Triton's launcher makes of an int argument: (type, divisible by 16); 1 -> constexpr."""
    if specialize and value == 1:
        return "constexpr", False
    return ("i32" if -2**31 <= value < 2**31 else "i64"), specialize and value % 16 == 0


def _example_args(job: Job) -> dict:
    """Runtime argument values of the representative call, by kernel argument name."""
    H, T, D = EXAMPLE_H, EXAMPLE_T, job.head_dim
    qkv = (T * 3 * H * D, D, 3 * H * D, 1)  # strides of a (B, H, T, D) view of (B, T, 3, H, D)
    bthd = (T * H * D, D, H * D, 1)  # out, dout, dq, dk, dv
    layouts = {"q": qkv, "k": qkv, "v": qkv}
    if "varlen" in job.options:  # (1, H, total, D) views of packed sequences: the z stride is 0
        qkv, bthd = (0, *qkv[1:]), (0, *bthd[1:])
        layouts = {"q": qkv, "k": qkv, "v": qkv}
    # lengths, H and the window's sides are never specialised: any values do; GROUP = 1 is (a
    # constexpr), 4 stands for any other
    args = {"H": H, "GROUP": 4 if job.grouped else 1, "T": T, "T_Q": T, "T_K": T, "window_left": T // 4,
            "window_right": 0 if "bidirectional" not in job.options else T // 4}
    stride_names = [n for n in _kernel_fn(job.kernel).arg_names if n.startswith("stride_")]
    for i, name in enumerate(stride_names):
        args[name] = layouts.get(name[len("stride_"):-1], bthd)[i % 4]
    args["stride_az"], args["stride_ah"] = 0, 1  # ALiBi slopes given per head, expanded over the batch
    args["stride_bt"], args["page_size"] = 7, 16  # a block table's row (never specialised), a page of 16 keys
    return args


def _switches(job: Job) -> dict:
    """The options' compile-time switches of job's kernel (the backward kernels take no SINKS)."""
    switches = {"BANDED": bool({"bidirectional", "window"} & set(job.options)), "SOFTCAP": "softcap" in job.options,
                "ALIBI": "alibi" in job.options, "VARLEN": "varlen" in job.options}
    if job.kernel in ("fwd", "fwd_decode"):
        switches["SINKS"] = "sinks" in job.options
        switches["PAGED"] = "paged" in job.options
    return switches


def _source(job: Job):
    from triton.compiler import ASTSource

    fn = _kernel_fn(job.kernel)
    element = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}[job.dtype]
    constexprs = {"HEAD_DIM": job.head_dim, "HEAD_DIM_PAD": cfg.padded_head_dim(job.head_dim)}
    if job.kernel == "bwd_preprocess":
        constexprs.update(BLOCK_M=job.config.block_m, VARLEN="varlen" in job.options)
    else:
        constexprs.update(job.config.meta, DROPOUT=job.dropout,
                          DOT_PRECISION=cfg.dot_precision(job.dtype == "fp32"), **_switches(job))
    packed = "varlen" in job.options
    unused = {"Seed": not job.dropout, "Sinks": "sinks" not in job.options, "Alibi": "alibi" not in job.options,
              "Cu_seqlens_q": not packed, "Cu_seqlens_k": not packed, "Block_table": "paged" not in job.options}
    ints = _example_args(job)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if unused.get(name):
            signature[name], constexprs[name] = "constexpr", None
            continue
        if name in ints:
            signature[name], divisible = _int_arg(ints[name], not fn.params[i].do_not_specialize)
            if signature[name] == "constexpr":
                constexprs[name] = ints[name]
        elif name in ("LSE", "Delta", "Alibi"):
            signature[name], divisible = "*fp32", True
        elif name == "Seed":
            signature[name], divisible = "*i64", True
        elif name.startswith("Cu_seqlens") or name == "Block_table":
            signature[name], divisible = "*i32", True
        elif name[0].isupper():
            signature[name], divisible = element, True
        else:  # scale, qk_scale, dropout_p, dropout_scale, softcap_scale, softcap_log2
            signature[name], divisible = "fp32", False
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs)


def _record_ptxas(backend=None, stages=None, options=None, language=None, capability=None):
    """Triton stage hook: the `cubin` stage (Triton running the bundled `ptxas -v` on the PTX) with
    its report captured into the kernel metadata, which Triton's cache then keeps with the kernel."""
    if backend is None:  # Triton asks for a key that separates these kernels in its cache
        return "fastgpt-ptxas-report", "1"
    make_cubin = stages["cubin"]

    def cubin_with_report(ptx, metadata):
        import contextlib
        import io

        from triton import knobs

        log = io.StringIO()
        with contextlib.redirect_stdout(log), knobs.nvidia.scope():
            knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas's -v report
            cubin = make_cubin(ptx, metadata)
        report = log.getvalue()
        metadata["ptxas_registers"] = int(re.search(r"Used (\d+) registers", report).group(1))
        metadata["ptxas_spill_bytes"] = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
        return cubin

    stages["cubin"] = cubin_with_report


def run_job(job: Job) -> Result:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    knobs.runtime.add_stages_inspection_hook = _record_ptxas
    try:
        compiled = triton.compile(_source(job), target=GPUTarget("cuda", job.arch, 32),
                                  options={"num_warps": job.config.num_warps, "num_stages": job.config.num_stages})
        meta = compiled.metadata
        rounds = philox_rounds_per_weight(job, compiled.asm["ptx"]) if job.dropout else None
        return Result(job, meta.ptxas_registers, meta.ptxas_spill_bytes, meta.shared, philox_rounds_per_weight=rounds)
    except Exception as e:  # a config that does not compile is a failure to report, not a crash
        return Result(job, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])


# Each kernel streams its tiles through two copies of its loop, off and on the diagonal; with a band
# (bidirectional or a window) through three: its two edges and the blocks between them.
LOOP_COPIES, BANDED_LOOP_COPIES = 2, 3


def philox_rounds_per_weight(job: Job, ptx: str) -> float:
    """Philox rounds per attention weight in `job`'s PTX: two mul.hi.u32 per round, over one
    thread's share of a (BLOCK_M, BLOCK_N) tile in each copy of the loop."""
    high_multiplies = sum(line.split()[0] == "mul.hi.u32" for line in ptx.splitlines() if line.strip())
    weights_per_thread = job.config.block_m * job.config.block_n / (32 * job.config.num_warps)
    copies = BANDED_LOOP_COPIES if _switches(job)["BANDED"] else LOOP_COPIES
    return high_multiplies / 2 / (copies * weights_per_thread)


# The grouped-query variant of dK/dV, the kernel grouping changes most (a loop over the group's
# query heads around both of its loops), at the widest head dim of each shipped list. Grouped fwd
# and dQ differ from GROUP = 1 by one integer division; not compiled here, to keep the check's time.
GROUPED_HEAD_DIMS = (64, 128, 256)
# The attention options' variants (each option a compile-time switch; fastgpt/attention/api.py): each
# option alone and all of them at once, with and without dropout, at the head dims most models run,
# in 16-bit (the tensor-core path; fp32's own lists and bf16 take the same switches). Sinks change
# the forward only (the backward reads them in the forward's lse).
OPTION_VARIANTS = (("bidirectional",), ("window",), ("softcap",), ("sinks",), ("alibi",),
                   ("bidirectional", "window", "softcap", "sinks", "alibi"))
OPTION_HEAD_DIMS, OPTION_DTYPES = (64, 128), ("fp16",)
# Packed sequences (VARLEN, a compile-time switch of every kernel): alone in 16-bit and fp32
# (whose thin lists leave the fewest spare registers), with every option at once in 16-bit, and the
# grouped dK/dV, at the option head dims.
VARLEN_VARIANTS = {"fp16": (("varlen",), ("bidirectional", "window", "softcap", "sinks", "alibi", "varlen")),
                   "fp32": (("varlen",),)}
# A paged KV cache (PAGED, a switch of the forward only: a paged cache serves inference, without
# dropout): alone and with every option in 16-bit, alone in fp32, at the option head dims.
PAGED_VARIANTS = {"fp16": (("varlen", "paged"),
                           ("bidirectional", "window", "softcap", "sinks", "alibi", "varlen", "paged")),
                  "fp32": (("varlen", "paged"),)}


def jobs(archs, dtypes, head_dims) -> list[Job]:
    """Every shipped config of every kernel, for each arch, dtype, head dim and dropout setting; and
    the grouped dK/dV at the GROUPED_HEAD_DIMS among head_dims."""
    out = []
    for arch in archs:
        for dtype in dtypes:
            for D in head_dims:
                pad = cfg.padded_head_dim(D)
                out.append(Job("bwd_preprocess", arch, dtype, D, False,
                               cfg.KernelConfig(cfg.PREPROCESS_BLOCK_M, 0, 4, 1)))
                for kernel in cfg.KERNELS:
                    for config in cfg.configs(kernel, (arch // 10, 0), pad, fp32=dtype == "fp32"):
                        out += [Job(kernel, arch, dtype, D, dropout, config) for dropout in (False, True)]
                if D in GROUPED_HEAD_DIMS:
                    for config in cfg.configs("bwd_dkdv", (arch // 10, 0), pad, dtype == "fp32", grouped=True):
                        out += [Job("bwd_dkdv", arch, dtype, D, dropout, config, grouped=True) for dropout in (False, True)]
                if D in OPTION_HEAD_DIMS and dtype in OPTION_DTYPES:
                    out += _option_jobs(arch, dtype, D)
                if D in OPTION_HEAD_DIMS:
                    out += _varlen_jobs(arch, dtype, D) + _paged_jobs(arch, dtype, D)
    return out


def _paged_jobs(arch: int, dtype: str, D: int) -> list[Job]:
    """Every shipped config of the forward kernels with a paged KV cache (PAGED_VARIANTS), no dropout."""
    out, fp32, pad = [], dtype == "fp32", cfg.padded_head_dim(D)
    for options in PAGED_VARIANTS.get(dtype, ()):
        banded = bool({"bidirectional", "window"} & set(options))
        for kernel in ("fwd", "fwd_decode"):
            out += [Job(kernel, arch, dtype, D, False, config, options=options)
                    for config in cfg.configs(kernel, (arch // 10, 0), pad, fp32, banded=banded)]
    return out


def _varlen_jobs(arch: int, dtype: str, D: int) -> list[Job]:
    """Every shipped config of each kernel with packed sequences (VARLEN_VARIANTS), with and without
    dropout; Δ's kernel; and the grouped dK/dV with them."""
    out, fp32, pad = [], dtype == "fp32", cfg.padded_head_dim(D)
    if VARLEN_VARIANTS.get(dtype):
        out.append(Job("bwd_preprocess", arch, dtype, D, False, cfg.KernelConfig(cfg.PREPROCESS_BLOCK_M, 0, 4, 1),
                       options=("varlen",)))
    for options in VARLEN_VARIANTS.get(dtype, ()):
        banded = bool({"bidirectional", "window"} & set(options))
        for kernel in cfg.KERNELS:
            for config in cfg.configs(kernel, (arch // 10, 0), pad, fp32, banded=banded):
                out += [Job(kernel, arch, dtype, D, dropout, config, options=options) for dropout in (False, True)]
        if options == ("varlen",) and not fp32:
            for config in cfg.configs("bwd_dkdv", (arch // 10, 0), pad, fp32, grouped=True):
                out += [Job("bwd_dkdv", arch, dtype, D, dropout, config, grouped=True, options=options)
                        for dropout in (False, True)]
    return out


def _option_jobs(arch: int, dtype: str, D: int) -> list[Job]:
    """Every shipped config of the kernels each option variant changes, with and without dropout."""
    out = []
    for options in OPTION_VARIANTS:
        kernels = ("fwd", "fwd_decode") if options == ("sinks",) else cfg.KERNELS
        banded = bool({"bidirectional", "window"} & set(options))
        for kernel in kernels:
            for config in cfg.configs(kernel, (arch // 10, 0), cfg.padded_head_dim(D), dtype == "fp32", banded=banded):
                out += [Job(kernel, arch, dtype, D, dropout, config, options=options) for dropout in (False, True)]
    return out


DROPPED = "DROPPED"  # a table status: one word, as every status is


def _call(job: Job) -> tuple:
    """What one autotuning chooses among: a kernel's configs for one arch, dtype, head dim and dropout."""
    return job.name, job.arch, job.dtype, job.head_dim, job.dropout


def _call_name(call: tuple) -> str:
    kernel, arch, dtype, head_dim, dropout = call
    return f"{kernel} sm_{arch} {dtype} D={head_dim} dropout={'on' if dropout else 'off'}"


def assess(results: list[Result]) -> tuple[list[Result], list[str]]:
    """(dropped, failures): the results that spill where their call has a spill-free config (the
    autotuner drops them at run time), and one line per failure: a config that overflows shared
    memory or does not compile, a call whose every config spills."""
    calls: dict[tuple, list[Result]] = {}
    for r in results:
        calls.setdefault(_call(r.job), []).append(r)
    dropped, failures = [], []
    for call, group in calls.items():
        for r in group:
            if r.verdict not in ("ok", "SPILL"):
                failures.append(f"{_call_name(call)} {r.job.config}: {r.verdict} (regs={r.registers} "
                                f"spill={r.spill_bytes} smem={r.shared_bytes})")
        spilling = [r for r in group if r.verdict == "SPILL"]
        if any(r.ok for r in group):
            dropped += spilling
        elif spilling:
            names = ", ".join(f"{r.job.config} {r.spill_bytes} B" for r in spilling)
            failures.append(f"{_call_name(call)}: every config spills ({names}); no spill-free config is left to run")
    return dropped, failures


def table(results: list[Result], full: bool) -> str:
    """One row per (kernel, arch, inputs, config): the worst registers, spill bytes and shared memory
    over its head dims, 16-bit dtypes and dropout on/off; every variant on its own row with --full.
    A spilling config's status is DROPPED (at run time) where its call has a spill-free config."""
    dropped = {id(r) for r in assess(results)[0]}
    rows: dict[tuple, list[Result]] = {}
    for r in results:
        j = r.job
        inputs = "fp32" if j.dtype == "fp32" else "16-bit"
        key = (j.name, f"sm_{j.arch}", inputs, str(j.config))
        if full:
            key += (j.dtype, str(j.head_dim), "on" if j.dropout else "off")
        rows.setdefault(key, []).append(r)
    head = ["kernel", "arch", "inputs", "config"] + (["dtype", "D", "dropout"] if full else ["head dims"])
    lines = [head + ["regs", "spill B", "smem KB", "philox/w", "status"]]
    for key, group in rows.items():
        failing = [r.verdict for r in group if not r.ok and id(r) not in dropped]
        status = failing[0] if failing else (DROPPED if any(id(r) in dropped for r in group) else "ok")
        dims = [] if full else [",".join(str(d) for d in sorted({r.job.head_dim for r in group}))]
        rounds = [r.philox_rounds_per_weight for r in group if r.philox_rounds_per_weight is not None]
        lines.append([*key, *dims, str(max(r.registers for r in group)), str(max(r.spill_bytes for r in group)),
                      f"{max(r.shared_bytes for r in group) / 1024:.0f}", f"{max(rounds):.2f}" if rounds else "-",
                      status])
    return compile_check.render_table(lines)


def _head_dim(text: str) -> int:
    """--head-dim's type: an int within the kernels' range, or an error that names the range."""
    D = int(text)
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise argparse.ArgumentTypeError(f"{D} is outside the Triton kernels' head dims, {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    return D


def _jobs(text: str) -> int:
    """--jobs's type: an integer >= 1, or an error that says so."""
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1; give the number of compiler processes "
                                         f"to run (this machine has {os.cpu_count() or 1} CPUs)")
    return jobs


def add_options(parser: argparse.ArgumentParser) -> None:
    """This check's own options (besides --arch, which both checks take)."""
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="input dtype (repeatable; default: all three)")
    parser.add_argument("--head-dim", type=_head_dim, action="append", metavar="D", help=f"{MIN_HEAD_DIM}..{MAX_HEAD_DIM} (repeatable; default: "
                                          f"{', '.join(map(str, CHECKED_HEAD_DIMS))})")
    parser.add_argument("--jobs", type=_jobs, default=os.cpu_count() or 1,
                        help="parallel compiler processes, >= 1 (default: one per CPU)")
    parser.add_argument("--full", action="store_true", help="one row per dtype and dropout setting too")
    parser.add_argument("--json", metavar="FILE", help="also write every compilation's result to FILE (JSON)")


def run(args: argparse.Namespace) -> int:
    """Compiles, prints the table and a summary; exit status 0, 1 (a failure) or 2 (no triton)."""
    if importlib.util.find_spec("triton") is None:
        print("Triton kernels: compile check impossible: triton is not installed (pip install triton; "
              "Linux x86-64 wheels)", file=sys.stderr)
        return 2
    from triton import knobs

    if knobs.runtime.interpret or _kernels_interpreted():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [sys.executable, "-m", "fastgpt.verify.triton_compile", f"--jobs={args.jobs}"]
        command += ["--full"] if args.full else []
        command += [f"--json={args.json}"] if getattr(args, "json", None) else []
        for flag, values in (("--arch", args.arch), ("--dtype", args.dtype), ("--head-dim", args.head_dim)):
            command += [f"{flag}={v}" for v in values or []]
        sys.stdout.flush()  # the child writes to the same file descriptor
        return subprocess.run(command, env=env).returncode

    asked = (args.arch or compile_check.ARCHS, args.dtype or list(DTYPES), args.head_dim or CHECKED_HEAD_DIMS)
    todo = jobs(*asked)
    start = time.perf_counter()
    if args.jobs > 1:
        import multiprocessing

        # spawn, not fork: the parent has torch's thread pools running
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(run_job, todo, chunksize=4))
    else:
        results = [run_job(j) for j in todo]
    seconds = time.perf_counter() - start
    text, status = report(results, args.full, seconds)
    print(text)
    if getattr(args, "json", None):
        dropped, failures = assess(results)
        write_json(args.json, results, dropped, failures, seconds, record_key(*asked))
    return status


def report(results: list[Result], full: bool, seconds: float) -> tuple[str, int]:
    """What a run prints (the table, a summary, the dropped configs and the failures) and its exit
    status: 1 if something failed, else 0."""
    dropped, failures = assess(results)
    ok = sum(r.ok for r in results)
    lines = [table(results, full),
             f"\n{len(results)} Triton compilations in {seconds:.0f} s: {ok} ok, {len(dropped)} spill (dropped at run "
             f"time: the autotuner drops a config that spills where it runs), {len(failures)} failed "
             f"({compile_check.limits_note()})"]
    lines += [f"DROPPED AT RUN TIME {_call_name(_call(r.job))} {r.job.config}: regs={r.registers} spill={r.spill_bytes}"
              for r in dropped]
    lines += [f"FAILED {failure}" for failure in failures]
    return "\n".join(lines), 1 if failures else 0


# The modules whose text decides what the check compiles and how it judges the result: the kernels,
# their configs, this check and the limits it shares with the CUDA check. A test holds every fastgpt
# module they import to this list, so a kernel split into a new module cannot escape the key.
KEYED_MODULES = ("fastgpt.kernels.flash_attention", "fastgpt.kernels.flash_attention_bwd",
                 "fastgpt.kernels.flash_attention_configs", "fastgpt.verify.triton_compile",
                 "fastgpt.verify.compile_check")
# Triton's compiler reads environment variables (another ptxas, its options, LLVM and MLIR switches):
# any that is set is part of the key, so a record made without it never stands for a run with it.
# These few only say where Triton keeps files or whether it interprets, which this check undoes.
_KEY_ENV_MARKERS = ("TRITON", "PTXAS", "LLVM", "MLIR")
_KEY_ENV_IGNORED = frozenset({"TRITON_INTERPRET", "TRITON_CACHE_DIR", "TRITON_HOME"})


def record_key(archs, dtypes, head_dims) -> dict:
    """What a check's results depend on, besides the ptxas bundled with triton: a hash of the
    KEYED_MODULES' text and of what was asked for, the triton version and the compiler's environment.
    Equal keys give equal results, so a result kept with its key can stand for compiling again."""
    digest = hashlib.sha256()
    for name in KEYED_MODULES:
        digest.update(name.encode() + b"\0" + Path(importlib.util.find_spec(name).origin).read_bytes() + b"\0")
    digest.update(json.dumps([list(archs), list(dtypes), list(head_dims)]).encode())
    env = {k: v for k, v in sorted(os.environ.items())
           if any(m in k.upper() for m in _KEY_ENV_MARKERS) and k.upper() not in _KEY_ENV_IGNORED}
    return {"sources": digest.hexdigest(), "triton": importlib.metadata.version("triton"), "compiler_env": env}


def write_json(path: str, results: list[Result], dropped: list[Result], failures: list[str], seconds: float,
               key: Optional[dict] = None) -> None:
    """Every compilation's numbers, the triton that made them and the key of what they depend on
    (record_key): for tests/triton_versions.py, and as the record the tests read (read_json)."""
    import triton

    dropped_ids = {id(r) for r in dropped}
    rows = [{"kernel": r.job.name, "arch": r.job.arch, "dtype": r.job.dtype,
             "head_dim": r.job.head_dim, "dropout": r.job.dropout, "config": str(r.job.config),
             "config_fields": [r.job.config.block_m, r.job.config.block_n, r.job.config.num_warps,
                               r.job.config.num_stages],
             "registers": r.registers, "spill_bytes": r.spill_bytes, "shared_bytes": r.shared_bytes,
             "error": r.error, "philox_rounds_per_weight": r.philox_rounds_per_weight,
             "status": DROPPED if id(r) in dropped_ids else r.verdict} for r in results]
    summary = {"triton": triton.__version__, "compilations": len(results), "ok": sum(r.ok for r in results),
               "dropped_at_run_time": len(dropped), "failures": failures, "seconds": round(seconds)}
    if key is not None:
        summary["key"] = key
    with open(path, "w", encoding="utf-8") as f:
        # one result a line: a refreshed record's diff shows which configs changed
        f.write('{"summary": ' + json.dumps(summary, indent=1) + ',\n "results": [\n')
        f.write(",\n".join("  " + json.dumps(row) for row in rows))
        f.write("\n ]}\n")


def read_json(path) -> tuple[dict, list[Result]]:
    """The summary and the results that write_json wrote: the verdicts are recomputed from the
    numbers, never read back."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    results = []
    for row in data["results"]:
        kernel, *options = row["kernel"].split("+")
        job = Job(kernel.removesuffix("/gqa"), row["arch"], row["dtype"], row["head_dim"], row["dropout"],
                  cfg.KernelConfig(*row["config_fields"]), grouped=kernel.endswith("/gqa"), options=tuple(options))
        results.append(Result(job, row["registers"], row["spill_bytes"], row["shared_bytes"], row["error"],
                              row["philox_rounds_per_weight"]))
    return data["summary"], results


def _kernels_interpreted() -> bool:
    # the jit decorator chose interpreter or compiler when the kernel module was imported
    module = sys.modules.get("fastgpt.kernels.flash_attention")
    return module is not None and type(module._attn_fwd).__name__ == "InterpretedFunction"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgpt.verify.triton_compile",
                                     description=__doc__.split("\n\n")[0])
    compile_check.add_arch_option(parser)
    add_options(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
