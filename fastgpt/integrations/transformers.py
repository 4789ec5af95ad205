"""Hugging Face transformers models with their attention run by fastgpt.

    import fastgpt.integrations.transformers as fastgpt_hf

    name = fastgpt_hf.register(backend="auto")          # "fastgpt"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    # or from_pretrained(..., attn_implementation=name), or model.set_attn_implementation(name)

transformers 5.x looks up two functions by that name, and calls them in every forward:

  the mask function, once per forward (create_causal_mask): it gets the mask's description, the
  q_length queries at positions q_offset.., the kv_length keys from kv_offset, the 2D padding mask
  and the mask pattern, and returns what every layer then receives as `attention_mask`:
      None        the plain causal mask with the newest query on the newest key, which
                  causal_attention draws itself (bottom-right), with no mask tensor at all
      KeyRanges   a padded batch: per sequence, the one run of real tokens among the keys
      (raises)    anything else, below

  the attention function, once per layer:
      attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
          query (B, H, T_q, D); key, value (B, H_kv, T_k, D) as the model made them, H_kv dividing
          H (grouped-query: no repeat_kv, the backend reads each shared head), T_k >= T_q over a
          KV cache; dropout and scaling as the model passes them
      -> (attn_output (B, T_q, H, D), None)

A padded batch is computed exactly when each sequence's real tokens are one run of positions (left
padding, as batched generation uses; right padding, as training batches do). Over a run
[start, end) of keys, causal ∧ padding is the causal mask of the slice with its diagonal
bottom-right, so each distinct run is one causal_attention call on its slice. The kernels know no
per-sequence offset, so a batch of B different runs costs B calls where an unpadded batch costs one.
Outputs at padded positions are zeros (as transformers' flash_attention_2 leaves them); no real
token ever reads them.

Refused with a ValueError that names what is unsupported, never approximated:
  - any mask but plain causal: a non-causal (bidirectional) model or cross-attention, sliding-window
    or chunked attention, packed sequences, masks a model overlays (image tokens);
  - keys beyond the newest query (a static, preallocated cache), or an attention_mask whose length
    is not the keys';
  - padding between real tokens (a row of the mask that is not one run of ones), or a 4D mask
    tensor prepared outside the mask function;
  - output_attentions=True (no fastgpt backend returns the attention weights);
  - logit soft-capping, attention sinks, position biases, packed inputs (cu_seq_lens).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from fastgpt.attention.api import causal_attention
from fastgpt.attention.registry import get_backend

try:
    import transformers
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import causal_mask_function
except ImportError as error:
    raise ImportError('fastgpt.integrations.transformers needs Hugging Face transformers 5.x: '
                      'pip install "fastgpt[hf]"') from error

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"fastgpt.integrations.transformers needs transformers >= 5.0 (its AttentionInterface and "
                      f"AttentionMaskInterface); found {transformers.__version__}")

try:
    # What a forward records for output_attentions=True. Some models (GPT-2) drop the flag before
    # their layers run, so the attention function sees it only here; a private name, hence optional.
    from transformers.utils.output_capturing import _active_collector
except ImportError:
    _active_collector = None

# Attention-function arguments that change the math; each is refused unless absent or None.
UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping",
    "sliding_window": "sliding-window attention",
    "s_aux": "attention sinks",
    "position_bias": "a position bias added to the scores",
    "cu_seq_lens_q": "packed sequences (cu_seq_lens)",
    "cu_seq_lens_k": "packed sequences (cu_seq_lens)",
}

_REGISTERED: dict[str, str] = {}  # name -> backend, the implementations register() added


def register(backend: str = "auto", name: Optional[str] = None) -> str:
    """Registers fastgpt's causal attention with transformers; returns the `attn_implementation`.

    backend: the fastgpt backend the model's attention runs ("auto", "naive", "sdpa", ...), chosen
        per call as `fastgpt.causal_attention` chooses it.
    name: the implementation's name; None means "fastgpt" for "auto", "fastgpt_<backend>" otherwise.
        Registering a name again replaces its backend (models look it up at every forward).
    """
    if backend != "auto":
        get_backend(backend)  # an unknown name fails here, listing the known ones
    if name is None:
        name = "fastgpt" if backend == "auto" else f"fastgpt_{backend}"
    if not isinstance(name, str):
        raise ValueError(f"name={name!r} must be a string (or None for the default); got {type(name).__name__}")
    if not name:
        raise ValueError("name='' is empty: models look their attention up by this name "
                         "(attn_implementation=...); choose a plain name such as 'fastgpt'")
    if any(c.isspace() for c in name):
        raise ValueError(f"name={name!r} holds whitespace, which attn_implementation would have to repeat exactly; "
                         "choose a plain name such as 'fastgpt'")
    if any(part in name for part in ("/", "|", "flash")):
        raise ValueError(f"name={name!r}: transformers reads a name with '/' as a Hub kernel, '|' as a prefix and "
                         f"'flash' as flash attention; choose a plain name such as 'fastgpt'")
    if name not in _REGISTERED and (name == "eager" or name in AttentionInterface._global_mapping
                                    or name in AttentionMaskInterface._global_mapping):
        raise ValueError(f"name={name!r} is already an attention implementation of transformers; choose another name")
    AttentionInterface.register(name, functools.partial(attention, name=name, backend=backend))
    AttentionMaskInterface.register(name, functools.partial(causal_mask, name=name))
    _REGISTERED[name] = backend
    return name


@dataclass(frozen=True)
class KeyRanges:
    """The mask of a padded batch: sequence b's real tokens are keys starts[b] .. ends[b] - 1 of
    kv_length (start == end: none), and the queries are the last positions of the keys."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    kv_length: int

    def groups(self) -> dict[tuple[int, int], list[int]]:
        """{(start, end): the sequences with that run}: one attention call each."""
        found: dict[tuple[int, int], list[int]] = {}
        for b, run in enumerate(zip(self.starts, self.ends)):
            found.setdefault(run, []).append(b)
        return found


