"""The stages of `fastgpt gpu-report` (gpu_report.py runs each in a child process, under a budget).

Each stage is a function of a StageContext that saves its result as it goes (ctx.save), so a
stage cut off by its budget still reports what it finished. On a GPU it measures; in a dry run
(--dry-run, on CPU) it runs the same code paths on stand-ins, to prove the plumbing:

    stage        on the GPU                                        dry run (CPU)
    environment  GPU, SMs, memory, driver, versions, assumed peak  CPU, versions
    build        the ext CUDA extension built just in time         the CPU extension
    parity       every backend × fp16/bf16/fp32 × the parity        naive, sdpa, ext in fp32; triton
                 shapes, dropout checks, repeated backwards         interpreted on two small shapes
    sanitizer    compute-sanitizer memcheck + racecheck over        the CUDA kernels' SIMT emulation
                 small ext and Triton calls                        under ThreadSanitizer
    attention    bf16, D 128 and 64, T 512..16k, B·T = 16k; then    the smoke sweep, and grouped-query
                 grouped-query (16 heads over 4)
    training     shakespeare-char tokens/s and MFU per backend,     a few steps of a tiny model
                 then the lecture's run to val <= 1.48
    generation   tokens/s with and without the KV cache            the smoke model
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fastgpt.run.atomic_file import replace_atomically

TARGET_VAL_LOSS = 1.48  # the lecture's run ends near 1.48 (nanoGPT: 1.4697)


@dataclass
class StageContext:
    stage: str
    dry_run: bool
    budget_s: float
    work_dir: Path
    out_dir: Path
    result_path: Path
    earlier: list = field(default_factory=list)  # report entries of the stages before this one
    started: float = field(default_factory=time.perf_counter)
    result: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> "StageContext":
        raw = json.loads(Path(path).read_text())
        return cls(stage=raw["stage"], dry_run=raw["dry_run"], budget_s=raw["budget_s"], work_dir=Path(raw["work_dir"]),
                   out_dir=Path(raw["out_dir"]), result_path=Path(raw["result_path"]), earlier=raw["earlier"])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry_run else "cuda")

    def time_left(self) -> float:
        """Seconds of the budget not yet spent, less a margin for writing the result."""
        return self.budget_s - (time.perf_counter() - self.started) - 3.0

    def save(self, **fields: Any) -> None:
        """Adds fields to the stage's result and rewrites its file at once."""
        self.result.update(fields)
        data = json.dumps(self.result, indent=1, default=str, allow_nan=False).encode()
        replace_atomically(self.result_path, lambda f: f.write(data))

    def fail(self, message: str) -> None:
        """Records why the stage failed and ends the child with status 1."""
        self.save(error=message)
        print(f"stage {self.stage} failed: {message}", flush=True)
        raise SystemExit(1)


def _finite(x: Optional[float]) -> Optional[float]:
    """JSON has no NaN or infinity: a non-finite figure is recorded as null."""
    return x if x is None or (x == x and abs(x) != float("inf")) else None


# ---- environment ------------------------------------------------------------------------------------

