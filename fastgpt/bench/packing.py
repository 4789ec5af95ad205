"""Padded against packed training on documents of mixed lengths: real tokens per second.

    python -m fastgpt.bench.packing --out-dir bench_results          # tiny-shakespeare's speeches
    python -m fastgpt.bench.packing --write-speeches speeches.jsonl  # the corpus, for `fastgpt train --data`

One model trains in both modes, interleaved (padded, packed, padded, packed, ...), each timed call
`steps` optimisation steps (fastgpt/run/trainer.py's step(): forward, backward, AdamW), on the same
documents:
    padded   one document (or block_size piece of a long one) per row, right-padded
    packed   documents back to back filling every row, attention within each (one varlen call)
Both run batch_size × block_size positions a step; a real token is a position whose target trains
(not a pad). Real tokens per second, the median over the repetitions with p20/p80, is what a user
gets out of a step: the packed rows spend nothing on pads, so their lead is the padded rows' pad
fraction, less what the varlen call costs over the plain causal one.

The default corpus is the shipped tiny-shakespeare cut at its blank lines: its speeches, a
natural mix of one-line answers and long monologues.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from fastgpt.attention import kernels_ran
from fastgpt.bench.common import environment
from fastgpt.machine.timing import percentile, summarize, time_interleaved
from fastgpt.run.config import make_configs
from fastgpt.run.data import packaged_corpus, resolve_corpus_path
from fastgpt.run.documents import Document, DocumentDataset, is_document_source, load_documents
from fastgpt.run.trainer import Trainer

MODES = ("padded", "packed")
DEFAULTS = dict(preset="cpu", block_size=256, steps=3, reps=5, warmup=1)


def shakespeare_speeches(text: Optional[str] = None) -> list[str]:
    """tiny-shakespeare (the shipped copy unless `text`) cut at its blank lines: one speech per
    document, the speaker's name first, each ending in a newline."""
    text = packaged_corpus() if text is None else text
    return [block.strip("\n") + "\n" for block in re.split(r"\n[ \t]*\n", text) if block.strip()]


def write_documents(texts: list[str], path: str | Path) -> Path:
    """`texts` as a corpus of documents `fastgpt train --data` reads: a .jsonl file (one {"text": ...}
    per line) when `path` ends in .jsonl, else a new folder of one file per document (00000.txt, ...)."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        return path
    path.mkdir(parents=True, exist_ok=False)  # a folder that holds other files would add them as documents
    width = max(5, len(str(len(texts) - 1)))
    for i, text in enumerate(texts):
        (path / f"{i:0{width}d}.txt").write_text(text, encoding="utf-8")
    return path


def _documents(data: Optional[str]) -> tuple[list[Document], str]:
    if data is None:
        return [Document(str(i), t) for i, t in enumerate(shakespeare_speeches())], "tiny-shakespeare's speeches"
    path = resolve_corpus_path(data, folders=True)
    if not is_document_source(path):
        raise ValueError(f"--data {data}: this benchmark trains on documents; pass a folder of text files or a "
                         ".jsonl file (--write-speeches PATH writes tiny-shakespeare's speeches as either)")
    return load_documents(path), str(path)


def document_stats(dataset: DocumentDataset) -> dict[str, Any]:
    """How many documents and how long (characters): what decides the padded rows' waste."""
    lengths = torch.cat([dataset.train.lengths, dataset.val.lengths]).tolist()
    return {"train": dataset.train.documents, "val": dataset.val.documents, "skipped": dataset.skipped,
            "chars_median": statistics.median(lengths), "chars_p20": percentile(lengths, 20),
            "chars_p80": percentile(lengths, 80), "chars_max": max(lengths)}


def run_packing_benchmark(preset: str = DEFAULTS["preset"], device: str = "auto", steps: int = DEFAULTS["steps"],
                          reps: int = DEFAULTS["reps"], warmup: int = DEFAULTS["warmup"], backend: str = "auto",
                          data: Optional[str] = None, dtype: str = "fp32", overrides: Optional[dict[str, Any]] = None,
                          progress: bool = True) -> dict[str, Any]:
    """Trains `preset` (with `overrides` of its fields; block_size 256 unless given) for `steps`
    steps per call in each mode, interleaved, `reps` timed calls after `warmup`; the result's
    records hold each mode's real tokens per second (median, p20, p80) and the kernels it ran."""
    documents, source = _documents(data)
    dataset = DocumentDataset(documents, pack=True, source=source)
    values = {"block_size": DEFAULTS["block_size"], **(overrides or {}), "device": device, "progress": False,
              "dtype": dtype, "backend": backend, "pack": True, "sample_tokens": 0}
    trainer = Trainer(*make_configs(preset, values), dataset)
    kernel_paths = {}
    for mode in MODES:
        dataset.pack = mode == "packed"
        kernel_paths[mode] = trainer.attention_kernel()  # refused here, before any timing, if it cannot run
    real: dict[str, list[int]] = {mode: [] for mode in MODES}  # real tokens of each call, warm-up included
    ran: dict[str, dict[str, int]] = {mode: {} for mode in MODES}

    def calls(mode: str):
        def train_steps():
            dataset.pack = mode == "packed"
            before = trainer.real_tokens
            kernels_ran(reset=True)
            for _ in range(steps):
                trainer.step()
            real[mode].append(trainer.real_tokens - before)
            ran[mode] = kernels_ran(reset=True)
        return train_steps

    with tqdm(total=1, desc=f"packing ({preset})", disable=not progress) as bar:
        times = time_interleaved({mode: calls(mode) for mode in MODES}, trainer.device, reps, warmup)
        bar.update(1)
    positions = steps * trainer.tokens_per_step
    records = [_record(mode, times[mode], real[mode][-reps:], positions, kernel_paths[mode], ran[mode]) for mode in MODES]
    mc, tc = trainer.model_config, trainer.train_config
    return {"environment": environment(trainer.device), "preset": preset, "backend": backend, "dtype": dtype,
            "block_size": mc.block_size, "batch_size": tc.batch_size, "model": {"n_layer": mc.n_layer,
            "n_head": mc.n_head, "n_embd": mc.n_embd}, "steps_per_rep": steps, "reps": reps, "warmup": warmup,
            "documents": {"source": source, **document_stats(dataset)}, "records": records,
            "packed_over_padded": records[1]["real_tokens_per_s"] / records[0]["real_tokens_per_s"]}


