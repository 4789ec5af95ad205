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
                  of keys around each query, and for a padded batch the run of real keys of
                  each sequence (KeyRanges)
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

A padded batch is computed exactly when each sequence's real tokens are one run of positions (left
padding, as batched generation uses; right padding, as training batches do). Over a run
[start, end) of keys, the mask ∧ padding is the mask of the slice with its diagonal bottom-right,
so each distinct run is one attention call on its slice: its queries over its keys. A plain
bidirectional mask (no window) hides keys only: every query, padded or not, reads the run's real
keys, as eager computes it (and as cross-attention needs, whose queries are another sequence). The
kernels know no per-sequence offset, so a batch of B different runs costs B calls where an
unpadded batch costs one. Outputs at padded queries of causal or windowed masks are zeros (as
transformers' flash_attention_2 leaves them); no real token ever reads them.

A sliding layer's cache (DynamicSlidingWindowLayer) keeps the last W - 1 keys: the mask function
gets their offset, and the newest query stays on the newest key, so the bottom-right window is
the same keys eager masks.

Refused with a ValueError that names what is unsupported, never approximated:
  - masks a model overlays (or_mask_function, and_mask_function beyond a window: image tokens,
    bidirectional blocks), chunked attention, packed sequences (position_ids restarting in a row);
  - keys beyond the newest query in a causal or windowed mask (a static, preallocated cache), or
    an attention_mask whose length is not the keys';
  - padding between real tokens (a row of the mask that is not one run of ones), or a 4D mask
    tensor prepared outside the mask function;
  - output_attentions=True (no fastgpt backend returns the attention weights);
  - position biases (T5's position_bias), packed inputs (cu_seq_lens): UNSUPPORTED_KWARGS.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastgpt.attention.api import attention as fastgpt_attention
from fastgpt.attention.call import UNBOUNDED  # a window side without a limit
from fastgpt.attention.registry import get_backend

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
    "cu_seq_lens_q": "packed sequences (cu_seq_lens)",
    "cu_seq_lens_k": "packed sequences (cu_seq_lens)",
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
    "packed_sequence_mask_function": "packed sequences (position_ids restarting inside a row)",
    "remap_positions_for_packed_sequence": "packed sequences (position_ids restarting inside a row)",
}

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
class KeyRanges:
    """The padding of a batch: sequence b's real tokens are keys starts[b] .. ends[b] - 1 of
    kv_length (start == end: none)."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    kv_length: int

    def groups(self) -> dict[tuple[int, int], list[int]]:
        """{(start, end): the sequences with that run}: one attention call each."""
        found: dict[tuple[int, int], list[int]] = {}
        for b, run in enumerate(zip(self.starts, self.ends)):
            found.setdefault(run, []).append(b)
        return found


@dataclass(frozen=True)
class MaskSpec:
    """A mask as fastgpt's attention takes it: query i sits at key position T_k - T_q + i (the
    newest query on the newest key) and sees key j iff causal allows (j <= pos) and the window
    (left, right) does (pos - left <= j <= pos + right; UNBOUNDED: no limit; None: no window);
    `keys` the padded batch's runs of real keys, None where every key is real."""

    causal: bool = True
    window: Optional[tuple[int, int]] = None
    keys: Optional[KeyRanges] = None


def mask_spec(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
              mask_function: Callable = causal_mask_function, attention_mask: Optional[torch.Tensor] = None,
              *, name: str = "fastgpt", **kwargs) -> Optional[MaskSpec]:
    """transformers' mask function for `name`: None (plain causal, nothing padded), a MaskSpec, or
    a ValueError. attention_mask is the (B, kv_offset + kv_length) 2D padding mask or None."""
    causal, window = describe_mask_function(mask_function, name)
    q_offset = int(q_offset)  # a tensor in static caches
    first_key, last_key, last_query = kv_offset, kv_offset + kv_length - 1, q_offset + q_length - 1
    if (causal or window is not None) and last_query != last_key:
        raise ValueError(
            f"attn_implementation={name!r} needs the newest query to be the newest key; got queries at positions "
            f"{q_offset}..{last_query} and keys at {first_key}..{last_key} (a static, preallocated cache has empty "
            f"slots past the newest token; use the default dynamic cache)")
    keys = _key_ranges(batch_size, kv_length, kv_offset, attention_mask, name)
    if causal and window is None and keys is None:
        return None
    return MaskSpec(causal, window, keys)


