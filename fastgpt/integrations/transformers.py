"""Hugging Face transformers models with their attention run by fastgpt.

    import fastgpt.integrations.transformers as fastgpt_hf

    name = fastgpt_hf.register(backend="auto")          # "fastgpt"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    # or from_pretrained(..., attn_implementation=name), or model.set_attn_implementation(name)

Served exactly as transformers' own eager implementation computes them, padded batches and KV
caches included: causal decoders (GPT-2, Llama); sliding windows (Mistral, Qwen2, alternate
layers of Gemma-2, Gemma-3 and gpt-oss); logit soft-capping (Gemma-2); learnable sinks with their
gradient (gpt-oss); bidirectional encoders (BERT, ModernBERT's local and global layers, ViT) and
cross-attention (a BERT decoder).

transformers 5.x looks up two functions by that name, and calls them in every forward:

  the mask function, once per forward and mask type (create_causal_mask, create_bidirectional_mask,
  their sliding-window variants): it gets the mask's pattern (`mask_function`), the q_length
  queries at positions q_offset.., the kv_length keys from kv_offset and the 2D padding mask, and
  returns what every layer of that type then receives as `attention_mask`:
      None        the plain causal mask with the newest query on the newest key, which
                  fastgpt's attention draws itself (bottom-right), with no mask tensor at all
      MaskSpec    anything else it can describe to fastgpt's attention: causal or not, a window
                  of keys around each query, for a padded batch which keys are real (key_mask),
                  for packed sequences which document each token belongs to (documents)
      (raises)    a pattern it cannot describe, below

  The patterns it recognises are transformers' own functions, composed with and_masks:
      causal_mask_function                  causal
      bidirectional_mask_function           bidirectional
      sliding_window_overlay(W)             keys j > i - W: a window's left side W - 1; with
                                            causal, the sliding window (W - 1, 0) of Mistral,
                                            Qwen2, Gemma-2/-3 and gpt-oss
      sliding_window_bidirectional_overlay(W)
                                            keys |i - j| <= W: window (W, W), ModernBERT's local
                                            layers (W = local_attention // 2)
      packed_sequence_mask_function and remap_positions_for_packed_sequence
                                            packed sequences (position_ids that restart at 0
                                            inside a row, transformers' padding-free training):
                                            each document attends within itself, its window
                                            counted from its own first token

  the attention function, once per layer:
      attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
          query (B, H, T_q, D); key, value (B, H_kv, T_k, D) as the model made them, H_kv dividing
          H (grouped-query: no repeat_kv, the backend reads each shared head), T_k >= T_q over a
          KV cache; dropout and scaling as the model passes them; softcap (Gemma-2) and s_aux
          (gpt-oss's sinks, (H,)) become fastgpt's softcap and sinks
      -> (attn_output (B, T_q, H, D), None)
  An attention_mask of None (a model that makes no mask, such as ViT) is the module's
  own is_causal: causal, or bidirectional over every key, as eager computes it. The window comes
  from the mask, as eager reads it: the sliding_window argument (whose meaning differs between
  models) is not read. A window that hides no key of a call (a decode step over the last W - 1
  cached keys) is left out, so that the call runs the kernels of plain causal attention.

A padded batch is one varlen call (fastgpt.attention.padded_attention): the real tokens of every
row are gathered into the packed layout, attended as one sequence per row, and scattered back; no
padding is computed. Over its real tokens, the mask ∧ padding of a row is the mask of those tokens
alone with the diagonal bottom-right, for left padding, right padding, or (causal or bidirectional,
without a window) gaps anywhere. A plain bidirectional mask (no window) hides keys only: every
query, padded or not, reads the row's real keys, as eager computes it (and as cross-attention
needs, whose queries are another sequence). Outputs at padded queries of causal or windowed masks
are zeros (as transformers' flash_attention_2 leaves them); no real token ever reads them.

Packed sequences (transformers' padding-free path: position_ids restarting inside a row, as
DataCollatorWithFlattening makes them, with or without its cu_seq_lens_q/cu_seq_lens_k
arguments) are one varlen call over the B·T tokens, one sequence per document.

A sliding layer's cache (DynamicSlidingWindowLayer) keeps the last W - 1 keys: the mask function
gets their offset, and the newest query stays on the newest key, so the bottom-right window is
the same keys eager masks.

Refused with a ValueError that names what is unsupported, never approximated:
  - masks a model overlays (or_mask_function, and_mask_function beyond a window: image tokens,
    bidirectional blocks), chunked attention;
  - keys beyond the newest query in a causal or windowed mask (a static, preallocated cache), or
    an attention_mask whose length is not the keys';
  - padding between real tokens with a window (which measures distances the gaps would change),
    or a 4D mask tensor prepared outside the mask function;
  - output_attentions=True (no fastgpt backend returns the attention weights);
  - position biases (T5's position_bias): UNSUPPORTED_KWARGS; cu_seq_lens with a padded batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fastgpt.attention.api import attention as fastgpt_attention
from fastgpt.attention.call import UNBOUNDED  # a window side without a limit
from fastgpt.attention.padding import padded_attention
from fastgpt.attention.registry import get_backend
from fastgpt.attention.varlen import varlen_attention

try:
    import transformers
    import transformers.masking_utils as masking
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function
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
    "position_bias": "a position bias added to the scores",
}



def _code_of(factory_name: str):
    """The code object every mask `masking.<factory_name>(...)` returns shares, or None where this
    transformers has no such factory: a mask function is recognised by its code, not its identity."""
    factory = getattr(masking, factory_name, None)
    if factory is None:
        return None
    return (factory(causal_mask_function) if factory_name == "and_masks" else factory(1)).__code__


_AND_MASK = _code_of("and_masks")
_CAUSAL_WINDOW = _code_of("sliding_window_overlay")  # kv_idx > q_idx - W
_BIDIRECTIONAL_WINDOW = _code_of("sliding_window_bidirectional_overlay")  # |q_idx - kv_idx| <= W
# What the other patterns of masking_utils are, for the refusal (by the factory that made them).
_REFUSED_PATTERNS = {
    "or_masks": "a mask the model overlays with or_mask_function (image tokens, bidirectional blocks)",
    "chunked_overlay": "chunked attention",
    "blockwise_overlay": "blockwise attention (bidirectional blocks)",
}
_PACKED = masking.packed_sequence_mask_function(torch.zeros(1, 1)).__code__  # same document as the key
_REMAPPED = masking.remap_positions_for_packed_sequence(causal_mask_function, torch.zeros(1, 1)).__code__

_REGISTERED: dict[str, str] = {}  # name -> backend, the implementations register() added


def register(backend: str = "auto", name: Optional[str] = None) -> str:
    """Registers fastgpt's attention with transformers; returns the `attn_implementation`.

    backend: the fastgpt backend the model's attention runs ("auto", "naive", "sdpa", ...), chosen
        per call as `fastgpt.attention.attention` chooses it ("auto": one that takes the call's
        options, a window, soft-capping or sinks).
    name: the implementation's name; None means "fastgpt" for "auto", "fastgpt_<backend>" otherwise.
        Registering a name again replaces its backend (models look it up at every forward).
    """
    if backend != "auto":
        get_backend(backend)  # an unknown name fails here, listing the known ones
    if name is None:
        name = "fastgpt" if backend == "auto" else f"fastgpt_{backend}"
    _check_name(name)
    AttentionInterface.register(name, functools.partial(attention, name=name, backend=backend))
    AttentionMaskInterface.register(name, functools.partial(mask_spec, name=name))
    _REGISTERED[name] = backend
    return name


def _check_name(name) -> None:
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


@dataclass(frozen=True)
class MaskSpec:
    """A mask as fastgpt's attention takes it: query i sits at key position T_k - T_q + i (the
    newest query on the newest key) and sees key j iff causal allows (j <= pos) and the window
    (left, right) does (pos - left <= j <= pos + right; UNBOUNDED: no limit; None: no window);
    `key_mask` (B, T_k) bool, True at the real keys of a padded batch, None where every key is real;
    `documents` (B, T) the document of each token of packed sequences (each attends within its own),
    None where each row is one sequence."""

    causal: bool = True
    window: Optional[tuple[int, int]] = None
    key_mask: Optional[torch.Tensor] = field(default=None, compare=False)
    documents: Optional[torch.Tensor] = field(default=None, compare=False)


def mask_spec(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
              mask_function: Callable = causal_mask_function, attention_mask: Optional[torch.Tensor] = None,
              *, name: str = "fastgpt", **kwargs) -> Optional[MaskSpec]:
    """transformers' mask function for `name`: None (plain causal, nothing padded), a MaskSpec, or
    a ValueError. attention_mask is the (B, kv_offset + kv_length) 2D padding mask or None."""
    causal, window = describe_mask_function(mask_function, name)
    documents = _documents(mask_function)
    q_offset = int(q_offset)  # a tensor in static caches
    first_key, last_key, last_query = kv_offset, kv_offset + kv_length - 1, q_offset + q_length - 1
    if (causal or window is not None) and last_query != last_key:
        raise ValueError(
            f"attn_implementation={name!r} needs the newest query to be the newest key; got queries at positions "
            f"{q_offset}..{last_query} and keys at {first_key}..{last_key} (a static, preallocated cache has empty "
            f"slots past the newest token; use the default dynamic cache)")
    key_mask = _key_mask(batch_size, kv_length, kv_offset, attention_mask, window, name)
    if causal and window is None and key_mask is None and documents is None:
        return None
    return MaskSpec(causal, window, key_mask, documents)


def describe_mask_function(mask_function: Callable, name: str = "fastgpt") -> tuple[bool, Optional[tuple[int, int]]]:
    """(causal, window) of one of transformers' mask patterns (and_masks of causal_mask_function,
    bidirectional_mask_function and the sliding-window overlays), window None where it has none;
    a ValueError naming any other pattern."""
    causal, left, right = False, UNBOUNDED, UNBOUNDED
    for part in _and_parts(mask_function):
        code = getattr(part, "__code__", None)
        if part is causal_mask_function:
            causal = True
        elif part is bidirectional_mask_function or code is _PACKED:
            continue  # packed sequences: the documents (_documents), not a pattern of positions
        elif code is _REMAPPED:  # positions counted within each packed document: the pattern inside
            inner_causal, inner_window = describe_mask_function(_closure(part)["mask_function"], name)
            causal = causal or inner_causal
            reach = inner_window or (UNBOUNDED, UNBOUNDED)
            left, right = _narrower(left, reach[0]), _narrower(right, reach[1])
        elif code is not None and (code is _CAUSAL_WINDOW or code is _BIDIRECTIONAL_WINDOW):
            size = _closure(part).get("sliding_window")
            if isinstance(size, bool) or not isinstance(size, int) or size < (1 if code is _CAUSAL_WINDOW else 0):
                raise ValueError(f"attn_implementation={name!r}: sliding_window={size!r} in the mask; it must be an "
                                 f"int >= {1 if code is _CAUSAL_WINDOW else 0}")
            # i - W < j (W - 1 keys to the left); |i - j| <= W (W on each side)
            reach = (size - 1, UNBOUNDED) if code is _CAUSAL_WINDOW else (size, size)
            left, right = _narrower(left, reach[0]), _narrower(right, reach[1])
        else:
            raise ValueError(f"attn_implementation={name!r} does not support {_pattern_name(part)}; use "
                             f"attn_implementation='eager' or 'sdpa' for this model")
    if causal:
        right = 0
    unbounded = (UNBOUNDED, 0 if causal else UNBOUNDED)
    return causal, (None if (left, right) == unbounded else (left, right))


def _documents(mask_function: Callable) -> Optional[torch.Tensor]:
    """The (B, T) document ids of packed sequences the mask keeps apart, or None."""
    for part in _and_parts(mask_function):
        if getattr(part, "__code__", None) is _PACKED:
            return _closure(part)["packed_sequence_mask"]
    return None


def _and_parts(mask_function: Callable) -> list[Callable]:
    """The patterns an and_masks(...) intersects, nested ones flattened; [mask_function] otherwise."""
    if _AND_MASK is None or getattr(mask_function, "__code__", None) is not _AND_MASK:
        return [mask_function]
    return [part for inner in _closure(mask_function)["mask_functions"] for part in _and_parts(inner)]


def _closure(fn: Callable) -> dict:
    """The variables a nested function closes over, by name."""
    cells = fn.__closure__ or ()
    return {var: cell.cell_contents for var, cell in zip(fn.__code__.co_freevars, cells)}


def _narrower(a: int, b: int) -> int:
    """The tighter of two window sides (UNBOUNDED: no limit)."""
    if a == UNBOUNDED:
        return b
    return a if b == UNBOUNDED else min(a, b)


def _pattern_name(mask_function: Callable) -> str:
    qualname = getattr(mask_function, "__qualname__", repr(mask_function))
    factory = qualname.partition(".<locals>")[0]
    return f"{_REFUSED_PATTERNS.get(factory, 'this mask')} ({qualname})"


def _key_mask(batch_size: int, kv_length: int, kv_offset: int, attention_mask: Optional[torch.Tensor],
              window: Optional[tuple[int, int]], name: str) -> Optional[torch.Tensor]:
    """(B, kv_length) bool, True at the real keys, from the 2D padding mask; None where all are real."""
    if attention_mask is None:
        return None
    if attention_mask.shape != (batch_size, kv_offset + kv_length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; attn_implementation={name!r} needs "
            f"(batch, keys) = ({batch_size}, {kv_offset + kv_length}), one column per token of the input and its cache")
    real = attention_mask[:, kv_offset:].bool()  # (B, T_k): True at real tokens
    if bool(real.all()):
        return None
    if window is not None:
        gaps = ((real[:, 1:] & ~real[:, :-1]).sum(1) + real[:, 0].long() > 1).nonzero().flatten()
        if gaps.numel() > 0:
            b = int(gaps[0])
            row = "".join("1" if x else "0" for x in real[b].tolist())
            raise ValueError(
                f"attention_mask row {b} has padding between real tokens ({row}) in a layer with a window of "
                f"{window}; attn_implementation={name!r} takes left or right padding there (a gap would shorten "
                f"the distances the window measures)")
    return real


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
              is_causal: Optional[bool] = None, *, name: str = "fastgpt", backend: str = "auto",
              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention function for `name`: query (B, H, T_q, D), key and value
    (B, H_kv, T_k, D) -> ((B, T_q, H, D), None), through fastgpt.attention.attention."""
    mask = _mask_spec(module, attention_mask, is_causal, name)
    _refuse_unsupported(kwargs, name)
    softcap = kwargs.get("softcap")
    options = dict(causal=mask.causal, window=mask.window, softcap=float(softcap or 0.0), sinks=kwargs.get("s_aux"),
                   dropout_p=dropout, scale=scaling, backend=backend)
    cu_seq_lens = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if mask.documents is not None or cu_seq_lens != (None, None):
        if mask.key_mask is not None:
            raise ValueError(f"attn_implementation={name!r} got packed sequences (cu_seq_lens or position_ids that "
                             "restart) together with a padded attention_mask; pass one or the other")
        return _packed_attention(query, key, value, mask.documents, cu_seq_lens, options, name), None
    if mask.key_mask is None:
        out = fastgpt_attention(query, key, value, **options)
    else:  # a padded batch: one varlen call over the real tokens
        out = padded_attention(query, key, value, _checked_key_mask(mask.key_mask, key, name), **options)
    return out.transpose(1, 2), None  # (B, H, T_q, D) -> (B, T_q, H, D)


