"""report.md and the plots of `fastgpt gpu-report`, drawn from report.json alone (gpu_report.py).

The tables are the benchmarks' own (report.py, generate.py) over the stages' records, so a figure
reads the same here as under `fastgpt bench`; the targets the GPU run is held to are checked here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from fastgpt.bench.generate import generate_markdown
from fastgpt.bench.report import attention_markdown, train_markdown, write_csv

# The targets of the first GPU run (benchmarks, not tests): what the report checks its figures against.
TARGETS = {
    "forward": "triton forward >= sdpa at T >= 4096, D 128, bf16, dropout 0",
    "forward+backward": "triton forward+backward >= 0.9x sdpa at T >= 4096, D 128, bf16, dropout 0",
    "dropout": "dropout 0.2 costs triton <= 15% of its throughput (forward+backward, D 128, T >= 4096)",
    "training": "the lecture's run to val <= 1.48 in under 60 s",
}


def render(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Writes report.md and the plots into out_dir; returns their paths."""
    stages = {s["name"]: s for s in report["stages"]}
    files = _files(stages, out_dir)
    lines = [f"# fastgpt gpu-report{' (dry run on CPU: stand-ins, not measurements)' if report['dry_run'] else ''}",
             "", f"`{report['command']}`", "",
             "| stage | status | seconds | budget |", "|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['budget_s']:.0f} |")
    for name, section in SECTIONS.items():
        if name in stages:
            lines += ["", f"## {name}", ""] + section(stages[name].get("result", {}))
            lines += _failure(stages[name])
    if not report["dry_run"]:
        lines += ["", "## targets", ""] + _targets(stages)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return [path, *files]


def _failure(stage: dict[str, Any]) -> list[str]:
    if stage["status"] == "ok":
        return []
    tail = stage.get("output_tail", "").rstrip()[-1500:]
    error = stage.get("result", {}).get("error")
    ended = f" at its {stage['budget_s']:g} s budget, ended by {stage['ended_by']}" if "ended_by" in stage else ""
    return ["", f"**{stage['status']}**{ended}" + (f": {error}" if error else ""), "", "```", tail, "```"]


def _environment(r: dict) -> list[str]:
    return [f"- {k}: {v}" for k, v in r.items()]


def _build(r: dict) -> list[str]:
    if "kind" not in r:
        return []
    lines = [f"- the ext extension: {r['kind']} build, {r['seconds']} s (CUDA kernels compiled: {r['builds_cuda']})"]
    if "ops_without_cuda_kernels" in r:
        missing = r["ops_without_cuda_kernels"]
        lines.append(f"- ops without a CUDA kernel: {', '.join(missing) if missing else 'none'}")
    return lines


def _parity(r: dict) -> list[str]:
    lines = ["| backend | dtype | shapes ok | not supported | failed | dropout checks ok |", "|---|---|---|---|---|---|"]
    merged: dict[tuple, dict] = {}  # a backend's tasks (Triton's: one per head dim) merged per dtype
    for t in r.get("tasks", []):
        m = merged.setdefault((t["backend"], t["dtype"]), {"shapes": [], "dropout": []})
        m["shapes"] += t["shapes"]
        m["dropout"] += t["dropout"]
        if "unavailable" in t:
            m["unavailable"] = t["unavailable"]
    for (backend, dtype), t in sorted(merged.items()):
        if "unavailable" in t:
            lines.append(f"| {backend} | {dtype} | unavailable: {t['unavailable']} | | | |")
            continue
        statuses = [s["status"] for s in t["shapes"]]
        ok = statuses.count("ok")
        unsupported = sum(s.startswith("not supported") for s in statuses)
        dropout_ok = sum(d["status"] == "ok" for d in t["dropout"])
        lines.append(f"| {backend} | {dtype} | {ok} | {unsupported} | {len(statuses) - ok - unsupported} | "
                     f"{dropout_ok} of {len(t['dropout'])} |")
    lines += [f"- FAILED {f}" for f in r.get("failures", [])]
    dropout = [d for t in r.get("tasks", []) for d in t["dropout"] if "kept_fraction" in d]
    if dropout:
        lines += ["", "dropout (p = 0.2): kept fraction, the backward against the reference built from the kernel's "
                      "own mask, the same seed twice, three backwards bit-equal", "",
                  "| backend | dtype | shape | kept | mask parity | same seed | backwards bit-equal |",
                  "|---|---|---|---|---|---|---|"]
        for d in dropout:
            lines.append(f"| {d['backend']} | {d['dtype']} | {d['shape']} | {d['kept_fraction']:.4f} | "
                         f"{d['mask_parity']} | {d['same_seed_same_result']} | {d['repeated_backward_bit_equal']} |")
    return lines


def _sanitizer(r: dict) -> list[str]:
    lines = [f"- {k}: {v}" for k, v in r.items() if k in ("status", "stand_in", "summary")]
    for run in r.get("runs", []):
        lines.append(f"- {run['tool']}: {run['status']}; {' / '.join(run.get('summary') or [])}")
    return lines


