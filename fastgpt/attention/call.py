"""`AttentionCall`: one attention call, described once.

Validation builds it (`AttentionCall.of`, the one place bad input is refused), and everything that
decides about a call after that takes it: each kernel path's refusal, `backend="auto"`'s order (by
the call's `kind`) and the record of what ran. A backend never sees unvalidated tensors.

    q:    (B, H, T_q, D)          batch, heads, q_len, head_dim
    k, v: (B, H_kv, T_k, D)       kv_heads divides heads; kv_len >= q_len

Query i sits at key position T_k - T_q + i (bottom-right alignment; api.py draws it and writes
down every option's meaning once). The options are fields of this value, not arguments threaded
through every backend; `options` names the ones a call uses, and each kernel path says which it
takes (registry.py refuses the rest by name):

    causal        True: query i sees no key right of its position (needs T_k >= T_q)
    window        (left, right): keys [pos - left, pos + right] only; -1 = unbounded on that side
    softcap       c > 0: each scaled score s becomes c·tanh(s / c)
    sinks         (H,) one learnable logit per query head in every row's softmax denominator
    alibi_slopes  (B, H) float32 (given as (H,) or (B, H)): -slope·|pos - j| added to the scores
    return_lse    the call also returns each row's log-sum-exp (B, H, T_q) float32
    varlen        packed sequences (varlen.py): q (total_q, H, D), k, v (total_k, H_kv, D) and a
                  VarlenLayout; batch, q_len and kv_len are then the number of sequences and the
                  longest query and key lengths, and the lse is (H, total_q)
    paged         a varlen call over a paged KV cache (paged.py): k, v are the pools (num_pages,
                  page_size, H_kv, D) and a PagedLayout says where each sequence's keys are
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CALL_KINDS = ("plain", "dropout", "cached")
# The options beyond plain causal attention, as `AttentionCall.options` names them.
OPTIONS = ("bidirectional", "window", "softcap", "sinks", "alibi", "return_lse", "varlen", "paged")
UNBOUNDED = -1  # a window side without a limit


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class AttentionCall:
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    dropout_p: float
    scale: float
    causal: bool = True
    # (left, right) keys around each query's position, UNBOUNDED = no limit; causal calls have right = 0
    window: tuple[int, int] = (UNBOUNDED, 0)
    softcap: float = 0.0  # 0: off
    # (H,) and (B, H) float32 tensors, or None: not compared, so calls of one shape and options are equal
    sinks: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    alibi_slopes: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    return_lse: bool = False
    # packed sequences (varlen.py), or None: a (B, H, T, D) call
    varlen: Optional["VarlenLayout"] = field(default=None, compare=False, repr=False)
    # a varlen call whose keys and values are in the pages of a KV cache (paged.py), or None
    paged: Optional["PagedLayout"] = field(default=None, compare=False, repr=False)
    # traced by torch.compile: paths whose autograd lives outside torch.library cannot be traced
    compiling: bool = False
    # some input (q, k, v, sinks) will want a gradient: forward-only paths refuse the call
    needs_grad: bool = False

    @classmethod
    def of(cls, q, k, v, dropout_p: float = 0.0, scale: Optional[float] = None, **options) -> "AttentionCall":
        """The call q, k, v make, validated: TypeError/ValueError naming the offending argument,
        its value and the limit. scale=None means D**-0.5; `options` are causal, window, softcap,
        sinks, alibi_slopes and return_lse (module docstring)."""
        validate_inputs(q, k, v, dropout_p, scale, causal=options.get("causal", True))
        B, H, T_q, D = q.shape
        fields = validate_options(q, **options)
        fields["window"] = biting_window(fields["window"], fields["causal"], T_q, k.shape[2])
        return cls(batch=B, heads=H, kv_heads=k.shape[1], q_len=T_q, kv_len=k.shape[2], head_dim=D,
                   dtype=q.dtype, device=q.device, dropout_p=float(dropout_p),
                   scale=float(D**-0.5 if scale is None else scale), compiling=torch.compiler.is_compiling(),
                   needs_grad=needs_grad(q, k, v, fields["sinks"]), **fields)

    @classmethod
    def like(cls, q: torch.Tensor, *, kv_heads: Optional[int] = None, kv_len: Optional[int] = None,
             dropout_p: float = 0.0, scale: Optional[float] = None, **options) -> "AttentionCall":
        """The call q makes over kv_heads key/value heads of kv_len keys (default: q's own),
        without k and v: what a benchmark or a trainer asks the registry about before running."""
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor of shape (B, H, T, D); got {type(q).__name__}")
        B, H, T_q, D = q.shape if q.dim() == 4 else (0, 0, 0, 0)
        kv_heads = H if kv_heads is None else kv_heads
        kv_len = T_q if kv_len is None else kv_len
        meta_q = torch.empty(q.shape, dtype=q.dtype, device="meta")  # validated as shapes: nothing allocated
        meta_k = torch.empty(B, kv_heads, kv_len, D, dtype=q.dtype, device="meta")
        return replace(cls.of(meta_q, meta_k, meta_k, dropout_p, scale, **options), device=q.device)

    @property
    def kind(self) -> str:
        """What `backend="auto"` orders by (CALL_KINDS): "dropout" (dropout_p > 0), "cached" (a causal
        call with fewer queries than keys: the new tokens of a KV-cache step; never a varlen call)
        or "plain"."""
        if self.dropout_p > 0:
            return "dropout"
        if self.varlen is not None:  # many sequences in one call: never the tiny call of one decode step
            return "plain"
        return "cached" if self.causal and self.q_len < self.kv_len else "plain"

    @property
    def options(self) -> frozenset[str]:
        """The options beyond plain causal attention this call uses (OPTIONS' names)."""
        used = {"bidirectional": not self.causal,
                "window": self.window != (UNBOUNDED, 0 if self.causal else UNBOUNDED),
                "softcap": self.softcap > 0, "sinks": self.sinks is not None,
                "alibi": self.alibi_slopes is not None, "return_lse": self.return_lse,
                "varlen": self.varlen is not None, "paged": self.paged is not None}
        return frozenset(name for name, on in used.items() if on)

    @property
    def grouped(self) -> bool:
        """Grouped-query: fewer key/value heads than query heads."""
        return self.kv_heads != self.heads

    def describe(self) -> str:
        """The call in one line, for logs and refusals."""
        gqa = f", H_kv={self.kv_heads}" if self.grouped else ""
        text = (f"{self.device.type} {dtype_name(self.dtype)} B={self.batch} H={self.heads}{gqa} "
                f"T_q={self.q_len} T_k={self.kv_len} D={self.head_dim} dropout_p={self.dropout_p}")
        extras = {"bidirectional": "causal=False", "window": f"window={self.window}", "softcap": f"softcap={self.softcap}",
                  "sinks": "sinks", "alibi": "alibi_slopes", "return_lse": "return_lse",
                  "varlen": f"varlen (total_q={self.varlen.total_q if self.varlen else 0})",
                  "paged": f"paged (page_size={self.paged.page_size if self.paged else 0})"}
        return text + "".join(f" {extras[name]}" for name in OPTIONS if name in self.options)


def forward_only_refusal(call: AttentionCall) -> Optional[str]:
    """Why a path that reads a paged KV cache in place, forward only, cannot run `call`, or None."""
    if call.paged is not None and call.needs_grad:
        return ("it reads a paged KV cache in place, forward only, and an input of this call requires grad "
                "(run it under torch.no_grad(), or name backend='sdpa' or 'naive', which gather the pages)")
    return None


def needs_grad(*tensors) -> bool:
    """Whether autograd will want a gradient of any of these tensors (None entries skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def validate_inputs(q, k, v, dropout_p: float, scale: Optional[float], causal: bool = True) -> None:
    """Raises TypeError/ValueError naming the offending argument, its value and the limit."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, T, D); got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (B, H, T, D); got {t.dim()} dims with shape {_shape(t)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or (causal and k.shape[2] < q.shape[2]):
        raise ValueError(f"k has shape {_shape(k)} but q has shape {_shape(q)}: q (B, H, T_q, D) and "
                         f"k, v (B, H_kv, T_k, D) must share B and D" + (", with T_k >= T_q in a causal call "
                         "(causal=False takes any T_k)" if causal else ""))
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k has {k.shape[1]} heads and q {q.shape[1]}: the key/value heads H_kv must divide the "
                         f"query heads H (each group of H / H_kv query heads shares one key/value head)")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {_shape(v)} but k has shape {_shape(k)}: k and v must share (B, H_kv, T_k, D)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has dtype {q.dtype}: q, k and v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on device {t.device} but q is on {q.device}: q, k and v must share one device")
    if q.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(dtype_name(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"q has dtype {q.dtype}; causal_attention supports {names}")
    B, H, T, D = q.shape
    if min(B, H, T, D) < 1:
        raise ValueError(f"q has shape {_shape(q)}: B, H, T and D must all be at least 1")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1); got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None (meaning D**-0.5); got {scale!r}")


def call_options(call: AttentionCall) -> dict:
    """The call's options as keyword arguments of attention() (naive_attention takes them too)."""
    return dict(causal=call.causal, window=call.window, softcap=call.softcap, sinks=call.sinks,
                alibi_slopes=call.alibi_slopes, return_lse=call.return_lse)


def validate_options(q: torch.Tensor, causal: bool = True, window=None, softcap: float = 0.0, sinks=None,
                     alibi_slopes=None, return_lse: bool = False, *, batch: Optional[int] = None) -> dict:
    """The options as AttentionCall's fields (window normalised, slopes as (B, H) float32), or a
    TypeError/ValueError naming the argument, its value and the limit. `batch`: the number of
    sequences B where q is packed (total_q, H, D); q's first dimension otherwise."""
    B, H = (q.shape[0] if batch is None else batch), q.shape[1]
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0 turns it off); got {softcap!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be True or False; got {return_lse!r}")
    if sinks is not None:
        _check_option_tensor("sinks", sinks, q, ((H,),), f"(H,) = ({H},)")
    if alibi_slopes is not None:
        _check_option_tensor("alibi_slopes", alibi_slopes, q, ((H,), (B, H)), f"(H,) = ({H},) or (B, H) = ({B}, {H})")
        alibi_slopes = alibi_slopes.float().expand(B, H)
    return dict(causal=causal, window=_window(window, causal), softcap=float(softcap), sinks=sinks,
                alibi_slopes=alibi_slopes, return_lse=return_lse)


def biting_window(window: tuple[int, int], causal: bool, T_q: int, T_k: int) -> tuple[int, int]:
    """`window` (normalised) with each side that hides no key of a T_q × T_k call made UNBOUNDED:
    the positions run T_k - T_q .. T_k - 1 over keys 0 .. T_k - 1, so a left side of T_k - 1 and a
    right side of T_q - 1 reach every key. A window that bites nothing is then no option at all, and
    the call runs the kernels of the plain call (a decode step over a cache shorter than the window)."""
    left, right = window
    left = UNBOUNDED if left >= T_k - 1 else left
    if not causal and right >= T_q - 1:
        right = UNBOUNDED
    return (left, right)


def _window(window, causal: bool) -> tuple[int, int]:
    """(left, right) with UNBOUNDED for None or -1; a causal call's right side is 0."""
    if window is None:
        return (UNBOUNDED, 0 if causal else UNBOUNDED)
    if not (isinstance(window, (tuple, list)) and len(window) == 2):
        raise ValueError(f"window must be (left, right), each an int >= 0 or -1/None for unbounded; got {window!r}")
    left, right = (UNBOUNDED if side is None else side for side in window)
    for name, side in (("left", left), ("right", right)):
        if isinstance(side, bool) or not isinstance(side, int) or side < UNBOUNDED:
            raise ValueError(f"window {name} must be an int >= 0, or -1/None for unbounded; got {side!r}")
    if causal and right not in (0, UNBOUNDED):
        raise ValueError(f"window right={right} with causal=True: a causal call sees no key right of its query; "
                         "pass right=0 (or -1), or causal=False")
    return (left, 0 if causal else right)


def _check_option_tensor(name: str, t, q: torch.Tensor, shapes: tuple, shapes_text: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shapes_text}; got {type(t).__name__}")
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name} has shape {_shape(t)}; it must be {shapes_text}")
    if not t.is_floating_point():
        raise ValueError(f"{name} has dtype {t.dtype}; it must be a floating-point tensor")
    if t.device != q.device and q.device.type != "meta":  # meta: AttentionCall.like's shapes-only probe
        raise ValueError(f"{name} is on device {t.device} but q is on {q.device}: they must share one device")