def _command_output(argv: list[str]) -> Optional[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def find_cuda_tool(name: str) -> Optional[str]:
    """A CUDA toolkit program ($CUDA_HOME/bin, /usr/local/cuda/bin, PATH), or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / name).is_file():
            return str(Path(home) / "bin" / name)
    return shutil.which(name)


def stage_environment(ctx: StageContext) -> None:
    from fastgpt.bench.common import environment
    from fastgpt.run.flops import device_peak_flops

    info: dict[str, Any] = dict(environment(ctx.device))
    nvcc = find_cuda_tool("nvcc")
    version = _command_output([nvcc, "--version"]) if nvcc else None
    info["nvcc"] = version.splitlines()[-1] if version else "absent"
    info["compute_sanitizer"] = find_cuda_tool("compute-sanitizer") or "absent"
    info["cpu_cores"] = os.cpu_count()
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1),
                    driver=_command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                    peak_flops_assumed=device_peak_flops(ctx.device))
    else:
        info.update(cpu_capability=torch.backends.cpu.get_cpu_capability(), peak_flops_assumed=None)
    ctx.save(**info)


# ---- build ------------------------------------------------------------------------------------------

def stage_build(ctx: StageContext) -> None:
    """The ext extension built (or loaded) the way a first call does; the compiler's errors verbatim."""
    from fastgpt.ext import build

    ctx.save(builds_cuda=build.builds_cuda(), cache_root=str(build.cache_root()))
    start = time.perf_counter()
    try:
        import fastgpt.ext

        kind = fastgpt.ext.load()
    except Exception as e:  # one line; the compiler's whole output rides along as e.output
        ctx.save(build_output=getattr(e, "output", "")[-4000:])
        ctx.fail(f"{type(e).__name__}: {e}")
    ctx.save(kind=kind, seconds=round(time.perf_counter() - start, 1))
    if ctx.device.type == "cuda":
        missing = build.ops_without_cuda_kernels()
        ctx.save(ops_without_cuda_kernels=missing)
        if missing:
            ctx.fail(f"built, but these ops have no CUDA kernel: {', '.join(missing)}")


# ---- parity -----------------------------------------------------------------------------------------

# The layouts the parity stage checks besides (B, H, T, D) calls: packed sequences (varlen) and
# their keys in a paged KV cache of 16-position pages (forward only), on two shapes of head dim 64
# (one square, one of few queries over grouped heads), to stay within the stage's budget on a GPU.
LAYOUTS = ("varlen", "paged")
LAYOUT_SHAPES = [(2, 2, 100, 100, 64), (2, 8, 1, 13, 100, 64)]
PAGE_SIZE = 16


def _layout_refusal(backend: str, layout: str, shape, dtype, device) -> Optional[str]:
    """Why `backend` does not run the layout's call at `shape`, or None."""
    from fastgpt.attention import AttentionCall, refusal
    from fastgpt.attention.paged import paged_call, paged_layout
    from fastgpt.attention.varlen import varlen_call
    from fastgpt.verify import parity

    if layout is None:
        return refusal(AttentionCall.of(*parity.make_qkv(shape, dtype, device)), backend)
    if layout == "varlen":
        return refusal(varlen_call(*parity.make_packed(shape, dtype, device)), backend)
    q, k_pages, v_pages, table, seq_lens, cu_q = parity.make_paged(shape, dtype, device, PAGE_SIZE)
    layout_ = paged_layout(table, seq_lens, PAGE_SIZE, k_pages.shape[0], cu_q, device)
    return refusal(paged_call(q, k_pages, v_pages, layout_), backend)


def _shape_check(backend: str, entry, dtype, device) -> dict[str, Any]:
    """One parity check: `entry` a shape, or (layout, shape) for a LAYOUTS check."""
    from fastgpt.verify import parity

    layout, shape = entry if isinstance(entry[0], str) else (None, entry)
    label = list(shape) if layout is None else [layout, list(shape)]
    reason = _layout_refusal(backend, layout, shape, dtype, device)
    if reason is not None:
        return {"shape": label, "status": f"not supported: {reason}"}
    check = {None: parity.check_parity, "varlen": parity.check_varlen_parity,
             "paged": functools.partial(parity.check_paged_parity, page_size=PAGE_SIZE)}[layout]
    try:
        r = check(backend, shape, dtype, device)
        return {"shape": label, "status": "ok" if r.ok else f"FAIL ({r.worst})", "errors": r.errors,
                "limits": r.limits}
    except Exception as e:  # a kernel error is a failed check, not the end of the stage
        return {"shape": label, "status": f"error: {type(e).__name__}: {e}"[:500]}


def _parity_task(task: tuple[str, str, str, list, list]) -> dict[str, Any]:
    """A worker's job: one backend in one dtype on `device`, its parity shapes (each a shape or a
    (layout, shape)), then its dropout shapes."""
    from fastgpt.attention import get_backend
    from fastgpt.verify import parity

    backend, dtype_name, device_name, shapes, dropout_shapes = task
    device = torch.device(device_name)
    dtype = parity.DTYPE_NAMES[dtype_name]
    out: dict[str, Any] = {"backend": backend, "dtype": dtype_name, "shapes": [], "dropout": []}
    reason = get_backend(backend).unavailable_reason(device)
    if reason is not None:
        out["unavailable"] = reason
        return out
    for entry in shapes:
        out["shapes"].append(_shape_check(backend, entry, dtype, device))
    for shape in dropout_shapes:
        from fastgpt.verify.dropout_check import check_dropout

        try:
            out["dropout"].append(check_dropout(backend, shape, dtype, device).as_dict())
        except Exception as e:
            out["dropout"].append({"shape": list(shape), "status": f"error: {type(e).__name__}: {e}"[:500]})
    return out


def _parity_tasks(ctx: StageContext) -> list[tuple]:
    """(backend, dtype, device, parity shapes, dropout shapes) per task, the slowest first."""
    from fastgpt.attention import available_backends, get_backend
    from fastgpt.verify.dropout_check import DROPOUT_SHAPES, masked_backends
    from fastgpt.verify.parity import ALL_SHAPES, PARITY_SHAPES

    if ctx.dry_run:  # the CPU backends in fp32 on a few shapes (square, decode, a few queries); an
        # emulated backend (Triton's interpreter) is slow: its two smallest shapes, no dropout
        few = [s for s in PARITY_SHAPES if s[2] * s[3] <= 100 * 100][::3]
        small = [s for s in PARITY_SHAPES if s[2] * s[3] <= 17 * 17][:2]
        cpu = torch.device("cpu")
        layouts = [(layout, few[1]) for layout in LAYOUTS]  # one (B, H, T, D) shape per layout
        return [(b, "float32", "cpu", small, []) if get_backend(b).emulated(cpu) else
                (b, "float32", "cpu", few + layouts, DROPOUT_SHAPES[1:] if b in masked_backends() else [])
                for b in available_backends(cpu)]
    tasks = []
    for dtype in ("bfloat16", "float16", "float32"):
        for backend in available_backends("cuda"):
            # one task per head dim, so that the workers compile in parallel what a backend compiles
            # per head dim on the CPU (Triton's autotuned kernels)
            for D in sorted({s[-1] for s in ALL_SHAPES}):
                tasks.append((backend, dtype, "cuda", [s for s in ALL_SHAPES if s[-1] == D], []))
            if backend in masked_backends():
                tasks.append((backend, dtype, "cuda", [], DROPOUT_SHAPES))
            tasks.append((backend, dtype, "cuda", [(layout, s) for layout in LAYOUTS for s in LAYOUT_SHAPES], []))
    return sorted(tasks, key=lambda t: -len(t[3]) - len(t[4]))


def stage_parity(ctx: StageContext) -> None:
    """Every task in worker processes (on a GPU most of the time is Triton compiling its kernels,
    which runs on the CPU: the machine's cores compile in parallel), results saved as each finishes."""
    tasks = _parity_tasks(ctx)
    results: list[dict] = []
    workers = 1 if ctx.dry_run else max(1, min(len(tasks), (os.cpu_count() or 2) - 2))
    if workers == 1:
        for task in tasks:
            results.append(_parity_task(task))
            ctx.save(tasks=results)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_parity_task, task): task for task in tasks}
            for future in as_completed(futures):
                try:
                    results.append(future.result())
                except Exception as e:  # a worker that died (a CUDA fault) fails its task, not the stage
                    backend, dtype_name, _, shapes, dropout_shapes = futures[future]
                    status = f"error: the worker died: {type(e).__name__}: {e}"[:500]
                    results.append({"backend": backend, "dtype": dtype_name,
                                    "shapes": [{"shape": list(s), "status": status} for s in shapes],
                                    "dropout": [{"shape": list(s), "status": status} for s in dropout_shapes]})
                ctx.save(tasks=results)
    failures = [f"{t['backend']} {t['dtype']} {s['shape']}: {s['status']}" for t in results
                for s in t["shapes"] + t["dropout"] if s["status"] != "ok" and not s["status"].startswith("not supported")]
    checks = sum(1 for t in results for s in t["shapes"] + t["dropout"] if s["status"] == "ok")
    ctx.save(checks_passed=checks, failures=failures)
    if failures or checks == 0:
        ctx.fail(f"{len(failures)} parity failure(s) of {checks + len(failures)} checks")