def _checked_key_mask(key_mask: torch.Tensor, key: torch.Tensor, name: str) -> torch.Tensor:
    if key_mask.shape != (key.shape[0], key.shape[2]):
        raise ValueError(f"attn_implementation={name!r}: the mask was made for {key_mask.shape[0]} sequences of "
                         f"{key_mask.shape[1]} keys, but this layer has {key.shape[0]} of {key.shape[2]}")
    return key_mask


def _packed_attention(query, key, value, documents: Optional[torch.Tensor], cu_seq_lens: tuple, options: dict,
                      name: str) -> torch.Tensor:
    """Packed documents as one varlen call: query (B, H, T, D), key, value (B, H_kv, T, D) ->
    (B, T, H, D). The documents' edges come from cu_seq_lens_q/_k where the caller gives them
    (over the B·T flattened tokens), else from the mask's document ids."""
    B, H, T, D = query.shape
    if key.shape[2] != T:
        raise ValueError(f"attn_implementation={name!r}: packed sequences need as many keys as queries; got "
                         f"{T} queries over {key.shape[2]} keys")
    if cu_seq_lens == (None, None):
        # a document starts where the id changes, and at every row's start
        flat = documents.to(query.device).reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts[::T] = True
        edges = torch.cat([starts.nonzero().flatten(), flat.new_tensor([B * T])]).to(torch.int32)
        cu_seq_lens = (edges, edges)
    cu_q, cu_k = (cu if cu is not None else cu_seq_lens[1 - i] for i, cu in enumerate(cu_seq_lens))
    packed = [t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (query, key, value)]  # (B·T, heads, D)
    out = varlen_attention(*packed, cu_q, cu_k, **options)  # (B·T, H, D)
    return out.view(B, T, H, D)


