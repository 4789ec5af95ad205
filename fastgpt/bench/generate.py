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

Batched generation (`--batched`, run_batched_benchmark): N prompts (default 16) of different lengths,
each continued by the same number of new tokens, two ways:

    batched     one generate_batched call (fastgpt/model/batched.py): every prompt at once over the
                paged KV cache, one forward per step for the whole batch
    sequential  N LanguageModel.generate calls, one prompt each over its contiguous KV cache: what N
                `fastgpt sample` runs do, less the start of N processes

First both run once and their tokens are compared prompt by prompt (prompt i samples with a
generator seeded i either way, so they agree unless rounding flips a draw: the count is recorded),
then they are timed interleaved; tokens/s = N · new tokens / the median. Peak memory is measured
once per variant after the timing (fastgpt/bench/common.py: on CUDA the allocator's peak above what
was allocated before, on CPU the process's resident high-water mark above its resident set).
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
from fastgpt.bench.common import environment, load_average, memory_method, peak_memory_bytes
from fastgpt.machine.timing import summarize, time_interleaved
from fastgpt.run.config import PRESETS
from fastgpt.model.linear import resolve_linear_kernel
from fastgpt.model.batched import generate_all, page_pool_for
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


def _random_model(preset: str, smoke: bool, device: torch.device):
    """The preset's model (the smoke run's tiny one) with seed-0 random weights, in evaluation."""
    config = preset_model_config(preset)
    if smoke:
        config = ModelConfig(**{**config.__dict__, **SMOKE})
    torch.manual_seed(0)
    return build_model(config).to(device).eval()


def run_generate_benchmark(preset: str = "shakespeare-char", backends: Optional[list[str]] = None, reps: int = 3,
                           device: str = "cpu", smoke: bool = False, cases: Optional[list[str]] = None,
                           progress: bool = True, linear: Optional[list[str]] = None) -> dict[str, Any]:
    dev = torch.device(device)
    load_before = load_average()
    model = _random_model(preset, smoke, dev)
    config = model.config
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


BATCHED_PROMPTS = 16
BATCHED_NEW_TOKENS = 100  # with prompts of up to BATCHED_PROMPT_LENGTHS' end, within shakespeare-char's block
BATCHED_PROMPT_LENGTHS = (4, 48)
SMOKE_BATCHED = {"new_tokens": 6, "prompt_lengths": (2, 8)}


def batched_prompts(n: int, vocab_size: int, lengths: tuple[int, int]) -> list[list[int]]:
    """n prompts of random tokens, of lengths spread over [lengths[0], lengths[1]], the same every run."""
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=g).tolist()
    return [torch.randint(vocab_size, (size,), generator=g).tolist() for size in sizes]


def run_batched_benchmark(preset: str = "shakespeare-char", backends: Optional[list[str]] = None, reps: int = 3,
                          device: str = "cpu", smoke: bool = False, n_prompts: int = BATCHED_PROMPTS,
                          page_size: int = 16, linear: Optional[list[str]] = None,
                          progress: bool = True) -> dict[str, Any]:
    """Batched against sequential generation of n_prompts prompts (module docstring)."""
    dev = torch.device(device)
    load_before = load_average()
    model = _random_model(preset, smoke, dev)
    config = model.config
    new_tokens = SMOKE_BATCHED["new_tokens"] if smoke else BATCHED_NEW_TOKENS
    lengths = SMOKE_BATCHED["prompt_lengths"] if smoke else BATCHED_PROMPT_LENGTHS
    if lengths[1] + new_tokens > config.block_size:
        raise ValueError(f"prompts of up to {lengths[1]} tokens and {new_tokens} new ones exceed the {preset} model's "
                         f"block_size {config.block_size}")
    prompts = batched_prompts(n_prompts, config.vocab_size, lengths)
    records = []
    for name in backends or ["auto"]:
        model.set_backend(name)
        for kernel in linear or ["torch"]:
            try:
                model.set_linear_kernel(resolve_linear_kernel(kernel, model)[0])
            except (ValueError, RuntimeError) as e:  # skinny off CPU, or no C++ extension here
                records.append({"backend": name, "linear": kernel, "status": str(e)})
                continue
            records += _time_batched(model, prompts, new_tokens, name, kernel, reps, dev, page_size, progress)
    return {"environment": environment(dev), "preset": preset, "smoke": smoke, "reps": reps, "n_prompts": n_prompts,
            "new_tokens": new_tokens, "prompt_lengths": [len(p) for p in prompts], "page_size": page_size,
            "block_size": config.block_size, "memory_method": memory_method(dev),
            "load_average": {"before": load_before, "after": load_average()}, "records": records}