# ---- sanitizer --------------------------------------------------------------------------------------

def sanitizer_probe() -> None:
    """Small calls of every ext CUDA kernel and every Triton kernel, forward and backward, with and
    without dropout and T_q < T_k: what compute-sanitizer watches."""
    from fastgpt.attention import available_backends, causal_attention
    from fastgpt.verify.parity import make_qkv

    device = torch.device("cuda")
    for backend in available_backends(device):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for shape in [(2, 3, 70, 70, 64), (2, 3, 5, 70, 64)]:
                for dropout_p in (0.0, 0.2):
                    q, k, v = (t.detach().requires_grad_(True) for t in make_qkv(shape, dtype, device))
                    out = causal_attention(q, k, v, dropout_p=dropout_p, backend=backend)
                    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    print("sanitizer probe: done")


def _run_sanitizer(tool: str, timeout: float) -> dict[str, Any]:
    command = [find_cuda_tool("compute-sanitizer"), "--tool", tool, "--error-exitcode", "3", "--print-limit", "20",
               sys.executable, "-c", "from fastgpt.bench.gpu_stages import sanitizer_probe; sanitizer_probe()"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "status": f"timeout after {timeout:.0f} s"}
    text = done.stdout + done.stderr
    summary = [line for line in text.splitlines() if "SUMMARY" in line]
    ok = done.returncode == 0 and "sanitizer probe: done" in text
    return {"tool": tool, "status": "ok" if ok else f"exit {done.returncode}", "summary": summary,
            "output_tail": None if ok else text[-3000:]}