def _record(mode: str, seconds: list[float], real_tokens: list[int], positions: int, kernel_path: str,
            kernels: dict[str, int]) -> dict[str, Any]:
    """One mode's row: seconds per step, real and all tokens per second (medians over the reps)."""
    rates = [n / s for n, s in zip(real_tokens, seconds)]
    steps_s = summarize(seconds)
    return {"mode": mode, "kernel_path": kernel_path, "kernels": kernels,
            "real_tokens_per_s": statistics.median(rates), "real_tokens_per_s_p20": percentile(rates, 20),
            "real_tokens_per_s_p80": percentile(rates, 80),
            "tokens_per_s": positions / steps_s["median_s"], "real_fraction": sum(real_tokens) / (positions * len(seconds)),
            **{f"call_{k}": v for k, v in steps_s.items()}}


def packing_markdown(result: dict[str, Any]) -> str:
    env, docs = result["environment"], result["documents"]
    lines = [f"{env['device']}, torch {env['torch']}, {env['cpu_threads']} threads; preset {result['preset']}, "
             f"block {result['block_size']}, batch {result['batch_size']}, {result['steps_per_rep']} steps × "
             f"{result['reps']} reps; {docs['train']:,} train documents from {docs['source']} (median "
             f"{docs['chars_median']:,.0f} characters, p80 {docs['chars_p80']:,.0f}, max {docs['chars_max']:,})",
             "", "| batches | kernel path | real tokens/s (p20–p80) | tokens/s | real fraction |", "|---|---|---|---|---|"]
    for r in result["records"]:
        lines.append(f"| {r['mode']} | {r['kernel_path']} | {r['real_tokens_per_s']:,.0f} "
                     f"({r['real_tokens_per_s_p20']:,.0f}–{r['real_tokens_per_s_p80']:,.0f}) | "
                     f"{r['tokens_per_s']:,.0f} | {r['real_fraction']:.1%} |")
    lines.append(f"\npacked / padded, real tokens/s: {result['packed_over_padded']:.2f}×")
    return "\n".join(lines)


def plot_packing(result: dict[str, Any], path: str | Path) -> Path:
    """A bar per mode: real tokens per second, the p20-p80 spread as its error bar."""
    from fastgpt.bench.plots import _saved, plt

    records = result["records"]
    medians = [r["real_tokens_per_s"] for r in records]
    spread = [[m - r["real_tokens_per_s_p20"] for m, r in zip(medians, records)],
              [r["real_tokens_per_s_p80"] - m for m, r in zip(medians, records)]]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    bars = ax.bar([f"{r['mode']}\n({r['kernel_path']})" for r in records], medians, yerr=spread, capsize=6,
                  color=["#999999", "#1f77b4"])
    for bar, r in zip(bars, records):
        ax.annotate(f"{r['real_fraction']:.0%} real", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    env = result["environment"]
    ax.set_title(f"training on documents: {result['packed_over_padded']:.2f}× real tokens/s packed\n"
                 f"{env['device']}, block {result['block_size']}, batch {result['batch_size']}", fontsize=9)
    ax.set_ylabel("real tokens per second (median, p20–p80)")
    ax.grid(alpha=0.3, axis="y")
    return _saved(fig, Path(path))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastgpt bench packing", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=DEFAULTS["preset"], help="the model and batch (default cpu)")
    parser.add_argument("--block-size", type=int, default=DEFAULTS["block_size"], help="row length T (default 256)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default: the preset's)")
    parser.add_argument("--backend", default="auto", help="attention backend, the same in both modes (default auto)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps per timed call")
    parser.add_argument("--reps", type=int, default=DEFAULTS["reps"], help="timed calls per mode, interleaved")
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    parser.add_argument("--data", default=None, help="a folder of text files or a .jsonl file (default: "
                                                     "tiny-shakespeare's speeches)")
    parser.add_argument("--out-dir", default="bench_results", help="where packing_<preset>.json/.csv/.png go")
    parser.add_argument("--write-speeches", metavar="PATH", default=None,
                        help="only write tiny-shakespeare's speeches to PATH (.jsonl, else a new folder) and exit")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.write_speeches:
        speeches = shakespeare_speeches()
        print(f"wrote {len(speeches):,} speeches to {write_documents(speeches, args.write_speeches)}")
        return 0
    from fastgpt.bench.report import prepare_out_dir, write_results

    out_dir = prepare_out_dir(args.out_dir)
    overrides = {"block_size": args.block_size, **({"batch_size": args.batch_size} if args.batch_size else {})}
    result = run_packing_benchmark(args.preset, args.device, args.steps, args.reps, args.warmup, args.backend,
                                   args.data, args.dtype, overrides, progress=not args.no_progress)
    print(packing_markdown(result))
    files = write_results(result, out_dir, f"packing_{args.preset}")
    png = plot_packing(result, out_dir / f"packing_{args.preset}.png")
    print(f"wrote {files['json']}, {files['csv']}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