def _time_batched(model, prompts, new_tokens: int, backend: str, kernel: str, reps: int, dev: torch.device,
                  page_size: int, progress: bool) -> list[dict[str, Any]]:
    """The two variants validated against each other, timed interleaved, their peak memory measured."""
    def batched():
        return generate_all(model, prompts, new_tokens, seed=0, batch_size=len(prompts), page_size=page_size)

    def sequential():
        return [model.generate(torch.tensor([p], device=dev), new_tokens,
                               generator=torch.Generator(device=dev).manual_seed(i))[0, len(p):].tolist()
                for i, p in enumerate(prompts)]

    try:
        tokens_batched = batched()  # also the warm-up
    except ValueError as e:  # a backend or kernel path that refuses packed sequences
        return [{"backend": backend, "linear": kernel, "status": str(e)}]
    same = sum(a == b for a, b in zip(tokens_batched, sequential()))
    calls = {"batched": batched, "sequential": sequential}
    if progress:
        print(f"fastgpt bench generate --batched: {backend}, linear {kernel}: {len(prompts)} prompts × {new_tokens} "
              f"new tokens, batched and sequential x {reps}", file=sys.stderr, flush=True)
    times = time_interleaved(calls, dev, reps, warmup=0)
    pool = page_pool_for(model, prompts, new_tokens, len(prompts), page_size)
    records = []
    for variant, seconds in times.items():
        stats = summarize(seconds)
        records.append({"backend": backend, "linear": kernel, "variant": variant, "status": "ok",
                        "prompts": len(prompts), "new_tokens": new_tokens, **stats,
                        "tokens_per_s": len(prompts) * new_tokens / stats["median_s"],
                        "peak_memory_bytes": peak_memory_bytes(calls[variant], dev),
                        "same_tokens_as_sequential": same,
                        "page_pool_bytes": pool.bytes if variant == "batched" else None,
                        "seconds": seconds})
    return records


def _machine_line(result: dict[str, Any]) -> str:
    """The run's machine, versions, commit, time and load average, as the tables' first line."""
    env, load = result["environment"], result["load_average"]
    return (f"Machine: {env['device']}, {env['cpu_threads']} threads, torch {env['torch']}, python {env['python']}, "
            f"commit {env['commit']}, {env['timestamp']}; load average {load['before']} before, {load['after']} after")


def batched_markdown(result: dict[str, Any]) -> str:
    """One row per (backend, linear kernel, variant): median s [p20-p80], tokens/s, × sequential, peak MiB."""
    lengths = result["prompt_lengths"]
    lines = [_machine_line(result) + f"; memory: {result['memory_method']}", "",
             f"{result['n_prompts']} prompts of {min(lengths)}-{max(lengths)} tokens, "
             f"{result['new_tokens']} new tokens each, {result['preset']} model (random weights), page size "
             f"{result['page_size']}", "",
             "| backend | linear | variant | median s [p20–p80] | tokens/s | × sequential | peak MiB | same tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r['linear']} | – | {r['status']} | – | – | – | – |")
            continue
        base = next(x["median_s"] for x in result["records"] if x["status"] == "ok" and x["variant"] == "sequential"
                    and (x["backend"], x["linear"]) == (r["backend"], r["linear"]))
        peak = "–" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['backend']} | {r['linear']} | {r['variant']} | {r['median_s']:.2f} [{r['p20_s']:.2f}–"
                     f"{r['p80_s']:.2f}] | {r['tokens_per_s']:.1f} | {base / r['median_s']:.2f}× | {peak} | "
                     f"{r['same_tokens_as_sequential']}/{r['prompts']} |")
    return "\n".join(lines)


def plot_batched(result: dict[str, Any], out_dir: Path, name: str = "generate_batched") -> list[Path]:
    """Tokens/s (p20-p80 spread) and peak memory of batched against sequential, a bar pair per
    (backend, linear kernel)."""
    from fastgpt.bench.plots import _saved, plt

    records = [r for r in result["records"] if r["status"] == "ok"]
    if not records:
        return []
    groups = list(dict.fromkeys((r["backend"], r["linear"]) for r in records))
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for v, variant in enumerate(("sequential", "batched")):
        for g, group in enumerate(groups):
            r = next((x for x in records if (x["backend"], x["linear"], x["variant"]) == (*group, variant)), None)
            if r is None:
                continue
            x, work = g + (v - 0.5) * 0.4, r["prompts"] * r["new_tokens"]
            tps = work / r["median_s"]
            speed.bar(x, tps, 0.4, yerr=[[tps - work / r["p80_s"]], [work / r["p20_s"] - tps]], capsize=3,
                      color=f"C{v}", label=variant if g == 0 else None)
            if r["peak_memory_bytes"] is not None:
                memory.bar(x, r["peak_memory_bytes"] / 2**20, 0.4, color=f"C{v}", label=variant if g == 0 else None)
    for ax, ylabel in ((speed, "new tokens per second (all prompts)"), (memory, "peak memory (MiB)")):
        ax.set_xticks(range(len(groups)), [f"{b}\nlinear: {k}" for b, k in groups], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    env = result["environment"]
    fig.suptitle(f"{result['n_prompts']} prompts × {result['new_tokens']} new tokens, {result['preset']} model: "
                 f"{env['device']}, {env['cpu_threads']} threads, torch {env['torch']}", fontsize=10)
    return [_saved(fig, out_dir / f"{name}.png")]


def generate_markdown(result: dict[str, Any]) -> str:
    """One row per (backend, linear kernel, case, variant): median s [p20-p80], tokens/s, × the first variant."""
    auto = result["auto"]
    lines = [_machine_line(result), "",
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
    parser.add_argument("--batched", action="store_true", help="batched against sequential generation of N prompts")
    parser.add_argument("--num-prompts", type=int, default=BATCHED_PROMPTS, help="--batched: N (default 16)")
    parser.add_argument("--page-size", type=int, default=16, help="--batched: the paged KV cache's page size")
    args = parser.parse_args(argv)
    if args.batched:
        result = run_batched_benchmark(args.preset, args.backends, args.reps, args.device, args.smoke,
                                       args.num_prompts, args.page_size, args.linear)
        print(batched_markdown(result))
    else:
        result = run_generate_benchmark(args.preset, args.backends, args.reps, args.device, args.smoke, args.cases,
                                        linear=args.linear)
        print(generate_markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
