"""Benchmark results to files and tables. The JSON is the single source: the CSV, the Markdown
tables and the plots are all derived from its records."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any

from fastgpt.bench.gemm_probe import probe_line


def prepare_out_dir(path, flag: str = "--out-dir") -> Path:
    """The folder results go to, created and proven writable before the work that fills it: a
    sweep of minutes is never run only to be lost to a folder that cannot take it."""
    text = str(path)
    if not text.strip():
        raise ValueError(f"{flag} is empty: name the folder the results go to (it is created if missing)")
    out_dir = Path(text)
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"{flag} {text}: a file is there, not a folder; name a folder (it is created if missing)")
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):  # a write, not a permission bit: root and read-only mounts too
            pass
    except OSError as e:
        raise ValueError(f"{flag} {text}: cannot create or write this folder ({e.strerror or e}); "
                         "choose a folder you can write") from None
    return out_dir


def write_results(result: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    """<name>.json (everything) and <name>.csv (one tidy row per record, environment repeated)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=1))
    return {"json": json_path, "csv": write_csv(result, out_dir / f"{name}.csv")}


def write_csv(result: dict[str, Any], path: Path) -> Path:
    """One tidy row per record of `result`, its environment repeated on every row."""
    rows = [{**record, **{f"env_{k}": v for k, v in result["environment"].items()}} for record in result["records"]]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _ms(seconds) -> str:
    return f"{seconds * 1e3:.2f}" if seconds is not None else "–"


def _mib(n) -> str:
    return f"{n / 2**20:.1f}" if n is not None else "–"


def environment_line(result: dict[str, Any]) -> str:
    env = result["environment"]
    kept = ", glibc malloc keeping freed memory (fastgpt/run/host_memory.py)" if env.get("keep_freed_memory") else ""
    return (f"{env['device']}, {env['cpu_threads']} threads, torch {env['torch']}, triton {env['triton']}, "
            f"python {env['python']}, commit {env['commit']}, {env['timestamp']}{kept}")


def kernel_path_notes(records: list[dict[str, Any]]) -> list[str]:
    """A note per (backend, dtype, kernel path) that ran, with the path's description."""
    from fastgpt.attention import get_path, kernel_path_names

    notes = []
    seen = dict.fromkeys((r["backend"], r["dtype"], r["kernel_path"], r.get("kernel_detail"))
                         for r in records if r.get("kernel_path"))
    for backend, dtype, path, detail in seen:
        described = get_path(path).description if path in kernel_path_names() else "not registered in this process"
        more = f"; {detail}" if detail else ""
        notes.append(f"- `{backend}` {dtype} ran kernel path `{path}`: {described}{more}")
    return notes


def attention_markdown(result: dict[str, Any]) -> str:
    """One table per (dtype, mode, dropout, variant): a row per T; per backend the median ms (p20-p80),
    the speed-up over naive (and over causal, for another variant), TFLOP/s, the fraction of the GEMM probe's rate (CPU) and peak memory."""
    records = result["records"]
    backends = list(dict.fromkeys(r["backend"] for r in records))
    # CPUs reach GFLOP/s, GPUs TFLOP/s: print the unit that gives readable numbers
    on_gpu = not result["environment"]["device"].startswith("CPU")
    unit, per_tflop = ("TFLOP/s", 1.0) if on_gpu else ("GFLOP/s", 1e3)
    lines = [f"Machine: {environment_line(result)}", ""]
    gemm = result.get("gemm_probe") or {}
    if gemm:
        lines += [probe_line(gemm), ""]
    notes = {}
    groups = list(dict.fromkeys((r["dtype"], r["mode"], r["dropout"], r.get("variant", "causal")) for r in records))
    for dtype, mode, dropout, variant in groups:
        of_gemm = " · % of GEMM" if dtype in gemm else ""
        vs_causal = " · × causal" if variant != "causal" else ""
        named = f", {variant}" if variant != "causal" else ""
        lines.append(f"**{mode}, dropout {dropout}, {dtype}{named}** (median ms [p20–p80] · × naive{vs_causal} · "
                     f"{unit}{of_gemm} · peak MiB)")
        lines.append("")
        lines.append("| T | B | " + " | ".join(backends) + " |")
        lines.append("|---|---|" + "---|" * len(backends))
        rows = [r for r in records if (r["dtype"], r["mode"], r["dropout"], r.get("variant", "causal")) ==
                (dtype, mode, dropout, variant)]
        for T in dict.fromkeys(r["T"] for r in rows):
            cells = []
            for name in backends:
                r = next((x for x in rows if x["T"] == T and x["backend"] == name), None)
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    notes.setdefault(name, r["status"])
                    cells.append("n/a")
                else:
                    speedup = f"{r['speedup_vs_naive']:.2f}×" if r.get("speedup_vs_naive") else "–"
                    if vs_causal:
                        speedup += f" · {r['vs_causal']:.2f}×" if r.get("vs_causal") else " · –"
                    fraction = f" · {100 * r['fraction_of_gemm']:.0f}%" if of_gemm else ""
                    cells.append(f"{_ms(r['median_s'])} [{_ms(r['p20_s'])}–{_ms(r['p80_s'])}] · {speedup} · "
                                 f"{r['tflops'] * per_tflop:.3g}{fraction} · {_mib(r.get('peak_memory_bytes'))}")
            B = next(r["B"] for r in rows if r["T"] == T)
            lines.append(f"| {T} | {B} | " + " | ".join(cells) + " |")
        lines.append("")
    for name, why in notes.items():
        lines.append(f"- `{name}` n/a: {why}")
    lines += kernel_path_notes(records)
    if records:
        lines.append(f"- memory: {records[0]['memory_method']}")
    return "\n".join(lines)


def train_markdown(result: dict[str, Any]) -> str:
    """A row per backend: s/step, tokens/s, the training FLOP rate (and its fraction of the GEMM
    probe's, on CPU), peak memory, MFU against a known peak."""
    gemm = result.get("gemm_probe") or {}
    lines = [f"Machine: {environment_line(result)}", ""]
    if gemm:
        lines += [probe_line(gemm), ""]
    lines += [f"**training step, preset `{result['preset']}`, dtype {result.get('dtype', 'fp32')}** "
              f"({result['reps']} interleaved reps of {result['steps_per_rep']} steps; median [p20–p80])", "",
              "| backend | s/step | tokens/s | GFLOP/s (% of GEMM) | peak MiB | MFU |", "|---|---|---|---|---|---|"]
    for r in result["records"]:
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | n/a: {r['status']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}% (estimate)" if r.get("mfu") is not None else "– (no known peak)"
        rate = f"{r['gflops']:.3g}" if r.get("gflops") is not None else "–"
        if r.get("fraction_of_gemm") is not None:
            rate += f" ({100 * r['fraction_of_gemm']:.0f}%)"
        lines.append(f"| {r['backend']} | {r['median_s']:.4f} [{r['p20_s']:.4f}–{r['p80_s']:.4f}] | "
                     f"{r['tokens_per_s']:,.0f} | {rate} | {_mib(r['peak_memory_bytes'])} | {mfu} |")
    return "\n".join(lines)
