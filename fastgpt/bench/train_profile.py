"""`fastgpt bench train --profile`: where the time of a whole training run goes, per phase.

The run is the real one (`Trainer.run`: steps, evaluations, checkpoints, the loss curve and the
sample at the end) with the trainer's phase timer on (fastgpt/run/phase_timer.py; the phases are
fastgpt/run/trainer.py's PHASES: data, forward, backward, optimizer, evaluate, checkpoint, finish). Each
row is one phase's wall time over the run; "rest of the loop" is the run's time outside every
phase: the loop itself, the progress display, the loss read-outs, the metrics log. The timer
costs two perf_counter reads per phase; on CUDA it syncs at each end, which the run would not.

Then, on the same model, PROFILED_STEPS more steps under torch.profiler give the ops that take
the most time of their own, and for the forward and the backward the share of their time inside
PyTorch ops (the rest is Python: module calls, the dispatcher, autograd's bookkeeping). The
profiler is kept to this short window: it adds microseconds per op, and reading back its events
takes longer than the steps.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any, Optional

from torch.profiler import ProfilerActivity, profile

from fastgpt.attention import get_backend
from fastgpt.bench.common import environment
from fastgpt.run.config import make_configs
from fastgpt.run.data import CharDataset
from fastgpt.run.phase_timer import PhaseTimer
from fastgpt.run.trainer import PHASES, Trainer

PROFILED_STEPS = 20
TOP_OPS = 12  # rows of the table of the ops that take the most time of their own


def _in_ops_share(events, label: str) -> Optional[float]:
    """Of the ranges named `label`, the fraction of their time inside their direct child ops."""
    wall = in_ops = 0.0
    for event in events:
        if event.name == label:
            wall += event.time_range.elapsed_us()
            in_ops += sum(child.time_range.elapsed_us() for child in event.cpu_children)
    return in_ops / wall if wall else None


def _profile_steps(trainer: Trainer, steps: int) -> dict[str, Any]:
    """`steps` training steps under torch.profiler: the top ops and the in-ops share per phase."""
    trainer.phases = PhaseTimer(trainer.device)  # off: the run's timer keeps the run's phases only
    trainer.step()  # a warm-up outside the window
    trainer.phases = PhaseTimer(trainer.device, enabled=True)  # its ranges mark the phases in the trace
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.step()
    events = prof.events()
    labels = {f"fastgpt.{name}" for name in PHASES}
    wall_us = sum(e.time_range.elapsed_us() for e in events if e.name in labels)
    ops = sorted((e for e in prof.key_averages() if e.key not in labels), key=lambda e: e.self_cpu_time_total,
                 reverse=True)[:TOP_OPS]
    return {
        "steps": steps,
        "in_ops_share": {name: _in_ops_share(events, f"fastgpt.{name}") for name in ("forward", "backward", "optimizer")},
        "top_ops": [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                     "share": e.self_cpu_time_total / wall_us} for e in ops],
    }


def run_train_profile(preset: str, device: str, max_iters: Optional[int] = None, data: Optional[str] = None,
                      dtype: str = "fp32", backend: Optional[str] = None,
                      overrides: Optional[dict[str, Any]] = None,
                      profiled_steps: int = PROFILED_STEPS) -> dict[str, Any]:
    """A whole run of `preset` (`max_iters` iterations, default the preset's; `backend` the
    attention, default the preset's "auto") in a temporary out_dir, timed per phase; then
    `profiled_steps` steps under torch.profiler. Returns {"environment", "preset", "dtype",
    "max_iters", "backend", "wall_s", "records" (a row per phase), "profiled_steps"}."""
    values = {**(overrides or {}), "device": device, "data": data, "progress": False, "dtype": dtype}
    if max_iters is not None:
        values["max_iters"] = max_iters
    if backend is not None:
        values["backend"] = backend
    with tempfile.TemporaryDirectory(prefix="fastgpt-profile-") as out_dir:
        model_config, train_config = make_configs(preset, {**values, "out_dir": out_dir})
        trainer = Trainer(model_config, train_config, CharDataset.load(data))
        # what the attention backend loads on first use (a library to build) loads here, not inside
        # the timed run's first evaluation
        get_backend(trainer.attention_backend()).prepare(trainer.device)
        trainer.phases.enabled = True
        start = time.perf_counter()
        trainer.run()
        wall_s = time.perf_counter() - start
        run_phases = trainer.phases
        profiled = _profile_steps(trainer, profiled_steps)
    iters = trainer.train_config.max_iters
    records = [{"phase": name, "calls": run_phases.calls[name], "wall_s": run_phases.seconds[name],
                "share": run_phases.seconds[name] / wall_s} for name in PHASES]
    rest = wall_s - sum(r["wall_s"] for r in records)
    records.append({"phase": "rest of the loop", "calls": None, "wall_s": rest, "share": rest / wall_s})
    for r in records:
        r["ms_per_iteration"] = 1e3 * r["wall_s"] / iters if iters else None
    return {"environment": environment(trainer.device), "preset": preset, "dtype": dtype, "max_iters": iters,
            "backend": trainer.attention_backend(), "kernel_path": trainer.attention_kernel(), "wall_s": wall_s, "records": records, "profiled_steps": profiled}


def profile_markdown(result: dict[str, Any]) -> str:
    """The per-phase table of the run, then the top ops of the profiled steps."""
    from fastgpt.bench.report import environment_line

    profiled = result["profiled_steps"]
    lines = [f"Machine: {environment_line(result)}", "",
             f"**a whole run of preset `{result['preset']}`: {result['max_iters']} iterations, dtype {result['dtype']}, "
             f"attention {result['backend']}, {result['wall_s']:.1f} s**", "",
             "| phase | calls | wall s | share | ms per iteration |", "|---|---|---|---|---|"]
    for r in result["records"]:
        per_iter = "–" if r["ms_per_iteration"] is None else f"{r['ms_per_iteration']:.2f}"
        lines.append(f"| {r['phase']} | {'' if r['calls'] is None else r['calls']} | {r['wall_s']:.2f} | "
                     f"{100 * r['share']:.1f}% | {per_iter} |")
    shares = ", ".join(f"{name} {100 * share:.0f}%" for name, share in profiled["in_ops_share"].items()
                       if share is not None)
    lines += ["", f"**{profiled['steps']} more steps under torch.profiler**: time inside PyTorch ops ({shares}; the "
              "rest is Python and dispatch). The ops with the most time of their own:", "",
              "| op | calls per step | ms per step | share of the steps |", "|---|---|---|---|"]
    for op in profiled["top_ops"]:
        lines.append(f"| `{op['op']}` | {op['calls_per_step']:.0f} | {op['self_ms_per_step']:.2f} | "
                     f"{100 * op['share']:.1f}% |")
    return "\n".join(lines)