def _attention(r: dict) -> list[str]:
    lines = []
    for name, sweep in r.get("sweeps", {}).items():
        lines += [f"### {name}", "", attention_markdown(sweep), ""]
        kernels = sorted({(x["backend"], x["T"], x["dropout"], x["inner_kernel"]) for x in sweep["records"]
                          if "inner_kernel" in x})
        if kernels:
            lines.append("Inside the backends ran: " + "; ".join(f"{b} T {T} dropout {p}: {k}" for b, T, p, k in kernels))
        configs = sweep.get("triton_configs")
        if configs:
            lines.append("Triton autotune picked: " + "; ".join(f"{k}: {v}" for k, v in sorted(configs.items())))
        spills = sweep.get("triton_spills")
        if spills:
            lines.append("Triton configs that spilled here: " + "; ".join(
                f"{x['kernel']} {x['call']} {x['config']} ({x['local_bytes']} B, "
                f"{'dropped' if x['dropped'] else 'kept: every config spilled'})" for x in spills))
        lines.append("")
    if "cut_short" in r:
        lines.append(f"- cut short: {r['cut_short']}")
    return lines


def _training(r: dict) -> list[str]:
    lines = [train_markdown(r["throughput"])] if "throughput" in r else []
    run = r.get("full_run")
    if run and run["curve"]:
        last = run["curve"][-1]
        verdict = (f"reached val {last['val_loss']:.4f} <= {run['target_val_loss']} at iteration {last['iter']}"
                   if run["reached"] else f"stopped at iteration {last['iter']}, val {last['val_loss']}, "
                                           f"without reaching {run['target_val_loss']}")
        lines += ["", f"- the lecture's run ({run['preset']}, {run['dtype']}, backend {run['backend']}, val over "
                      f"{run['eval_iters']} batches every {run['eval_interval']} steps): {verdict}; "
                      f"{last['train_s']:.1f} s of training steps, {last['wall_s']:.1f} s with evaluations"]
    return lines


def _generation(r: dict) -> list[str]:
    return [generate_markdown(r)] if "records" in r else []


SECTIONS = {"environment": _environment, "build": _build, "parity": _parity, "sanitizer": _sanitizer,
            "attention": _attention, "training": _training, "generation": _generation}


def _median(records: list[dict], **match) -> Optional[float]:
    r = next((x for x in records if x["status"] == "ok" and all(x.get(k) == v for k, v in match.items())), None)
    return r["median_s"] if r else None


def _targets(stages: dict[str, dict]) -> list[str]:
    """Each target with the figures that meet or miss it."""
    records = stages.get("attention", {}).get("result", {}).get("sweeps", {}).get("d128", {}).get("records", [])
    lines = []
    for key, mode, ratio_needed in (("forward", "forward", 1.0), ("forward+backward", "forward+backward", 0.9)):
        cells = []
        for T in sorted({r["T"] for r in records if r["T"] >= 4096}):
            t, s = (_median(records, backend=b, T=T, mode=mode, dropout=0.0) for b in ("triton", "sdpa"))
            if t and s:
                cells.append(f"T {T}: {s / t:.2f}x sdpa {'(met)' if s / t >= ratio_needed else '(missed)'}")
        lines.append(f"- {TARGETS[key]}: {'; '.join(cells) or 'not measured'}")
    cells = []
    for T in sorted({r["T"] for r in records if r["T"] >= 4096}):
        plain, dropped = (_median(records, backend="triton", T=T, mode="forward+backward", dropout=p) for p in (0.0, 0.2))
        if plain and dropped:
            cost = 1 - plain / dropped
            cells.append(f"T {T}: {100 * cost:.0f}% {'(met)' if cost <= 0.15 else '(missed)'}")
    lines.append(f"- {TARGETS['dropout']}: {'; '.join(cells) or 'not measured'}")
    run = stages.get("training", {}).get("result", {}).get("full_run")
    if run and run["curve"]:
        last = run["curve"][-1]
        met = run["reached"] and last["wall_s"] < 60
        lines.append(f"- {TARGETS['training']}: {'reached' if run['reached'] else 'not reached'} in "
                     f"{last['wall_s']:.0f} s {'(met)' if met else '(missed)'}")
    else:
        lines.append(f"- {TARGETS['training']}: not measured")
    return lines


def _files(stages: dict[str, dict], out_dir: Path) -> list[Path]:
    """The attention plots and CSV per sweep, the training run's curve."""
    from fastgpt.bench.plots import plot_attention, plot_training_run

    paths = []
    sweeps = stages.get("attention", {}).get("result", {}).get("sweeps", {})
    for name, sweep in sweeps.items():
        paths += plot_attention(sweep, out_dir, name=f"attention_{name}")
    if sweeps:  # the tidy rows of every sweep, as `fastgpt bench` writes them, in one file
        first = next(iter(sweeps.values()))
        rows = [{"sweep": name, **r} for name, sweep in sweeps.items() for r in sweep["records"]]
        paths.append(write_csv({"environment": first["environment"], "records": rows}, out_dir / "attention.csv"))
    run = stages.get("training", {}).get("result", {}).get("full_run")
    if run and run["curve"]:
        paths.append(plot_training_run(run, out_dir / "training.png"))
    return paths
