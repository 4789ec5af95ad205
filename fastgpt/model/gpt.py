"""The lecture's language models: the bigram baseline and the GPT.

GPT, bottom-up: token + position embeddings -> n_layer pre-norm Blocks (causal self-attention,
then a 4× MLP, a residual around each) -> final LayerNorm -> LM head over the vocabulary.
Which kernel computes the attention is not part of the model's parameters: see
`GPT.set_backend`. The attention options (a sliding window, soft-capping, learnable sinks;
ModelConfig's window, softcap, sinks) are off by default, leaving the lecture's model as it is.

Generation (`generate`), one token per step: next_token_logits() runs the model, either over the
whole cropped context or, with a KV cache, as prefill() (the window, after emptying the cache) or
decode_one_token() (the newest token over the cache); sample() then draws the next id from the
logits (temperature, top-k, softmax: logits_to_probs()).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from fastgpt.model.attention import CausalSelfAttention
from fastgpt.model.dropout import ResidualDropout
from fastgpt.model.kv_cache import CACHE_POLICIES, KVCache, LayerKV, plan_step
from fastgpt.model.linear import Linear, check_linear_kernel
from fastgpt.model.packing import Packing
from fastgpt.model.paged_kv import PagedLayer, PagedStep, PagePool


@dataclass
class ModelConfig:
    model: str = "gpt"  # "gpt" or "bigram"
    vocab_size: int = 65  # set from the corpus's vocabulary when training
    block_size: int = 256  # context length T: the most tokens the model attends over
    n_layer: int = 6  # number of transformer blocks
    n_head: int = 6  # attention heads per block; head size = n_embd // n_head
    n_kv_head: Optional[int] = None  # key/value heads (grouped-query when < n_head); None: n_head
    n_embd: int = 384  # width C of the residual stream
    dropout_p: float = 0.2  # dropout probability on the attention weights and on each residual branch
    # attention backend: "auto", a name from fastgpt.backend_names() or a kernel path ("ext.cpu_packed")
    backend: str = "auto"
    # The attention options (fastgpt/attention/api.py), all off in the lecture's model:
    window: Optional[int] = None  # sliding window W: token i attends to tokens i - W < j <= i; None: all j <= i
    softcap: float = 0.0  # soft-cap every attention score s to softcap·tanh(s / softcap); 0: off
    sinks: bool = False  # one learnable logit per head and layer in every softmax denominator (no value)

    def validate(self) -> None:
        if self.model not in ("gpt", "bigram"):
            raise ValueError(f"model must be 'gpt' or 'bigram'; got {self.model!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_kv_head is not None and (not isinstance(self.n_kv_head, int) or self.n_kv_head < 1
                                           or self.n_head % self.n_kv_head != 0):
            raise ValueError(f"n_kv_head={self.n_kv_head!r} must be a positive integer dividing n_head={self.n_head} "
                             "(query heads per key/value head), or unset for one per query head")
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1); got {self.dropout_p!r}")
        self._validate_attention_options()

    def _validate_attention_options(self) -> None:
        if self.window is not None and (not isinstance(self.window, int) or isinstance(self.window, bool)
                                        or not 1 <= self.window <= self.block_size):
            raise ValueError(f"window={self.window!r} must be an integer in [1, block_size={self.block_size}] "
                             "(the tokens each one attends to, itself included), or unset for the whole context")
        if isinstance(self.softcap, bool) or not isinstance(self.softcap, (int, float)) \
                or not (math.isfinite(self.softcap) and self.softcap >= 0):
            raise ValueError(f"softcap={self.softcap!r} must be a finite number >= 0 (0 turns it off)")
        if not isinstance(self.sinks, bool):
            raise ValueError(f"sinks={self.sinks!r} must be True or False")
        off = {"window": None, "softcap": 0.0, "sinks": False}
        used = [name for name, value in off.items() if getattr(self, name) != value]
        if self.model == "bigram" and used:
            raise ValueError(f"{used[0]}={getattr(self, used[0])!r} is an attention option, and model='bigram' has no "
                             "attention: drop it, or train model='gpt'")


class LanguageModel(nn.Module):
    """What both models share: sampling. Subclasses define forward(idx, targets) -> (logits, loss)."""

    # The most tokens forward() accepts; None for a model without a context limit (bigram).
    context_size: Optional[int] = None

    @staticmethod
    def _loss(logits: torch.Tensor, targets: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if targets is None:
            return None
        B, T, V = logits.shape
        return F.cross_entropy(logits.view(B * T, V), targets.reshape(B * T))

    def make_kv_cache(self) -> Optional[KVCache]:
        """An empty KV cache for this model, or None for a model with nothing to cache (bigram)."""
        return None

    def set_linear_kernel(self, name: str) -> None:
        """The kernel of every linear layer: "torch" (F.linear) or "skinny" (the ext kernel on the
        few rows of a decode step; fastgpt/model/linear.py). Parameters and state_dict are untouched."""
        check_linear_kernel(name, allow_auto=False)
        for module in self.modules():
            if isinstance(module, Linear):
                module.kernel = name

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 kv_cache: bool = True, cache_policy: str = "exact") -> torch.Tensor:
        """Extends idx (B, T) by max_new_tokens sampled tokens -> (B, T + max_new_tokens).

        The context fed to the model is cropped to its last `context_size` tokens. Runs in eval
        mode (no dropout) and restores the previous mode afterwards. kv_cache=True keeps every
        layer's keys and values between steps (fastgpt/model/kv_cache.py): with cache_policy="exact" the
        tokens are those of kv_cache=False; "window" is faster past context_size, approximately.
        """
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, generator, kv_cache, cache_policy))
        return torch.cat([idx, *new], dim=1)

    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                        kv_cache: bool = True, cache_policy: str = "exact"):
        """`generate`, one token at a time: yields each sampled (B, 1) tensor of ids as it is drawn.
        The arguments are checked here, before the first token, so a bad one raises at the call."""
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a (B, T) tensor of token ids (int64); got shape {tuple(idx.shape)}, {idx.dtype}")
        if idx.shape[1] < 1:
            raise ValueError("idx must hold at least one token to start from (T >= 1)")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
        if not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number > 0; got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None; got {top_k}")
        if cache_policy not in CACHE_POLICIES:
            raise ValueError(f"cache_policy must be one of {', '.join(map(repr, CACHE_POLICIES))}; got {cache_policy!r}")
        return self._sample_tokens(idx, max_new_tokens, temperature, top_k, generator, kv_cache, cache_policy)

    @torch.no_grad()
    def _sample_tokens(self, idx, max_new_tokens, temperature, top_k, generator, kv_cache, cache_policy):
        """The sampling loop of generate_stream, over checked arguments: idx (B, T) grows by one
        sampled token per step."""
        cache = self.make_kv_cache() if kv_cache else None
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits = self.next_token_logits(idx, cache, cache_policy)  # (B, V)
                next_id = sample(logits, temperature, top_k, generator)  # (B, 1)
                idx = torch.cat((idx, next_id), dim=1)
                yield next_id
        finally:
            self.train(was_training)

    def next_token_logits(self, idx: torch.Tensor, cache: Optional[KVCache], cache_policy: str) -> torch.Tensor:
        """idx (B, T) -> the logits (B, V) of the token that follows it. Without a cache: the whole
        context, cropped to context_size; with one, a prefill or a decode step, as plan_step says."""
        if cache is None:
            context = idx if self.context_size is None else idx[:, -self.context_size:]
            logits, _ = self(context)
            return logits[:, -1, :]  # only the last position predicts
        step = plan_step(idx.shape[1], cache, cache_policy)
        if step.prefill:
            return self.prefill(idx[:, -step.window:], cache)
        return self.decode_one_token(idx[:, -1:], cache)

    def prefill(self, context: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Empties the cache, then runs context (B, T) through the model, storing every layer's keys
        and values for positions 0..T-1 -> the logits (B, V) of the token after it."""
        cache.reset()
        logits, _ = self(context, kv_cache=cache)
        return logits[:, -1, :]

    def decode_one_token(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """token (B, 1), the newest, attends over the cached positions and joins them -> the logits
        (B, V) of the token after it."""
        logits, _ = self(token, kv_cache=cache)
        return logits[:, -1, :]


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int]) -> torch.Tensor:
    """logits (B, V) -> probabilities (B, V): divided by the temperature, then with every logit
    below the k-th largest masked out when top_k is set."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return F.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, temperature: float, top_k: Optional[int],
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token id per row, drawn from logits (B, V) -> (B, 1)."""
    return torch.multinomial(logits_to_probs(logits, temperature, top_k), num_samples=1, generator=generator)