def stage_sanitizer(ctx: StageContext) -> None:
    if ctx.dry_run:
        _emulation_under_tsan(ctx)
        return
    if find_cuda_tool("compute-sanitizer") is None:
        ctx.save(status="compute-sanitizer is not in this CUDA toolkit: nothing checked")
        return
    runs = []
    for i, tool in enumerate(("memcheck", "racecheck")):
        runs.append(_run_sanitizer(tool, max(10.0, ctx.time_left() / (2 - i))))
        ctx.save(runs=runs)
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        ctx.fail("; ".join(f"{r['tool']}: {r['status']}" for r in bad))


def _emulation_under_tsan(ctx: StageContext) -> None:
    """The stand-in: the CUDA softmax kernels' SIMT emulation (fastgpt.verify.cuda_emulation),
    warp-per-row cases, under ThreadSanitizer; the emulation tests run every case, and prove it
    sees a deleted barrier."""
    from fastgpt.verify.cuda_emulation import TSAN_FLAGS, TSAN_MAIN, NoCompiler, build

    ctx.save(stand_in="the CUDA softmax kernels' SIMT emulation under ThreadSanitizer (csrc/cuda/emulation/tsan_main.cpp, "
                      "warp-per-row cases)")
    try:
        exe = build("tsan-main", [TSAN_MAIN], TSAN_FLAGS)
    except NoCompiler as e:
        ctx.save(status=f"skipped: {e}")
        return
    env = {"TSAN_OPTIONS": "halt_on_error=0 exitcode=66", "FASTGPT_EMU_WATCHDOG_S": "60"}
    try:
        done = subprocess.run([str(exe), "warp"], capture_output=True, text=True, env=env,
                              timeout=max(10.0, ctx.time_left()))
    except subprocess.TimeoutExpired:
        ctx.fail("the ThreadSanitizer run of the emulation did not finish in the budget")
    races = done.stderr.count("WARNING: ThreadSanitizer")
    ctx.save(summary=(done.stdout.strip().splitlines() or ["(no output)"])[-1], thread_sanitizer_reports=races)
    if races or done.returncode != 0:
        ctx.fail(f"the emulation under ThreadSanitizer: exit {done.returncode}, {races} report(s)\n{done.stderr[-2000:]}")


# ---- attention speed --------------------------------------------------------------------------------

