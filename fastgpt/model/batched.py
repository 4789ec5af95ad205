"""Many prompts at once: batched generation over the paged KV cache, with continuous batching.

    for event in generate_batched(model, prompts, max_new_tokens=100, batch_size=16, seed=0):
        event.index, event.token, event.finished     # one event per sampled token

Up to `batch_size` sequences are live at a time; the others wait in the order given. Each step is
ONE forward of the model over every live sequence's new tokens, back to back: a just-admitted
prompt brings the part of it not already cached in shared pages (its prefill), every other live
sequence its last sampled token (a decode step), all in one varlen call per layer over the pages
(fastgpt/model/paged_kv.py, fastgpt/attention/paged.py). Each sequence then samples its next token
from its last row's logits. A finished sequence's pages and its place in the batch go to the next
waiting prompt at the next step, so sequences of different lengths keep the batch full.

A sequence finishes (`event.finished`, the reason) when it has max_new_tokens new tokens
("max_new_tokens"), when its new tokens end with `stop` ("stop"; the stop tokens are the event's
last tokens), or when its text (prompt and new tokens) fills block_size tokens ("block_size"): the
GPT's positions are learned for block_size tokens, so a longer text no longer fits its context
(`fastgpt sample --prompt` goes on by cropping the context and recomputing it, fastgpt/model/kv_cache.py;
a batch stops the sequence instead and gives its pages to the next prompt). A prompt must leave room
for one new token (at most block_size - 1 tokens).

Randomness: prompt i samples with its own torch.Generator seeded seed + i, and draws exactly what
LanguageModel.generate draws for that prompt alone with that generator (one multinomial per token
over the same probabilities). So the tokens of prompt i do not depend on the batch, on the batch
size or on the other prompts, and equal `generate(prompt_i, generator=Generator().manual_seed(seed
+ i))`, up to the rounding of the different kernels (rounding that flips a draw is rare).
seed=None draws a base seed from the operating system.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch

from fastgpt.model.gpt import sample

FINISH_REASONS = ("max_new_tokens", "stop", "block_size")


@dataclass(frozen=True)
class TokenEvent:
    """Prompt `index` sampled `token`; `finished` is its reason on the sequence's last event, else None.
    A prompt with max_new_tokens 0 gets one event with token None."""
    index: int
    token: Optional[int]
    finished: Optional[str] = None


@dataclass
class _Live:
    """A sequence in the batch: what it feeds the model next step, and what it has drawn."""
    index: int
    prompt: list[int]
    max_new_tokens: int
    generator: torch.Generator
    feed: list[int] = field(default_factory=list)  # this step's new tokens (uncached prompt, or the last drawn)
    new: list[int] = field(default_factory=list)


def generate_batched(model, prompts: Sequence[Sequence[int]], max_new_tokens: Union[int, Sequence[int]], *,
                     temperature: float = 1.0, top_k: Optional[int] = None, seed: Optional[int] = None,
                     batch_size: int = 16, page_size: int = 16, stop: Optional[Sequence[int]] = None,
                     pool=None) -> Iterator[TokenEvent]:
    """Generates for every prompt (lists of token ids) -> TokenEvents as tokens are drawn (module
    docstring). max_new_tokens: one for all or one per prompt. `pool`: a PagePool to use (else
    page_pool_for's). The arguments are checked before the first event."""
    prompts = [list(p) for p in prompts]
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    _check_arguments(model, prompts, limits, temperature, top_k, batch_size)
    pool = page_pool_for(model, prompts, limits, batch_size, page_size) if pool is None else pool
    device = model.lm_head.weight.device
    base = torch.Generator().seed() if seed is None else seed
    waiting = deque(_Live(i, p, n, torch.Generator(device=device).manual_seed(base + i))
                    for i, (p, n) in enumerate(zip(prompts, limits)))
    return _run(model, pool, waiting, batch_size, temperature, top_k, list(stop or []))


def page_pool_for(model, prompts: Sequence[Sequence[int]], max_new_tokens: Union[int, Sequence[int]],
                  batch_size: int, page_size: int = 16):
    """The pool these prompts need: batch_size sequences of the longest text one can reach (prompt and
    new tokens, at most block_size), so that no step ever waits for a page."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    longest = max(1, max(len(p) + n for p, n in zip(prompts, limits)))  # bad limits are refused later
    return model.make_page_pool(min(batch_size, len(prompts)), page_size, max_length=longest)


def _check_arguments(model, prompts, limits, temperature, top_k, batch_size) -> None:
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    if block_size is None or not hasattr(model, "make_page_pool"):
        raise ValueError(f"batched generation needs a GPT (attention over a paged KV cache); got "
                         f"{type(model).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    if len(limits) != len(prompts):
        raise ValueError(f"max_new_tokens has {len(limits)} values for {len(prompts)} prompts: give one, or one each")
    for i, (p, n) in enumerate(zip(prompts, limits)):
        if not 1 <= len(p) <= block_size - 1:
            raise ValueError(f"prompt {i} has {len(p)} tokens; it must have 1 to block_size - 1 = {block_size - 1} "
                             "(the learned positions end at block_size - 1 and one must be left for a new token)")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"max_new_tokens for prompt {i} is {n!r}; it must be an integer >= 0")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None; got {top_k}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")


@torch.no_grad()
def _run(model, pool, waiting: deque, batch_size: int, temperature: float, top_k: Optional[int],
         stop: list[int]) -> Iterator[TokenEvent]:
    """The loop: admit waiting prompts into free places, one forward over the batch, draw, retire."""
    was_training = model.training
    model.eval()
    live: list[_Live] = []
    try:
        while waiting or live:
            yield from _admit(pool, waiting, live, batch_size)
            if not live:
                continue
            logits = _forward(model, pool, live)  # (B, V)
            for seq, row in zip(list(live), logits):
                token = int(sample(row.unsqueeze(0), temperature, top_k, seq.generator))
                seq.new.append(token)
                reason = _finish_reason(seq, stop, model.config.block_size)
                yield TokenEvent(seq.index, token, reason)
                if reason is not None:
                    pool.release(seq.index)
                    live.remove(seq)
                else:
                    seq.feed = [token]
                    pool.reserve(seq.index, pool.length(seq.index) + 1)
    finally:
        for seq in live:  # a caller that stops early hands the pages back too
            pool.release(seq.index)
        model.train(was_training)


def _admit(pool, waiting: deque, live: list[_Live], batch_size: int) -> Iterator[TokenEvent]:
    """Moves waiting prompts into the batch while it has room; each shares what it can of the cache."""
    while waiting and len(live) < batch_size:
        seq = waiting.popleft()
        if seq.max_new_tokens == 0:
            yield TokenEvent(seq.index, None, "max_new_tokens")
            continue
        cached = pool.admit(seq.index, seq.prompt)
        seq.feed = seq.prompt[cached:]
        live.append(seq)


def _forward(model, pool, live: list[_Live]) -> torch.Tensor:
    """One step over the batch: every live sequence's new tokens back to back -> (B, V), the logits
    of each sequence's last new token."""
    step = pool.step([s.index for s in live], [len(s.feed) for s in live])
    device = model.lm_head.weight.device
    idx = torch.tensor([[t for s in live for t in s.feed]], dtype=torch.long, device=device)  # (1, total_q)
    logits, _ = model(idx, paged=step)  # (1, total_q, V)
    return logits[0, step.last_rows.to(device)]


def _finish_reason(seq: _Live, stop: list[int], block_size: int) -> Optional[str]:
    if stop and seq.new[-len(stop):] == stop:
        return "stop"
    if len(seq.new) >= seq.max_new_tokens:
        return "max_new_tokens"
    if len(seq.prompt) + len(seq.new) >= block_size:
        return "block_size"
    return None


def generate_all(model, prompts: Sequence[Sequence[int]], max_new_tokens: Union[int, Sequence[int]],
                 **kwargs) -> list[list[int]]:
    """generate_batched's new tokens, per prompt in the prompts' order (and why each stopped: use
    generate_batched for that)."""
    out: list[list[int]] = [[] for _ in prompts]
    for event in generate_batched(model, prompts, max_new_tokens, **kwargs):
        if event.token is not None:
            out[event.index].append(event.token)
    return out
