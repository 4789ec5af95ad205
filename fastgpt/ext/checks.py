"""What the ext ops accept, checked in Python before a call reaches C++ (which checks again with
TORCH_CHECK, csrc/checks.h). Importing this module loads no library: the ext attention backend asks
supported_dtypes here before deciding whether to build anything.

Each check raises with the argument's name, its value and the limit it broke.
"""

from __future__ import annotations

import torch

from fastgpt.ext import layout

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)  # every device; float16 too on CUDA


def supported_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """The dtypes the ops take on `device`: the CPU kernels have no float16 path, the CUDA ones do."""
    return SUPPORTED_DTYPES + ((torch.float16,) if device.type == "cuda" else ())


def dtypes_text(device: torch.device) -> str:
    return " and ".join(str(d).removeprefix("torch.") for d in supported_dtypes(device)) + f" on {device.type}"


def check_tensor(name: str, t, dims: str, rank: int = 4) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {dims}; got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dims {dims}; got {t.dim()} dims with shape {tuple(t.shape)}")
    if t.dtype not in supported_dtypes(t.device):
        raise ValueError(f"{name} has dtype {t.dtype}; the ext ops support {dtypes_text(t.device)}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on one device")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; all tensors must share one dtype")


def check_packed(name: str, p, T_q, T_k) -> None:
    layout.check_lengths(T_q, T_k)
    check_tensor(name, p, "(B, H, N), a packed causal matrix", rank=3)
    n = layout.packed_size(T_q, T_k)
    if p.shape[-1] != n:
        raise ValueError(f"{name} has {p.shape[-1]} elements per (b, h) but (T_q, T_k) = ({T_q}, {T_k}) needs "
                         f"N = {n} (fastgpt/ext/layout.py)")


def check_kv_heads(H: int, H_kv, kv_name: str, q_name: str) -> None:
    """Grouped-query attention: the H_kv key/value heads must divide the H query heads (query head h
    reads key/value head h // (H / H_kv)); H_kv == H is plain multi-head attention."""
    if isinstance(H_kv, bool) or not isinstance(H_kv, (int, torch.SymInt)):
        raise ValueError(f"{kv_name} must be an int number of key/value heads; got {H_kv!r}")
    if H_kv != H and (H_kv < 1 or H % H_kv != 0):
        raise ValueError(f"{kv_name} has {H_kv} heads and {q_name} has {H}: the key/value heads H_kv must divide "
                         f"the query heads H (query head h reads key/value head h // (H / H_kv))")


def check_matrix_rows(p, x, T_q, T_k, x_dims: str, x_grouped: bool) -> None:
    """p packed (B, H, N) for (T_q, T_k), x (B, H_kv, T, D) with H_kv dividing H where `x_grouped`
    (nn's key/value operand), else (B, H, T, D)."""
    check_packed("p", p, T_q, T_k)
    check_same("x", x, "p", p)
    if x.shape[0] != p.shape[0] or (not x_grouped and x.shape[1] != p.shape[1]):
        raise ValueError(f"x has shape {tuple(x.shape)} but p has shape {tuple(p.shape)}; "
                         f"x must be {x_dims} with p's B{'' if x_grouped else ' and H'}")
    if x_grouped:
        check_kv_heads(p.shape[1], x.shape[1], "x", "p")


def check_attention_options(q, k, v, causal, window, softcap, sinks, alibi_slopes) -> None:
    """The general flash attention's arguments (CPU): q (B, H, T_q, D), k and v (B, H_kv, T_k, D),
    T_k >= T_q when causal; window (left, right) of ints >= -1 (-1 unbounded); softcap >= 0;
    sinks (H,) and alibi_slopes (H,) or (B, H), floating."""
    for name, t, dims in (("q", q, "(B, H, T_q, D)"), ("k", k, "(B, H_kv, T_k, D)"), ("v", v, "(B, H_kv, T_k, D)")):
        check_tensor(name, t, dims)
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    if q.device.type != "cpu":
        raise ValueError(f"q is on {q.device}; the flash kernels with options are CPU only")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or v.shape != k.shape:
        raise ValueError(f"q, k, v have shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; they must be "
                         "(B, H, T_q, D) and (B, H_kv, T_k, D) alike")
    check_kv_heads(q.shape[1], k.shape[1], "k", "q")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    if causal and k.shape[2] < q.shape[2]:
        raise ValueError(f"T_q = {q.shape[2]} > T_k = {k.shape[2]} in a causal call; causal=False takes any T_k")
    if not (isinstance(window, (tuple, list)) and len(window) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= -1 for s in window)):
        raise ValueError(f"window must be (left, right), ints >= 0 or -1 for unbounded; got {window!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0.0 <= softcap < float("inf"):
        raise ValueError(f"softcap must be a finite number >= 0 (0 turns it off); got {softcap!r}")
    B, H = q.shape[0], q.shape[1]
    for name, t, shapes in (("sinks", sinks, ((H,),)), ("alibi_slopes", alibi_slopes, ((H,), (B, H)))):
        if t is not None and not (isinstance(t, torch.Tensor) and tuple(t.shape) in shapes and t.is_floating_point()):
            shown = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating tensor of shape {' or '.join(map(str, shapes))}; got {shown}")


def check_softmax_args(scale, dropout_p, seed, offset) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not float("-inf") < scale < float("inf"):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1); got {dropout_p!r}")
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
            raise ValueError(f"{name} must be an int in [-2^63, 2^63); got {value!r}")


def check_seed_tensor(seed) -> None:
    """The seed of the seeded softmax: a 0-dim int64 tensor, so that torch.compile sees no int."""
    if not isinstance(seed, torch.Tensor) or seed.dim() != 0 or seed.dtype != torch.int64:
        shown = f"a {seed.dtype} tensor of shape {tuple(seed.shape)}" if isinstance(seed, torch.Tensor) else repr(seed)
        raise ValueError(f"seed must be a 0-dim int64 tensor (fastgpt.ext.ops.draw_seed()); got {shown}")


def check_skinny_linear_args(x, weight, bias) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name} is a {t.dtype} tensor on {t.device}; skinny_linear takes float32 CPU tensors")
    if weight.dim() != 2:
        raise ValueError(f"weight must have 2 dims (N, K); got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)} but weight has shape {tuple(weight.shape)}; "
                         f"x must be (..., K) with K = {weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), one per output; got {tuple(bias.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise ValueError("skinny_linear has no backward (an inference kernel): call it under torch.no_grad(), "
                         "or use F.linear where gradients are needed")