def _mask_spec(module, attention_mask, is_causal: Optional[bool], name: str) -> MaskSpec:
    """The layer's mask as a MaskSpec: the mask function's; for None, causal where the module is
    (the mask function's plain causal) and bidirectional where it is not (a model that made no mask,
    which eager reads as no mask at all); a ValueError for a mask tensor made elsewhere."""
    if isinstance(attention_mask, MaskSpec):
        return attention_mask
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return MaskSpec(causal=bool(causal))
    shape = getattr(attention_mask, "shape", None)
    given = f"of shape {tuple(shape)}" if shape is not None else f"of type {type(attention_mask).__name__}"
    raise ValueError(
        f"attn_implementation={name!r} got an attention_mask {given} that its mask function did not make (a 4D "
        f"mask prepared by the caller or the model); it takes padding only as the model's 2D attention_mask")


def _refuse_unsupported(kwargs: dict, name: str) -> None:
    collected = _active_collector.get() if _active_collector is not None else None
    if kwargs.get("output_attentions") or (collected is not None and "attentions" in collected):
        raise ValueError(f"attn_implementation={name!r} does not return attention weights (output_attentions=True); "
                         f"use attn_implementation='eager' for them")
    for key, what in UNSUPPORTED_KWARGS.items():
        if kwargs.get(key) is not None:
            raise ValueError(f"attn_implementation={name!r} does not support {what} ({key}={kwargs[key]!r:.60}); "
                             f"use attn_implementation='eager' or 'sdpa'")