def describe_mask_function(mask_function: Callable, name: str = "fastgpt") -> tuple[bool, Optional[tuple[int, int]]]:
    """(causal, window) of one of transformers' mask patterns (and_masks of causal_mask_function,
    bidirectional_mask_function and the sliding-window overlays), window None where it has none;
    a ValueError naming any other pattern."""
    causal, left, right = False, UNBOUNDED, UNBOUNDED
    for part in _and_parts(mask_function):
        code = getattr(part, "__code__", None)
        if part is causal_mask_function:
            causal = True
        elif part is bidirectional_mask_function:
            continue
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


def _key_ranges(batch_size: int, kv_length: int, kv_offset: int, attention_mask: Optional[torch.Tensor],
                name: str) -> Optional[KeyRanges]:
    """The run of real keys of each sequence, from the 2D padding mask; None where all are real."""
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
    (B, H_kv, T_k, D) -> ((B, T_q, H, D), None), through fastgpt.attention.attention."""
    mask = _mask_spec(module, attention_mask, is_causal, name)
    _refuse_unsupported(kwargs, name)
    softcap = kwargs.get("softcap")
    attend = functools.partial(_attend, causal=mask.causal, window=mask.window, softcap=float(softcap or 0.0),
                               sinks=kwargs.get("s_aux"), dropout_p=dropout, scale=scaling, backend=backend)
    if mask.keys is None:
        out = attend(query, key, value)
    else:
        out = _padded_attention(query, key, value, mask, attend, name)
    return out.transpose(1, 2), None  # (B, H, T_q, D) -> (B, T_q, H, D)


def _attend(q, k, v, *, causal: bool, window: Optional[tuple[int, int]], **options) -> torch.Tensor:
    """One fastgpt attention call, q (B, H, T_q, D) over k, v (B, H_kv, T_k, D) -> (B, H, T_q, D);
    a window that hides no key of the call is no option there (AttentionCall.of drops it)."""
    return fastgpt_attention(q, k, v, causal=causal, window=window, **options)


def _padded_attention(query, key, value, mask: MaskSpec, attend: Callable, name: str) -> torch.Tensor:
    """One attention call per distinct run of real keys, on its slice -> (B, H, T_q, D)."""
    B, H, T_q, D = query.shape
    T_k = key.shape[2]
    ranges = mask.keys
    if ranges.kv_length != T_k or len(ranges.starts) != B:
        raise ValueError(f"attn_implementation={name!r}: the mask was made for {len(ranges.starts)} sequences of "
                         f"{ranges.kv_length} keys, but this layer has {B} of {T_k}")
    every_query = not mask.causal and mask.window is None  # a mask on the keys only
    first_query = T_k - T_q  # the queries are the last T_q positions
    out = query.new_zeros(B, H, T_q, D)  # padded queries stay zero unless every query reads the run
    for (start, end), rows in ranges.groups().items():
        q_from = first_query if every_query else max(start, first_query)  # a query before the run is padding
        q_to = T_k if every_query else end
        if end <= start or q_to <= q_from:
            continue
        index = torch.tensor(rows, device=query.device)
        q_rows = slice(q_from - first_query, q_to - first_query)  # that run's queries ...
        y = attend(query[index, :, q_rows], key[index, :, start:end], value[index, :, start:end])  # ... over its keys
        out[index, :, q_rows] = y
    return out


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