class BigramLanguageModel(LanguageModel):
    """Each token reads the logits for the next token straight off a (V, V) table."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        logits = self.token_embedding_table(idx)  # (B, T, V)
        return logits, self._loss(logits, targets)

    def set_backend(self, name: str) -> None:
        pass  # no attention to swap


class MLP(nn.Module):
    """The per-token feed-forward: C -> 4C -> ReLU -> C, then dropout on the residual branch."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = Linear(config.n_embd, 4 * config.n_embd)
        self.proj = Linear(4 * config.n_embd, config.n_embd)
        self.resid_dropout = ResidualDropout(config.dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(self.proj(F.relu(self.fc(x))))


class Block(nn.Module):
    """Communication (attention) then computation (MLP), each pre-normed, each a residual branch."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.dropout_p, config.backend,
                                        config.n_kv_head, window=config.window, softcap=config.softcap,
                                        sinks=config.sinks)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: Optional[LayerKV] = None,
                packing: Optional[Packing] = None, paged: Optional[PagedLayer] = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), kv_cache, packing, paged)
        x = x + self.mlp(self.ln2(x))
        return x


class GPT(LanguageModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.context_size = config.block_size
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # The lecture's init: N(0, 0.02) weights, zero biases. Small logits at init give a loss
        # near ln(vocab_size), the loss of a uniform guess.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_backend(self, name: str) -> None:
        """Swaps the attention kernel of every block, on a live model, mid-training if need be.
        Parameters, optimizer state and the checkpoint format are untouched."""
        for block in self.blocks:
            block.attn.set_backend(name)
        self.config.backend = name

    def make_kv_cache(self) -> KVCache:
        """An empty cache: block_size positions per layer, or with a sliding window the last W (rolling)."""
        return KVCache(self.config.n_layer, self.config.block_size, self.config.window)

    def make_page_pool(self, max_sequences: int, page_size: int = 16, max_length: Optional[int] = None) -> PagePool:
        """A paged KV cache (fastgpt/model/paged_kv.py) for max_sequences live sequences of up to
        max_length positions each (default and at most block_size), in the model's dtype and on its
        device: ceil(max_length / page_size) pages per sequence, num_pages × page_size × n_layer × 2 ×
        H_kv × D × dtype size bytes."""
        config, weight = self.config, self.lm_head.weight
        max_length = config.block_size if max_length is None else min(max_length, config.block_size)
        pages_per_sequence = -(-max_length // page_size)
        return PagePool(config.n_layer, config.n_kv_head or config.n_head, config.n_embd // config.n_head, page_size,
                        max_sequences * pages_per_sequence, weight.dtype, weight.device)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None,
                packing: Optional[Packing] = None, paged: Optional[PagedStep] = None):
        """idx (B, T) -> logits (B, T, V), loss. With `kv_cache` (generation), idx holds the T tokens
        that follow the cache's `length` positions; their keys and values join the cache. With
        `packing` (training on documents), each row holds whole documents back to back: positions
        count from each document's start and attention stays inside it (fastgpt/model/packing.py).
        With `paged` (batched generation), idx (1, total_q) holds the new tokens of many sequences back
        to back, at the positions the step gives, over the pages of fastgpt/model/paged_kv.py."""
        B, T = idx.shape
        if packing is not None:
            return self._forward_packed(idx, targets, packing)
        if paged is not None:
            return self._forward_paged(idx, paged)
        start = 0 if kv_cache is None else kv_cache.length  # absolute position of idx[:, 0]
        if start + T > self.config.block_size:
            if kv_cache is None:
                raise ValueError(f"idx has T={T} tokens but block_size is {self.config.block_size}; crop the context")
            raise ValueError(f"idx has T={T} tokens after {start} cached positions but block_size is "
                             f"{self.config.block_size}; reset the cache and crop the context")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.token_embedding(idx) + self.position_embedding(pos)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if kv_cache is None else kv_cache.layers[i])
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return logits, self._loss(logits, targets)

    def _forward_packed(self, idx: torch.Tensor, targets: Optional[torch.Tensor], packing: Packing):
        B, T = idx.shape
        if packing.positions.shape != (B, T) or packing.cu_seqlens[-1] != B * T:
            raise ValueError(f"packing covers positions {tuple(packing.positions.shape)} but idx is ({B}, {T})")
        if T > self.config.block_size:
            raise ValueError(f"idx has T={T} tokens but block_size is {self.config.block_size}; crop the context")
        x = self.token_embedding(idx) + self.position_embedding(packing.positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x, None, packing)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return logits, self._loss(logits, targets)

    def _forward_paged(self, idx: torch.Tensor, paged: PagedStep):
        """idx (1, total_q) -> logits (1, total_q, V), loss None: one step of batched generation."""
        positions = paged.positions  # (total_q,)
        if idx.shape != (1, positions.numel()):
            raise ValueError(f"idx has shape {tuple(idx.shape)}; a paged step takes (1, {positions.numel()}): "
                             "the new tokens of every sequence back to back")
        longest = max(paged.layout.k_lens)  # host lengths: no device read
        if longest > self.config.block_size:
            raise ValueError(f"a sequence reaches position {longest - 1} but block_size is {self.config.block_size}: "
                             "the learned positions end there; stop the sequence")
        x = self.token_embedding(idx) + self.position_embedding(positions)  # (1, total_q, C)
        for i, block in enumerate(self.blocks):
            x = block(x, paged=paged.layer(i))
        return self.lm_head(self.ln_f(x)), None  # (1, total_q, V)


def build_model(config: ModelConfig) -> LanguageModel:
    config.validate()
    return GPT(config) if config.model == "gpt" else BigramLanguageModel(config)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
