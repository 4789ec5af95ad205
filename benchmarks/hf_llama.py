"""Benchmark (not a test): a training step of a small grouped-query Llama through Hugging Face
transformers on CPU, its attention run by each fastgpt backend against transformers' own `eager`
and `sdpa`.

    python benchmarks/hf_llama.py [--reps 5] [--json out.json]       (or python -m fastgpt.benchmarks.hf_llama)

A step is transformers' LlamaForCausalLM forward with labels (the LM loss), backward and AdamW, in
fp32, random weights from a config (nothing downloaded), one fixed batch of random tokens. Each
provider gets its own model and optimizer from the same seed, so all start from the same weights;
before any timing every provider's first loss and gradients are checked against `eager`'s. The
providers then run interleaved (fastgpt.machine.timing.time_interleaved: A B C A B C ...), medians with the
p20-p80 spread; the peak memory of one more step is fastgpt.bench.common.peak_memory_bytes
(the process's resident high-water mark on CPU). A fastgpt backend that refuses the call (one
without grouped-query support, one emulated here) is listed with its reason and not timed.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from fastgpt.attention import AttentionCall, available_backends, get_backend, refusal
from fastgpt.attention.registry import choose
from fastgpt.bench.attention import NOT_TIMED
from fastgpt.bench.common import load_average, memory_method, peak_memory_bytes, print_cpu_environment
from fastgpt.machine.timing import summarize, time_interleaved

TRANSFORMERS_IMPLEMENTATIONS = ["eager", "sdpa"]
# the step's loss and gradients against eager's, before timing: fp32 through different kernels
LOSS_TOLERANCE = 1e-4
GRAD_TOLERANCE = 1e-3  # max |g - g_eager| / max |g_eager|, over all parameters


@dataclass
class HFLlamaBench:
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 688  # Llama's ~8/3 · hidden
    vocab: int = 512
    seq: int = 256
    batch: int = 4
    dropout: float = 0.0  # the config's attention_dropout
    reps: int = 5
    warmup: int = 1
    backends: list[str] = field(default_factory=lambda: ["naive", "sdpa", "ext", "auto"])  # triton: interpreted on CPU

    @classmethod
    def smoke(cls) -> "HFLlamaBench":
        """A run of seconds, for the test suite."""
        return cls(layers=1, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=61, seq=16, batch=2, reps=2,
                   warmup=0, backends=["naive", "sdpa", "auto"])


def llama_config(s: HFLlamaBench):
    import transformers

    return transformers.LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                                    num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                    num_key_value_heads=s.kv_heads, max_position_embeddings=s.seq,
                                    attention_dropout=s.dropout, bos_token_id=0, eos_token_id=None, pad_token_id=0)


def fastgpt_refusal(backend: str, s: HFLlamaBench) -> tuple[Optional[str], str]:
    """(why `backend` cannot run this model's attention here, or None; the backend that would run)."""
    q = torch.empty(s.batch, s.heads, s.seq, s.hidden // s.heads)  # what transformers hands the attention
    call = AttentionCall.like(q, kv_heads=s.kv_heads, dropout_p=s.dropout)
    reason = refusal(call, backend)
    if reason is not None:
        return reason, backend
    if backend == "auto":
        return None, choose(call).name
    return (NOT_TIMED if get_backend(backend).emulated(q.device) else None), backend


class Provider:
    """One model and optimizer with one attention implementation, stepping on a fixed batch."""

    def __init__(self, config, attn_implementation: str, input_ids: torch.Tensor):
        import transformers

        torch.manual_seed(0)  # the same weights for every provider
        self.model = transformers.LlamaForCausalLM._from_config(copy.deepcopy(config),
                                                                attn_implementation=attn_implementation)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.input_ids = input_ids

    def loss_and_grads(self) -> tuple[float, dict[str, torch.Tensor]]:
        loss = self.model(self.input_ids, labels=self.input_ids).loss
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}
        self.model.zero_grad(set_to_none=True)
        return loss.item(), grads

    def step(self) -> None:
        loss = self.model(self.input_ids, labels=self.input_ids).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def validate(providers: dict[str, Provider], dropout: float) -> dict[str, dict[str, float]]:
    """Each provider's first loss and gradients against eager's (from the same weights); raises if
    one is off. With attention dropout the draws differ, so only finiteness is checked."""
    loss_ref, grads_ref = providers["eager"].loss_and_grads()
    found = {}
    for name, provider in providers.items():
        loss, grads = provider.loss_and_grads()
        grad_err = max(((grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-30)).item()
                       for n, g in grads_ref.items())
        found[name] = {"loss": loss, "loss_error": abs(loss - loss_ref), "grad_rel_error": grad_err}
        if not torch.isfinite(torch.tensor(loss)):
            raise RuntimeError(f"{name}: the loss is {loss}")
        if dropout == 0 and (abs(loss - loss_ref) > LOSS_TOLERANCE or grad_err > GRAD_TOLERANCE):
            raise RuntimeError(f"{name} disagrees with eager before timing: loss {loss} vs {loss_ref}, gradients off "
                               f"by {grad_err:.2e} of their largest (limits {LOSS_TOLERANCE}, {GRAD_TOLERANCE})")
    return found


def run_hf_llama_benchmark(s: HFLlamaBench) -> dict[str, Any]:
    import fastgpt.integrations.transformers as fastgpt_hf

    device = torch.device("cpu")
    config = llama_config(s)
    input_ids = torch.randint(0, s.vocab, (s.batch, s.seq), generator=torch.Generator().manual_seed(1))
    records: dict[str, dict[str, Any]] = {}
    providers: dict[str, Provider] = {}
    for name in TRANSFORMERS_IMPLEMENTATIONS:
        records[name] = {"provider": name, "attention": f"transformers {name}"}
        providers[name] = Provider(config, name, input_ids)
    for backend in s.backends:
        if backend != "auto" and backend not in available_backends(device):
            reason, runs = f"not available on CPU here: {get_backend(backend).unavailable_reason(device)}", backend
        else:
            reason, runs = fastgpt_refusal(backend, s)
        label = f"fastgpt {backend}"
        records[label] = {"provider": label, "attention": f"fastgpt auto (→ {runs})" if backend == "auto" else label}
        if reason is not None:
            records[label]["status"] = reason
            continue
        providers[label] = Provider(config, fastgpt_hf.register(backend), input_ids)

    checks = validate(providers, s.dropout)
    steps: dict[str, Callable[[], None]] = {name: p.step for name, p in providers.items()}
    times = time_interleaved(steps, device, s.reps, s.warmup)
    tokens = s.batch * s.seq
    for name, seconds in times.items():
        stats = summarize(seconds)
        records[name].update(status="ok", **stats, tokens_per_s=tokens / stats["median_s"],
                             peak_memory_bytes=peak_memory_bytes(steps[name], device),
                             memory_method=memory_method(device), raw_s=seconds, **checks[name])
    return {"settings": asdict(s), "params": sum(p.numel() for p in providers["eager"].model.parameters()),
            "records": list(records.values())}


def markdown(result: dict[str, Any]) -> str:
    """The table of docs/benchmarks.md: per provider, the step's median (p20-p80), tokens/s, peak
    memory, and the time relative to transformers' sdpa."""
    records = result["records"]
    sdpa = next(r for r in records if r["provider"] == "sdpa")["median_s"]
    lines = ["| attention | step, median (p20-p80) | tokens/s | peak memory | time / sdpa's |", "|---|---|---|---|---|"]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['attention']} | not timed: {r['status']} | | | |")
            continue
        memory = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f} MiB"
        ms = {key: r[key] * 1e3 for key in ("median_s", "p20_s", "p80_s")}
        lines.append(f"| {r['attention']} | {ms['median_s']:.0f} ms ({ms['p20_s']:.0f}-{ms['p80_s']:.0f}) "
                     f"| {r['tokens_per_s']:.0f} | {memory} | {r['median_s'] / sdpa:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    defaults = HFLlamaBench()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "seq", "batch", "reps", "warmup"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=getattr(defaults, key))
    parser.add_argument("--dropout", type=float, default=defaults.dropout, help="the config's attention_dropout")
    parser.add_argument("--backends", nargs="+", default=defaults.backends, help="fastgpt backends (and auto)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice); on a shared "
                        "machine one thread is descheduled less often than a team of two waiting on each other")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, a run of seconds")
    parser.add_argument("--json", help="write the environment, the settings and every record (raw timings) here")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = HFLlamaBench.smoke() if args.smoke else HFLlamaBench(
        **{k: getattr(args, k) for k in asdict(defaults)})
    import transformers

    env = {**print_cpu_environment(), "transformers": transformers.__version__}
    print(f"transformers: {env['transformers']}")
    result = run_hf_llama_benchmark(settings)
    env["load_average_end"] = load_average()
    result = {"environment": env, **result}
    s = settings
    print(f"load_average_end: {env['load_average_end']}\n")
    print(f"LlamaForCausalLM, {s.layers} layers, hidden {s.hidden}, {s.heads} heads over {s.kv_heads} key/value "
          f"heads, {result['params'] / 1e6:.2f} M parameters; batch {s.batch} × {s.seq} tokens, fp32, attention "
          f"dropout {s.dropout}; forward + backward + AdamW, medians of {s.reps}\n")
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