def stage_attention(ctx: StageContext) -> None:
    from fastgpt.attention import backend_names
    from fastgpt.bench.attention import AttentionSweep, run_attention_benchmark

    if ctx.dry_run:
        sweeps = [("smoke", AttentionSweep.smoke("cpu")),
                  ("smoke_gqa", AttentionSweep(**{**AttentionSweep.smoke("cpu").__dict__, "kv_heads": 1})),
                  ("smoke_variants", AttentionSweep(**{**AttentionSweep.smoke("cpu").__dict__, "dropouts": [0.0],
                                                       "variants": ["causal", "window:8", "softcap"]}))]
    else:
        # FlashAttention's convention: 16k tokens (B·T), hidden 2048 = H × D; then grouped-query as
        # Llama-family models run it (4 query heads per key/value head) at a few lengths
        seq_lens = [512, 1024, 2048, 4096, 8192, 16384]
        common = dict(modes=["forward", "forward+backward"], dropouts=[0.0, 0.2],
                      backends=backend_names(), reps=5, warmup=1, validate_max_T=2048)
        sweeps = [(f"d{D}", AttentionSweep("cuda", seq_lens, 16384, 2048 // D, D, ["bfloat16"], **common))
                  for D in (128, 64)]
        sweeps.append(("d128_gqa4", AttentionSweep("cuda", [2048, 8192], 16384, 16, 128, ["bfloat16"], kv_heads=4,
                                                   **common)))
        # the options, as `fastgpt bench attention --variants` times them on CPU: a window's time
        # should fall towards 2W/T of causal's; soft-capping and sinks cost against plain causal
        sweeps.append(("d128_variants", AttentionSweep(
            "cuda", [4096, 16384], 16384, 16, 128, ["bfloat16"], **{**common, "dropouts": [0.0]},
            variants=["causal", "window:256", "window:1024", "softcap", "sinks", "bidirectional"])))
    results = {}
    for name, sweep in sweeps:
        for T in sweep.seq_lens:  # one length at a time, saved as it finishes
            if ctx.time_left() < 5:
                ctx.save(cut_short=f"the budget ran out before {name} T={T}")
                return
            part = run_attention_benchmark(AttentionSweep(**{**sweep.__dict__, "seq_lens": [T]}), progress=False)
            if name not in results:
                results[name] = {**part, "records": []}
            results[name]["records"] += part["records"]
            if not ctx.dry_run:
                results[name]["triton_configs"] = _triton_configs()
                results[name]["triton_spills"] = _triton_spills()
            ctx.save(sweeps=results)


def _triton_configs() -> dict[str, str]:
    """The config the autotuner picked per (kernel, head dim, sequence-length bucket)."""
    from fastgpt.kernels import flash_attention_ops

    return flash_attention_ops.tuned_configs()


def _triton_spills() -> list[dict]:
    """The configs whose compiled kernel spilled on this GPU, which the autotuner dropped before timing."""
    from fastgpt.kernels import flash_attention_ops

    return flash_attention_ops.spilling_configs()


# ---- training -----------------------------------------------------------------------------------------

def stage_training(ctx: StageContext) -> None:
    """tokens/s and MFU per backend over a fixed number of steps; then, with the fastest, the
    lecture's run until val <= TARGET_VAL_LOSS or the budget ends."""
    from fastgpt.bench.train import run_train_benchmark

    preset = "cpu" if ctx.dry_run else "shakespeare-char"
    dtype = "fp32" if ctx.dry_run else "bf16"
    if ctx.dry_run:
        steps, reps, overrides = 2, 2, dict(n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=4)
    else:
        steps, reps, overrides = 10, 3, {}
    bench = run_train_benchmark(preset, str(ctx.device), steps=steps, reps=reps, warmup=1, dtype=dtype,
                                overrides=overrides, progress=False)
    ctx.save(throughput=bench)
    timed = [r for r in bench["records"] if r["status"] == "ok"]
    if not timed:
        ctx.fail("no backend could run a training step")
    fastest = min(timed, key=lambda r: r["median_s"])["backend"]
    ctx.save(fastest=fastest)
    _train_to_target(ctx, preset, dtype, fastest, overrides)


def _train_to_target(ctx: StageContext, preset: str, dtype: str, backend: str, overrides: dict) -> None:
    from fastgpt.run.config import make_configs
    from fastgpt.run.trainer import Trainer

    eval_interval, eval_iters = (5, 2) if ctx.dry_run else (250, 50)
    max_iters = 10 if ctx.dry_run else 5000
    model_config, train_config = make_configs(preset, {
        **overrides, "device": str(ctx.device), "dtype": dtype, "backend": backend, "progress": False,
        "eval_iters": eval_iters, "max_iters": max_iters, "out_dir": str(ctx.work_dir / "train")})
    trainer = Trainer(model_config, train_config)
    curve, train_s, start = [], 0.0, time.perf_counter()
    run = {"backend": backend, "dtype": dtype, "preset": preset, "eval_interval": eval_interval,
           "eval_iters": eval_iters, "target_val_loss": TARGET_VAL_LOSS, "curve": curve}
    while trainer.iter < max_iters:
        t0 = time.perf_counter()
        for _ in range(eval_interval):
            trainer.step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        train_s += time.perf_counter() - t0
        losses = trainer.evaluate()
        curve.append({"iter": trainer.iter, "val_loss": _finite(losses["val"]), "train_loss": _finite(losses["train"]),
                      "train_s": round(train_s, 2), "wall_s": round(time.perf_counter() - start, 2)})
        reached = losses["val"] <= TARGET_VAL_LOSS
        ctx.save(full_run={**run, "reached": reached})
        if reached or ctx.time_left() < 2 * (time.perf_counter() - t0):
            break


# ---- generation -------------------------------------------------------------------------------------

def stage_generation(ctx: StageContext) -> None:
    from fastgpt.bench.generate import run_generate_benchmark

    result = run_generate_benchmark("shakespeare-char", ["auto"], reps=2, device=str(ctx.device), smoke=ctx.dry_run,
                                    cases=["short"], progress=False, linear=["torch"])
    ctx.save(**result)


STAGE_FUNCTIONS: dict[str, Callable[[StageContext], None]] = {
    "environment": stage_environment,
    "build": stage_build,
    "parity": stage_parity,
    "sanitizer": stage_sanitizer,
    "attention": stage_attention,
    "training": stage_training,
    "generation": stage_generation,
}