def causal_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                mask_function=causal_mask_function, attention_mask: Optional[torch.Tensor] = None, *,
                name: str = "fastgpt", **kwargs) -> Optional[KeyRanges]:
    """transformers' mask function for `name`: None (plain causal), KeyRanges (a padded batch), or
    a ValueError. attention_mask is the (B, kv_offset + kv_length) 2D padding mask or None."""
    if mask_function is not causal_mask_function:
        raise ValueError(
            f"attn_implementation={name!r} computes plain causal attention only; this model asked for another "
            f"mask ({getattr(mask_function, '__qualname__', mask_function)}: non-causal or cross-attention, a sliding "
            f"window, chunks, packed sequences or an overlay). Use attn_implementation='sdpa' or 'eager' for it")
    q_offset = int(q_offset)  # a tensor in static caches
    first_key, last_key, last_query = kv_offset, kv_offset + kv_length - 1, q_offset + q_length - 1
    if last_query != last_key:
        raise ValueError(
            f"attn_implementation={name!r} needs the newest query to be the newest key; got queries at positions "
            f"{q_offset}..{last_query} and keys at {first_key}..{last_key} (a static, preallocated cache has empty "
            f"slots past the newest token; use the default dynamic cache)")
    if attention_mask is None:
        return None
    if attention_mask.shape != (batch_size, kv_offset + kv_length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; attn_implementation={name!r} needs "
            f"(batch, keys) = ({batch_size}, {kv_offset + kv_length}), one column per token of the input and its cache")
    real = attention_mask[:, kv_offset:].bool()  # (B, T_k): True at real tokens
    if bool(real.all()):
        return None
    positions = torch.arange(kv_length, device=real.device)
    starts = torch.where(real, positions, kv_length).amin(dim=1)  # first real token, kv_length if none
    ends = torch.where(real, positions + 1, 0).amax(dim=1)  # one past the last, 0 if none
    one_run = (ends - starts).clamp(min=0) == real.sum(dim=1)
    starts, ends, one_run = starts.tolist(), ends.tolist(), one_run.tolist()  # one sync per forward
    if not all(one_run):
        b = one_run.index(False)
        row = "".join("1" if x else "0" for x in real[b].tolist())
        raise ValueError(
            f"attention_mask row {b} has padding between real tokens ({row}); attn_implementation={name!r} takes "
            f"left or right padding, each row one run of ones")
    runs = [(s, e) if s < e else (0, 0) for s, e in zip(starts, ends)]  # (0, 0): no real token
    return KeyRanges(tuple(s for s, _ in runs), tuple(e for _, e in runs), kv_length)


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
              is_causal: Optional[bool] = None, *, name: str = "fastgpt", backend: str = "auto",
              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention function for `name`: query (B, H, T_q, D), key and value
    (B, H_kv, T_k, D) -> ((B, T_q, H, D), None), through fastgpt.causal_attention."""
    _refuse_unsupported(module, attention_mask, is_causal, kwargs, name)
    if attention_mask is None:
        out = causal_attention(query, key, value, dropout_p=dropout, scale=scaling, backend=backend)
    else:
        out = _padded_attention(query, key, value, attention_mask, dropout, scaling, backend, name)
    return out.transpose(1, 2), None  # (B, H, T_q, D) -> (B, T_q, H, D)


def _padded_attention(query, key, value, ranges: KeyRanges, dropout_p: float, scaling: Optional[float],
                      backend: str, name: str) -> torch.Tensor:
    """One causal_attention call per distinct run of real tokens, on its slice -> (B, H, T_q, D)."""
    B, H, T_q, D = query.shape
    T_k = key.shape[2]
    if ranges.kv_length != T_k or len(ranges.starts) != B:
        raise ValueError(f"attn_implementation={name!r}: the mask was made for {len(ranges.starts)} sequences of "
                         f"{ranges.kv_length} keys, but this layer has {B} of {T_k}")
    first_query = T_k - T_q  # the queries are the last T_q positions
    out = query.new_zeros(B, H, T_q, D)  # padded positions stay zero
    for (start, end), rows in ranges.groups().items():
        q_from = max(start, first_query)  # a query before the run is padding
        if end <= q_from:
            continue
        index = torch.tensor(rows, device=query.device)
        q_rows = slice(q_from - first_query, end - first_query)  # that run's queries ...
        y = causal_attention(query[index, :, q_rows], key[index, :, start:end], value[index, :, start:end],
                             dropout_p=dropout_p, scale=scaling, backend=backend)  # ... over its keys, bottom-right
        out[index, :, q_rows] = y
    return out


def _refuse_unsupported(module, attention_mask, is_causal: Optional[bool], kwargs: dict, name: str) -> None:
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise ValueError(f"attn_implementation={name!r} computes causal attention only; {type(module).__name__} "
                         f"is not causal (is_causal=False: an encoder or cross-attention). Use 'sdpa' or 'eager'")
    if attention_mask is not None and not isinstance(attention_mask, KeyRanges):
        shape = getattr(attention_mask, "shape", None)
        given = f"of shape {tuple(shape)}" if shape is not None else f"of type {type(attention_mask).__name__}"
        raise ValueError(
            f"attn_implementation={name!r} got an attention_mask {given} that its mask function did not make (a 4D "
            f"mask prepared by the caller or the model); it takes padding only as the model's 2D attention_mask")
    collected = _active_collector.get() if _active_collector is not None else None
    if kwargs.get("output_attentions") or (collected is not None and "attentions" in collected):
        raise ValueError(f"attn_implementation={name!r} does not return attention weights (output_attentions=True); "
                         f"use attn_implementation='eager' for them")
    for key, what in UNSUPPORTED_KWARGS.items():
        if kwargs.get(key) is not None:
            raise ValueError(f"attn_implementation={name!r} does not support {what} ({key}={kwargs[key]!r:.60}); "
                             f"use attn_implementation='eager' or 'sdpa'")
