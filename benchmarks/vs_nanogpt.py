"""Benchmark (not a test): `fastgpt train --preset cpu` against nanoGPT's own train.py with the same
settings, whole processes (interpreter start, imports, training, evaluations, checkpoints and what
each does at the end), interleaved A B A B.

    python benchmarks/vs_nanogpt.py --nanogpt /tmp/nanogpt [--reps 2] [--threads 1] [--json out.json]

--nanogpt is a checkout of github.com/karpathy/nanoGPT (not part of this repository) whose
data/shakespeare_char/ holds train.bin, val.bin and meta.pkl (its prepare.py, run on the same
tiny-shakespeare that fastgpt ships). nanoGPT runs the command of its README's CPU section, its
hyperparameters taken from fastgpt's `cpu` preset (fastgpt/run/config.py, the one source of both):
device=cpu, compile=False, fp32. Each process gets its own temporary out_dir. The wall times'
medians give the ratio; the last "val loss" each run prints is its loss at max_iters.

--threads sets OMP_NUM_THREADS for both processes: on a machine shared with other work, 2 threads
on 2 cores stall whenever a neighbour holds a core (OpenMP's threads wait for each other), and one
thread each measures the programs rather than the neighbours.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from fastgpt.bench.common import load_average, print_cpu_environment
from fastgpt.run.config import PRESETS

PRESET = "cpu"
# the preset's fields that nanoGPT's train.py has (the rest: `model`, which it has not), most under the same name
SAME_NAMED_FIELDS = ("batch_size", "block_size", "n_embd", "n_head", "n_layer", "learning_rate", "decay_lr",
                     "warmup_iters", "lr_decay_iters", "min_lr", "max_iters", "beta2", "weight_decay", "grad_clip",
                     "eval_interval", "eval_iters")
NANOGPT_FIELDS = {"dropout": "dropout_p", **{name: name for name in SAME_NAMED_FIELDS}}  # nanoGPT's name -> fastgpt's
VAL_LOSS = re.compile(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)")


def nanogpt_command(checkout: Path, out_dir: str, max_iters: Optional[int]) -> list[str]:
    """nanoGPT's README CPU run, its values from fastgpt's preset."""
    preset = {**PRESETS[PRESET], **({"max_iters": max_iters} if max_iters else {})}
    flags = [f"--{theirs}={preset[ours]}" for theirs, ours in NANOGPT_FIELDS.items()]
    return [sys.executable, str(checkout / "train.py"), "config/train_shakespeare_char.py", "--device=cpu",
            "--compile=False", "--dtype=float32", "--log_interval=1", f"--out_dir={out_dir}", *flags]


def fastgpt_command(out_dir: str, max_iters: Optional[int], data: Optional[str]) -> list[str]:
    cmd = [sys.executable, "-m", "fastgpt", "train", "--preset", PRESET, "--device", "cpu", "--out-dir", out_dir]
    if max_iters:
        cmd += ["--max-iters", str(max_iters)]
    if data:
        cmd += ["--data", data]
    return cmd


def run_once(cmd: list[str], cwd: Optional[Path], env: dict[str, str]) -> dict:
    """The whole process's wall time and the last (step, val loss) it printed."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stderr[-2000:]}")
    found = VAL_LOSS.findall(done.stdout)
    if not found:
        raise RuntimeError(f"{' '.join(cmd)} printed no 'step N: ... val loss' line")
    step, val = found[-1]
    return {"seconds": seconds, "step": int(step), "val_loss": float(val)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", required=True, type=Path, help="a nanoGPT checkout with shakespeare_char prepared")
    parser.add_argument("--reps", type=int, default=2, help="runs of each program, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: torch's choice)")
    parser.add_argument("--max-iters", type=int, default=None, help="both programs (default: the preset's)")
    parser.add_argument("--data", default=None, help="fastgpt's corpus (default: the packaged tiny-shakespeare)")
    parser.add_argument("--json", help="write the environment, the commands and every run here")
    args = parser.parse_args(argv)
    data_dir = args.nanogpt / "data" / "shakespeare_char"
    missing = [name for name in ("train.py", "model.py") if not (args.nanogpt / name).is_file()]
    missing += [f"data/shakespeare_char/{n}" for n in ("train.bin", "val.bin", "meta.pkl") if not (data_dir / n).is_file()]
    if missing:
        raise SystemExit(f"--nanogpt {args.nanogpt}: missing {', '.join(missing)} (a nanoGPT checkout, with "
                         "data/shakespeare_char/prepare.py run)")
    if args.reps < 1:
        raise SystemExit(f"--reps must be >= 1; got {args.reps}")

    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    machine = print_cpu_environment()
    machine["omp_num_threads"] = env.get("OMP_NUM_THREADS", "unset")
    print(f"omp_num_threads: {machine['omp_num_threads']}")
    runs = {"fastgpt": [], "nanogpt": []}
    commands = {}
    for rep in range(args.reps):
        for name in ("fastgpt", "nanogpt"):
            with tempfile.TemporaryDirectory(prefix=f"vs-{name}-") as out_dir:
                if name == "fastgpt":
                    cmd, cwd = fastgpt_command(out_dir, args.max_iters, args.data), None
                else:
                    cmd, cwd = nanogpt_command(args.nanogpt, out_dir, args.max_iters), args.nanogpt
                commands[name] = " ".join(cmd)
                result = run_once(cmd, cwd, env)
            runs[name].append(result)
            print(f"  rep {rep + 1} {name}: {result['seconds']:.1f} s, val loss {result['val_loss']:.4f} "
                  f"at step {result['step']}", flush=True)
    machine["load_average_end"] = load_average()
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    print(f"load_average_end: {machine['load_average_end']}\n")
    print("| program | wall s, each run | median s | val loss, each run |")
    print("|---|---|---|---|")
    for name, rs in runs.items():
        seconds = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        losses = ", ".join(f"{r['val_loss']:.4f}" for r in rs)
        print(f"| {name} | {seconds} | {median[name]:.1f} | {losses} |")
    ratio = median["fastgpt"] / median["nanogpt"]
    print(f"\nfastgpt / nanoGPT wall time: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": machine, "commands": commands, "runs": runs,
                                               "median_s": median, "fastgpt_over_nanogpt": ratio}, indent=1))


if __name__ == "__main__":
    main()
