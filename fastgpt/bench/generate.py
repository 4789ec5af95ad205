"""Generation speed with and without the KV cache: `fastgpt bench generate`.

    fastgpt bench generate [--preset shakespeare-char] [--backends sdpa] [--linear torch skinny]
                           [--reps 3] [--out-dir DIR]
    python -m fastgpt.bench.generate ...     (the same)

The model is the preset's architecture (shakespeare-char: 6 layers, 384 wide, block 256, 10.8 M
parameters) with random weights: the cost of a step does not depend on what the weights learned,
only on the shapes, and sampling from a random model draws tokens all the same. Two cases, each
from a one-character prompt, batch 1, as `fastgpt sample` runs them:

    short  250 new tokens: the text stays within block_size. "no cache" re-runs the whole
           context per token (the lecture's generate); "cache" prefills once, then decodes.
    long   1000 new tokens: past block_size, "cache exact" re-prefills the cropped window every
           token (the same tokens as no cache, at about its cost) and "cache window" rebuilds from
           the last block_size // 2 tokens only when the cache is full (approximate; see
           fastgpt/model/kv_cache.py).

Each case runs once per attention backend and per kernel of the linear layers (fastgpt/model/linear.py):
"torch" is F.linear; "skinny" the ext kernel on inputs of few rows, i.e. every decode step and the
uncached steps of short contexts, F.linear on the rest. A case compares its variants under the
same kernels, so "× first variant" is the cache's own gain for that kernel.

Within a case the variants run interleaved (A B A B ...) after a warm-up of one short call each; a
figure is the median (p20-p80) over the repetitions of whole `generate` calls, prefill included;
tokens/s = new tokens / that median. The JSON keeps every repetition.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from fastgpt.attention import AttentionCall, get_backend, refusal
from fastgpt.attention.registry import choose
from fastgpt.bench.common import environment, load_average
from fastgpt.machine.timing import summarize, time_interleaved
from fastgpt.run.config import PRESETS
from fastgpt.model.linear import resolve_linear_kernel
from fastgpt.model.gpt import ModelConfig, build_model

# (case, new tokens, variants): a variant is (name, generate kwargs)
CASES = [
    ("short", 250, [("no cache", dict(kv_cache=False)), ("cache", dict(kv_cache=True, cache_policy="exact"))]),
    ("long", 1000, [("cache exact", dict(kv_cache=True, cache_policy="exact")),
                    ("cache window", dict(kv_cache=True, cache_policy="window"))]),
]
SMOKE = dict(block_size=16, n_layer=1, n_head=2, n_embd=32)  # a CI-sized model
SMOKE_TOKENS = {"short": 10, "long": 40}  # the long case still crosses block_size 16


def preset_model_config(preset: str) -> ModelConfig:
    """The model of `preset` (vocab 65: tiny-shakespeare's characters), in eval mode settings."""
    fields = {f: v for f, v in PRESETS[preset].items() if f in ModelConfig.__dataclass_fields__}
    return ModelConfig(**{**fields, "vocab_size": 65, "dropout_p": 0.0})


def run_generate_benchmark(preset: str = "shakespeare-char", backends: Optional[list[str]] = None, reps: int = 3,
                           device: str = "cpu", smoke: bool = False, cases: Optional[list[str]] = None,
                           progress: bool = True, linear: Optional[list[str]] = None) -> dict[str, Any]:
    dev = torch.device(device)
    load_before = load_average()
    config = preset_model_config(preset)
    if smoke:
        config = ModelConfig(**{**config.__dict__, **SMOKE})
    torch.manual_seed(0)
    model = build_model(config).to(dev).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=dev)  # one character
    records, kernels = [], {}  # kernels: label -> the kernel it runs
    for kernel in linear or ["torch", "skinny"]:
        try:
            resolved, how = resolve_linear_kernel(kernel, model)
        except (ValueError, RuntimeError) as e:  # skinny off CPU, or no C++ extension here
            records.append({"backend": "-", "linear": kernel, "status": str(e)})
            continue
        kernels[resolved if how is None else f"auto → {resolved}"] = resolved
    # What `fastgpt sample` runs by default here: the auto picks of the linear kernel and of the
    # attention backend per kind of call (no cache and prefill: T_q = T_k; decode: T_q < T_k).
    auto_kernel, auto_how = resolve_linear_kernel("auto", model)
    probe = torch.empty(1, config.n_head, 1, config.n_embd // config.n_head, device=dev)  # a decode step's q
    kv_heads = config.n_kv_head
    defaults = {"linear": auto_kernel, "linear_how": auto_how,
                "attention_plain": choose(AttentionCall.like(probe, kv_heads=kv_heads)).name,
                "attention_cached": choose(AttentionCall.like(probe, kv_heads=kv_heads, kv_len=2)).name}
    for name in backends or ["auto"]:
        model.set_backend(name)
        if name != "auto":
            reason = refusal(AttentionCall.like(probe, kv_heads=kv_heads), name) or (
                "emulated: its speed means nothing" if get_backend(name).emulated(dev) else None)
            if reason is not None:
                records.append({"backend": name, "linear": "-", "status": reason})
                continue
        if kernels:
            records += _time_cases(model, prompt, name, kernels, reps, dev, smoke, cases, progress)
    return {"environment": environment(dev), "preset": preset, "smoke": smoke, "reps": reps, "auto": defaults,
            "block_size": config.block_size, "load_average": {"before": load_before, "after": load_average()},
            "records": records}


def _time_cases(model, prompt, backend: str, kernels: dict[str, str], reps: int, dev: torch.device, smoke: bool,
                cases: Optional[list[str]], progress: bool) -> list[dict[str, Any]]:
    """Every (linear kernel, variant) of a case timed interleaved: the machine's drift over the
    minutes of a case hits them alike, so kernels compare as fairly as variants."""
    records = []
    for case, new_tokens, variants in CASES:
        if cases is not None and case not in cases:
            continue
        if smoke:
            new_tokens = SMOKE_TOKENS[case]
        def run(kernel: str, kwargs: dict, tokens: int):
            model.set_linear_kernel(kernel)
            g = torch.Generator(device=dev).manual_seed(0)
            return model.generate(prompt, tokens, generator=g, **kwargs)

        calls, runs = {}, {}
        for label, kernel in kernels.items():
            for variant, kwargs in variants:
                key = f"{variant}, linear {label}"
                calls[key] = functools.partial(run, kernel, kwargs, new_tokens)
                runs[key] = (label, variant)
                run(kernel, kwargs, 8)  # warm-up: a short call each (allocator, one-time setup)
        if progress:
            print(f"fastgpt bench generate: {backend}, {case} ({new_tokens} tokens): {'; '.join(calls)} x {reps}",
                  file=sys.stderr, flush=True)
        times = time_interleaved(calls, dev, reps, warmup=0)
        for key, seconds in times.items():
            label, variant = runs[key]
            stats = summarize(seconds)
            records.append({"backend": backend, "linear": label, "case": case, "variant": variant,
                            "new_tokens": new_tokens, "status": "ok", **stats,
                            "tokens_per_s": new_tokens / stats["median_s"], "seconds": seconds})
    return records


def generate_markdown(result: dict[str, Any]) -> str:
    """One row per (backend, linear kernel, case, variant): median s [p20-p80], tokens/s, × the first variant."""
    env, auto = result["environment"], result["auto"]
    lines = [f"Machine: {env['device']}, {env['cpu_threads']} threads, torch {env['torch']}, "
             f"python {env['python']}, commit {env['commit']}, {env['timestamp']}; load average "
             f"{result['load_average']['before']} before, {result['load_average']['after']} after", "",
             f"`fastgpt sample`'s defaults here: attention auto → {auto['attention_plain']} (no cache, prefill), "
             f"{auto['attention_cached']} (decode over the cache); linear auto → {auto['linear']} ({auto['linear_how']})",
             "",
             "| backend | linear | case | variant | new tokens | median s [p20–p80] | tokens/s | × first variant |",
             "|---|---|---|---|---|---|---|---|"]
    first: dict[tuple, float] = {}
    for r in result["records"]:
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r['linear']} | – | – | – | {r['status']} | – | – |")
            continue
        base = first.setdefault((r["backend"], r["linear"], r["case"]), r["median_s"])
        lines.append(f"| {r['backend']} | {r['linear']} | {r['case']} | {r['variant']} | {r['new_tokens']} | "
                     f"{r['median_s']:.2f} [{r['p20_s']:.2f}–{r['p80_s']:.2f}] | {r['tokens_per_s']:.1f} | "
                     f"{base / r['median_s']:.2f}× |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgpt.bench.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare-char", choices=sorted(PRESETS))
    parser.add_argument("--backends", nargs="+", default=None, help="attention backends (default: auto)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--linear", nargs="+", choices=["auto", "torch", "skinny"], default=None,
                        help="kernels of the linear layers to time (default: torch skinny)")
    parser.add_argument("--cases", nargs="+", choices=[c for c, _, _ in CASES], default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and few tokens, to check the harness")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    result = run_generate_benchmark(args.preset, args.backends, args.reps, args.device, args.smoke, args.cases,
                                    linear=args.linear)
    print(generate_markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
