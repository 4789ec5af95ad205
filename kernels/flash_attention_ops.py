"""Host side of the Triton attention: launchers, one autograd-aware torch.library op, the dropout seed.

    flash_attention*.py (beside this)   jit kernels (forward, backward, dropout mask)
    launch_forward / launch_backward    allocate outputs, pick configs, launch
    fastgpt::flash_attention_fwd / _bwd torch.library ops; autograd registered on the forward
    triton_attention                    the registry's backend function
    spilling_configs                    the configs the autotuner dropped here because they spill

This module imports triton; fastgpt.attention.triton_backend imports it only on first use.

Shapes: q, out, dout, dq (B, H, T_q, D); k, v, dk, dv (B, H_kv, T_k, D), T_k >= T_q when causal,
the diagonal bottom-right; H_kv divides H (grouped-query attention: query head h reads key/value head
h // (H / H_kv) inside the kernels, and dk, dv sum over each group there). Layouts: q, k, v and dout may have any strides (strides go to the kernels,
nothing is copied). out, dq, dk, dv are (B, H, T, D) views of (B, T, H, D) memory, the layout the
GPT's head merge `y.transpose(1, 2).reshape(B, T, C)` reads without a copy. lse is (B, H, T_q)
fp32 contiguous. A forward with T_q <= DECODE_MAX_QUERIES (decoding) launches the "fwd_decode"
configs.

The options (fastgpt/attention/api.py) reach the kernels as compile-time switches (BANDED: not
causal or a window; SOFTCAP, ALIBI, SINKS) and runtime values: the window's sides as ints (an
unbounded side as T_q + T_k, further than any key), scale / softcap and softcap·log2(e), the
slopes (B, H) fp32 by their strides, the sinks (H,). A plain causal call sets no switch and
launches the kernels it always did. Packed sequences (varlen) reach the op as (1, H, total, D)
views with cu_seqlens and the longest lengths, and the kernels' VARLEN switch: one launch of each
kernel for every sequence; lse and Δ are then (1, H, total_q). The sinks' gradient needs no
kernel: from the forward's lse and the backward's Δ, dsinks_h = -Σ_{b,i} exp(sink_h - lse_bhi)·Δ_bhi.
A paged KV cache (PAGED, forward only) reaches the forward as a packed call whose k, v are the pools
(num_pages, page_size, H_kv, D), passed as (1, H_kv, num_pages · page_size, D) views, with the
block table (B, max_pages) int32 and the page size.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
from torch.library import wrap_triton
from triton.runtime.errors import OutOfResources

from fastgpt.kernels import flash_attention_configs as cfg
from fastgpt.kernels.flash_attention import _attn_fwd, _dropout_mask
from fastgpt.kernels.flash_attention_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess

LOG2_E = 1.4426950408889634  # 1/ln(2): exp(x) = exp2(x·log2(e))
LN_2 = 0.6931471805599453  # ln(2): log(x) = log2(x)·ln(2)
INTERPRETING = triton.knobs.runtime.interpret  # fixed when the kernels were decorated

_KERNELS = {"fwd": _attn_fwd, "fwd_decode": _attn_fwd, "bwd_dkdv": _attn_bwd_dkdv, "bwd_dq": _attn_bwd_dq}
log = logging.getLogger(__name__)


def _strides(t: torch.Tensor, packed: bool = False) -> tuple[int, int, int, int]:
    """t's strides; `packed`: t is a (1, H, total, D) view of packed sequences, whose z stride the
    kernels must not apply (their z is then the sequence, which moves the pointers by rows)."""
    return (0, *t.stride()[1:]) if packed else tuple(t.stride())


def _empty_bthd(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) like x, laid out as (B, T, H, D) in memory."""
    B, H, T, D = x.shape
    return torch.empty((B, T, H, D), device=x.device, dtype=x.dtype).transpose(1, 2)


def check_offsets(*tensors: torch.Tensor, rows: Optional[int] = None) -> None:
    """In-slice offsets are 32-bit in the kernels; (b, h) slice offsets, and a packed sequence's
    first row, are 64-bit. `rows`: the longest packed sequence of (1, H, total, D) tensors."""
    for t in tensors:
        _, _, T, D = t.shape
        T = T if rows is None else rows
        span = (max(T, 1) - 1) * t.stride(2) + (D - 1) * t.stride(3)
        if span >= 2**31:
            raise ValueError(f"one (b, h) slice spans {span} elements with strides {t.stride()}; the Triton "
                             f"attention kernels address at most 2**31 - 1 within a slice")


# (kernel, capability, head_dim_pad, fp32, grouped, seq_bucket, banded) -> its autotuner, made on first use
_TUNERS: dict[tuple, triton.runtime.Autotuner] = {}
# The options' compile-time switches: each combination is a variant of its own, tuned on its own
# (the backward kernels take no SINKS: the sinks live in the forward's lse). VARLEN: packed sequences.
OPTION_SWITCHES = ("BANDED", "SOFTCAP", "ALIBI", "SINKS", "VARLEN", "PAGED")


def _tuned(kernel: str, capability: tuple[int, int], head_dim_pad: int, fp32: bool, grouped: bool, seq_bucket: int,
           banded: bool = False):
    """The autotuned launcher of `kernel` for one GPU architecture, head dim and sequence-length
    bucket (the next power of two of T_k). One autotuner per bucket, not a tuning run per T: sampling
    grows T_k one token at a time. The autotuners share the jit function, hence its compiled kernels."""
    key = (kernel, capability, head_dim_pad, fp32, grouped, seq_bucket, banded)
    if key not in _TUNERS:
        candidates = cfg.configs(kernel, capability, head_dim_pad, fp32, grouped, banded)
        configs = [triton.Config(c.meta, num_warps=c.num_warps, num_stages=c.num_stages) for c in candidates]
        _TUNERS[key] = triton.autotune(configs=configs, key=["HEAD_DIM", "DROPOUT", "DOT_PRECISION", *OPTION_SWITCHES],
                                       prune_configs_by={"early_config_prune": _spill_pruner(kernel, capability)},
                                       )(_KERNELS[kernel])
    return _TUNERS[key]


# One record per config that spilled where it was compiled (dropped, or kept because every config
# of its call spilled), in the order the calls came: what spilling_configs() reports.
_SPILLING: list[dict] = []


def spilling_configs() -> list[dict]:
    """The configs whose compiled kernel spilled registers on this GPU, one per (call, config):
    {"kernel": "fwd", "call": "D=96 dropout=True float16 sm_90", "config": "M64/N64/w4/s3",
    "local_bytes": 48 (None: over the block's shared memory), "dropped": True}; "dropped" is False
    for the least-spilling config of a call whose every config spilled, which runs."""
    return [dict(r) for r in _SPILLING]


def _compilable(named_args: dict) -> bool:
    """Whether the call's tensors are real CUDA tensors, whose kernels can be compiled and loaded:
    not the fake tensors torch.compile traces with."""
    tensors = [a for a in named_args.values() if isinstance(a, torch.Tensor)]
    return bool(tensors) and all(type(t) is torch.Tensor and t.is_cuda for t in tensors)


def _local_bytes(fn, args: dict, config: triton.Config) -> Optional[int]:
    """The local memory (spilled registers) of `fn` compiled for this call and config, as the
    driver reports it when it loads the binary, before any launch; None if it does not fit (too much
    shared memory). The compiled kernel stays in fn's cache for the launches that follow."""
    compiled = fn.warmup(**args, **config.all_kwargs(), grid=(1,))
    try:
        compiled._init_handles()
    except OutOfResources:
        return None
    return 4 * compiled.n_spills  # the driver's local size, which Triton keeps in 4-byte words


def _spill_pruner(kernel: str, capability: tuple[int, int]):
    """The autotuner's early_config_prune for `kernel`: run once per tuning key (head dim, dropout,
    dot precision, dtypes) before any config is timed, it keeps the configs that spill nothing here
    (flash_attention_configs.drop_spilling), logs and records the others."""

    def prune(configs, named_args, **kwargs):
        if not _compilable(named_args):
            return configs
        args = {**named_args, **{k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}}
        call = (f"D={args.get('HEAD_DIM')} dropout={args.get('DROPOUT')} "
                + "".join(f"{name.lower()} " for name in OPTION_SWITCHES if args.get(name) is True) +
                f"{str(args['Q'].dtype).removeprefix('torch.') if 'Q' in args else '?'} "
                f"sm_{capability[0]}{capability[1]}")
        try:
            kept, measured = cfg.drop_spilling(configs, lambda c: _local_bytes(_KERNELS[kernel], args, c))
        except Exception as e:  # noqa: BLE001  a triton whose warmup API differs: time them all, and say so
            log.warning(f"triton {kernel} {call}: could not measure the configs' spills before tuning "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); all "
                        f"{len(configs)} are timed")
            return configs
        spilled = [(config, local) for config, local in measured if local != 0]
        for config, local in spilled:
            _SPILLING.append({"kernel": kernel, "call": call, "config": _config_name(config), "local_bytes": local,
                              "dropped": config not in kept})
        if spilled and len(kept) == len(configs) - len(spilled):
            names = ", ".join(f"{_config_name(c)} ({_spill_text(local)})" for c, local in spilled)
            log.info(f"triton {kernel} {call}: dropped {names}, which spills here; {len(kept)} config(s) left")
        elif spilled:
            log.warning(f"triton {kernel} {call}: every config spills here ("
                        f"{', '.join(f'{_config_name(c)} {_spill_text(local)}' for c, local in spilled)}); "
                        f"running the least-spilling, {_config_name(kept[0])}: slower than it should be")
        return kept

    return prune


def _config_name(config: triton.Config) -> str:
    blocks = config.kwargs
    return str(cfg.KernelConfig(blocks["BLOCK_M"], blocks["BLOCK_N"], config.num_warps, config.num_stages))


def _spill_text(local: Optional[int]) -> str:
    return "over the shared memory" if local is None else f"{local} bytes of local memory"


def tuned_configs() -> dict[str, str]:
    """The config each autotuner picked so far in this process, for reports:
    {"fwd D=64 dropout=False T<=4096 fp32=False": "BLOCK_M: 128, BLOCK_N: 64, num_warps: 8, ..."};
    grouped-query calls' picks are marked " grouped"."""
    picks = {}
    for (kernel, _, _, fp32, grouped, seq_bucket, _), tuner in _TUNERS.items():
        for tuning_key, config in tuner.cache.items():
            head_dim, dropout = tuning_key[0], tuning_key[1]
            switches = [name for name in OPTION_SWITCHES if name in _KERNELS[kernel].arg_names]
            options = "".join(f" {name.lower()}" for name, on in zip(switches, tuning_key[3:]) if on is True)
            label = (f"{kernel} D={head_dim} dropout={dropout} T<={seq_bucket} fp32={fp32}"
                     + (" grouped" if grouped else "") + options)
            picks[label] = str(config)
    return picks


def _launcher(kernel: str, q: torch.Tensor, k: torch.Tensor, head_dim_pad: int, banded: bool = False,
              keys: Optional[int] = None):
    """(launchable kernel, extra launch kwargs): a fixed config in the interpreter, autotuning on a GPU
    (over the banded lists for a call with a band). `keys`: the longest sequence's keys (T_k unless
    the sequences are packed), which picks the autotuner's length bucket."""
    if INTERPRETING or q.device.type != "cuda":
        c = cfg.INTERPRETER_CONFIGS[kernel]
        return wrap_triton(_KERNELS[kernel]), {**c.meta, "num_warps": c.num_warps, "num_stages": c.num_stages}
    capability = torch.cuda.get_device_capability(q.device)
    seq_bucket = triton.next_power_of_2(k.shape[2] if keys is None else keys)
    fp32, grouped = q.dtype == torch.float32, k.shape[1] < q.shape[1]
    return wrap_triton(_tuned(kernel, capability, head_dim_pad, fp32, grouped, seq_bucket, banded)), {}


def _head_dims(D: int) -> dict:
    return {"HEAD_DIM": D, "HEAD_DIM_PAD": cfg.padded_head_dim(D)}


def option_args(T_q: int, T_k: int, scale: float, causal: bool, window_left: int, window_right: int,
                softcap: float, alibi_slopes: Optional[torch.Tensor]) -> tuple[tuple, dict]:
    """(runtime args, switches) the kernels take for the options: (Alibi, stride_az, stride_ah,
    window_left, window_right, softcap_scale, softcap_log2) and {BANDED, SOFTCAP, ALIBI}. window
    sides are -1 when unbounded; a causal call's right side is 0."""
    unbounded = T_q + T_k  # further than any key from any query; a wider side is clamped to it (32-bit)
    left = unbounded if window_left < 0 else min(window_left, unbounded)
    right = 0 if causal else (unbounded if window_right < 0 else min(window_right, unbounded))
    strides = tuple(alibi_slopes.stride()) if alibi_slopes is not None else (0, 0)
    softcap_args = (scale / softcap, softcap * LOG2_E) if softcap > 0 else (0.0, 0.0)
    switches = {"BANDED": not causal or window_left >= 0, "SOFTCAP": softcap > 0, "ALIBI": alibi_slopes is not None}
    return (alibi_slopes, *strides, left, right, *softcap_args), switches


def _sequences(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor], max_q: int,
               max_k: int) -> tuple[int, int, int]:
    """(B, longest T_q, longest T_k): what the grid covers. Packed (cu_seqlens_q given): q, k are
    (1, H, total, D) and B is the number of sequences; else q's batch and lengths."""
    if cu_seqlens_q is None:
        return q.shape[0], q.shape[2], k.shape[2]
    return cu_seqlens_q.numel() - 1, max_q, max_k


def launch_forward(q, k, v, seed: Optional[torch.Tensor], dropout_p: float, scale: float, causal: bool = True,
                   window_left: int = -1, window_right: int = 0, softcap: float = 0.0,
                   sinks: Optional[torch.Tensor] = None, alibi_slopes: Optional[torch.Tensor] = None,
                   cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                   max_q: int = 0, max_k: int = 0, block_table: Optional[torch.Tensor] = None, page_size: int = 0):
    """q (B, H, T_q, D), k, v (B, H_kv, T_k, D) -> out (B, H, T_q, D), lse (B, H, T_q) fp32 (base-2
    log-sum-exp, -inf for a row that sees no key); sinks (H,) contiguous, alibi_slopes (B, H) fp32.
    Packed sequences: B = 1, T_q and T_k the totals, cu_seqlens_q/_k (B_seq + 1,) int32 and the
    longest lengths max_q, max_k; alibi_slopes (B_seq, H). Paged (block_table (B_seq, max_pages)
    int32 contiguous): k, v the pools as (1, H_kv, num_pages · page_size, D) views."""
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    packed = cu_seqlens_q is not None
    batch, longest_q, longest_k = _sequences(q, k, cu_seqlens_q, max_q, max_k)
    out = _empty_bthd(q)
    lse = torch.empty((B, H, T_q), device=q.device, dtype=torch.float32)
    dims = _head_dims(D)
    options, switches = option_args(T_q, T_k, scale, causal, window_left, window_right, softcap, alibi_slopes)
    kernel, launch = _launcher("fwd_decode" if longest_q <= cfg.DECODE_MAX_QUERIES else "fwd", q, k,
                               dims["HEAD_DIM_PAD"], switches["BANDED"], longest_k)
    dropout = dropout_p > 0.0
    kernel[lambda meta: (triton.cdiv(longest_q, meta["BLOCK_M"]), H, batch)](
        q, k, v, out, lse, seed,
        *_strides(q, packed), *_strides(k, packed), *_strides(v, packed), *_strides(out, packed),
        H, H // H_kv, T_q, T_k, scale * LOG2_E, dropout_p, 1.0 / (1.0 - dropout_p), cu_seqlens_q, cu_seqlens_k,
        sinks, *options, block_table, 0 if block_table is None else block_table.stride(0), page_size,
        **dims, DROPOUT=dropout, DOT_PRECISION=cfg.dot_precision(q.dtype == torch.float32), **switches,
        SINKS=sinks is not None, VARLEN=packed, PAGED=block_table is not None, **launch,
    )
    return out, lse


def launch_backward(dout, q, k, v, out, lse, seed: Optional[torch.Tensor], dropout_p: float, scale: float,
                    causal: bool = True, window_left: int = -1, window_right: int = 0, softcap: float = 0.0,
                    alibi_slopes: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                    cu_seqlens_k: Optional[torch.Tensor] = None, max_q: int = 0, max_k: int = 0):
    """-> dq (B, H, T_q, D), dk, dv (B, H_kv, T_k, D), in the dtype of q, and Δ = rowsum(dO∘out)
    (B, H, T_q) fp32. Packed sequences as launch_forward takes them."""
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    packed = cu_seqlens_q is not None
    batch, longest_q, longest_k = _sequences(q, k, cu_seqlens_q, max_q, max_k)
    check_offsets(dout, rows=longest_q if packed else None)
    dims = _head_dims(D)
    delta = torch.empty_like(lse)
    wrap_triton(_attn_bwd_preprocess)[(triton.cdiv(longest_q, cfg.PREPROCESS_BLOCK_M), H, batch)](
        out, dout, delta, *_strides(out, packed), *_strides(dout, packed), H, T_q, cu_seqlens_q, **dims,
        BLOCK_M=cfg.PREPROCESS_BLOCK_M, VARLEN=packed,
    )
    dq, dk, dv = _empty_bthd(q), _empty_bthd(k), _empty_bthd(k)
    options, switches = option_args(T_q, T_k, scale, causal, window_left, window_right, softcap, alibi_slopes)
    common = dict(**dims, DROPOUT=dropout_p > 0.0, DOT_PRECISION=cfg.dot_precision(q.dtype == torch.float32),
                  **switches, VARLEN=packed)
    scalars = (H, H // H_kv, T_q, T_k, scale, scale * LOG2_E, dropout_p, 1.0 / (1.0 - dropout_p), cu_seqlens_q,
               cu_seqlens_k, *options)
    strides = [_strides(t, packed) for t in (q, k, v, dout)]

    kernel, launch = _launcher("bwd_dkdv", q, k, dims["HEAD_DIM_PAD"], switches["BANDED"], longest_k)
    kernel[lambda meta: (triton.cdiv(longest_k, meta["BLOCK_N"]), H_kv, batch)](  # one program per key/value head
        q, k, v, dout, dk, dv, lse, delta, seed, *strides[0], *strides[1], *strides[2], *strides[3],
        *_strides(dk, packed), *scalars, **common, **launch,
    )
    kernel, launch = _launcher("bwd_dq", q, k, dims["HEAD_DIM_PAD"], switches["BANDED"], longest_k)
    kernel[lambda meta: (triton.cdiv(longest_q, meta["BLOCK_M"]), H, batch)](
        q, k, v, dout, dq, lse, delta, seed, *strides[0], *strides[1], *strides[2], *strides[3],
        *_strides(dq, packed), *scalars, **common, **launch,
    )
    return dq, dk, dv, delta


def sinks_grad(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """dsinks (H,) in sinks' dtype: -Σ_{b,i} p_sink·Δ, p_sink = exp(sink - lse) the weight the sink
    took in each row (lse (B, H, T_q) base 2, as the kernels keep it; Δ (B, H, T_q))."""
    p_sink = torch.exp2(sinks.float()[None, :, None] * LOG2_E - lse)
    return -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)


# --- the torch.library ops -------------------------------------------------------------------
# On a GPU the ops are `triton_op`s: torch.compile sees one op and, with inductor, the kernels
# inside it. Under the interpreter `wrap_triton` hands back the plain interpreted kernel, which
# tracing cannot capture: a traced triton_op would run its kernels on fake tensors at trace time
# and leave them out of the graph. There the same functions are registered as opaque `custom_op`s
# with a shape-only fake, which torch.compile also sees as one op.

def _fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: Optional[torch.Tensor],
              dropout_p: float, scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
              sinks: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
              cu_seqlens_k: Optional[torch.Tensor], max_q: int, max_k: int, block_table: Optional[torch.Tensor],
              page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_forward(q, k, v, seed, dropout_p, scale, causal, window_left, window_right, softcap, sinks,
                          alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_q, max_k, block_table, page_size)


def _bwd_impl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float, scale: float, causal: bool,
              window_left: int, window_right: int, softcap: float, sinks: Optional[torch.Tensor],
              alibi_slopes: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
              cu_seqlens_k: Optional[torch.Tensor], max_q: int,
              max_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv and dsinks (H,), or an empty dsinks without sinks (an op returns tensors only)."""
    dq, dk, dv, delta = launch_backward(dout, q, k, v, out, lse, seed, dropout_p, scale, causal, window_left,
                                        window_right, softcap, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_q, max_k)
    dsinks = q.new_empty(0) if sinks is None else sinks_grad(sinks, lse, delta)
    return dq, dk, dv, dsinks


if INTERPRETING:
    flash_attention_fwd = torch.library.custom_op("fastgpt::flash_attention_fwd", _fwd_impl, mutates_args=())
    flash_attention_bwd = torch.library.custom_op("fastgpt::flash_attention_bwd", _bwd_impl, mutates_args=())

    @flash_attention_fwd.register_fake
    def _(q, k, v, seed, dropout_p, scale, causal, window_left, window_right, softcap, sinks, alibi_slopes,
          cu_seqlens_q, cu_seqlens_k, max_q, max_k, block_table, page_size):
        B, H, T_q, D = q.shape
        return _empty_bthd(q), q.new_empty((B, H, T_q), dtype=torch.float32)

    @flash_attention_bwd.register_fake
    def _(dout, q, k, v, out, lse, seed, dropout_p, scale, causal, window_left, window_right, softcap, sinks,
          alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_q, max_k):
        dsinks = q.new_empty(0) if sinks is None else torch.empty_like(sinks)
        return _empty_bthd(q), _empty_bthd(k), _empty_bthd(k), dsinks
else:
    flash_attention_fwd = torch.library.triton_op("fastgpt::flash_attention_fwd", _fwd_impl, mutates_args=())
    flash_attention_bwd = torch.library.triton_op("fastgpt::flash_attention_bwd", _bwd_impl, mutates_args=())


def _setup_context(ctx, inputs, output):
    (q, k, v, seed, dropout_p, scale, causal, window_left, window_right, softcap, sinks, alibi_slopes,
     cu_seqlens_q, cu_seqlens_k, max_q, max_k, block_table, _) = inputs
    if block_table is not None:  # the paths that run a paged call refuse one that wants gradients
        raise RuntimeError("the Triton kernels read a paged KV cache forward only: no input of a paged call may "
                           "require grad")
    out, lse = output
    ctx.mark_non_differentiable(lse)
    # O(B·H·T·D) saved: the inputs (views, no copies), out, lse, an 8-byte seed, the options'
    # (H,) and (B, H) tensors and the packed sequences' (B + 1,) offsets; no T×T tensor
    ctx.save_for_backward(q, k, v, out, lse, seed, sinks, alibi_slopes, cu_seqlens_q, cu_seqlens_k)
    ctx.dropout_p, ctx.scale, ctx.causal, ctx.softcap = dropout_p, scale, causal, softcap
    ctx.window, ctx.longest = (window_left, window_right), (max_q, max_k)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, seed, sinks, alibi_slopes, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv, dsinks = flash_attention_bwd(dout, q, k, v, out, lse, seed, ctx.dropout_p, ctx.scale, ctx.causal,
                                             *ctx.window, ctx.softcap, sinks, alibi_slopes, cu_seqlens_q,
                                             cu_seqlens_k, *ctx.longest)
    return (dq, dk, dv, None, None, None, None, None, None, None, None if sinks is None else dsinks, None,
            None, None, None, None, None, None)


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- dropout: the seed and the keep mask ---------------------------------------------------
def draw_seed(device: torch.device) -> torch.Tensor:
    """A fresh Philox key from torch's default generator for `device`, kept on the device (no sync):
    torch.manual_seed(s) makes every dropout mask of a run reproducible."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def dropout_keep_mask(seed: torch.Tensor, shape, dropout_p: float, T_k: Optional[int] = None,
                      cu_seqlens_q: Optional[torch.Tensor] = None,
                      cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (B, H, T_q, T_k) bool keep-mask of a call with this seed, q.shape (B, H, T_q, D) and T_k
    keys (default T_q), from the same Philox counters the kernels use:
    naive_attention(..., keep_mask=mask) is that call's exact reference. Packed sequences
    (cu_seqlens_q/_k (B + 1,) int32; T_q, T_k the longest): sequence b's mask in
    keep[b, :, :T_q[b], :T_k[b]], the rest False (not drawn)."""
    B, H, T_q = shape[0], shape[1], shape[2]
    T_k = T_q if T_k is None else T_k
    packed = cu_seqlens_q is not None
    keep = (torch.zeros if packed else torch.empty)((B, H, T_q, T_k), device=seed.device, dtype=torch.int8)
    block = 128 if INTERPRETING else 64  # the interpreter pays a fixed cost per program: fewer, larger tiles
    _dropout_mask[(triton.cdiv(T_q, block), triton.cdiv(T_k, block), B * H)](
        seed, keep, *_strides(keep), H, T_q, T_k, dropout_p, cu_seqlens_q, cu_seqlens_k, BLOCK_M=block,
        BLOCK_N=block, VARLEN=packed,
    )
    return keep.bool()


def triton_attention(q, k, v, dropout_p: float, scale: float, seed: Optional[torch.Tensor] = None, *,
                     causal: bool = True, window: tuple[int, int] = (-1, 0), softcap: float = 0.0,
                     sinks: Optional[torch.Tensor] = None, alibi_slopes: Optional[torch.Tensor] = None,
                     return_lse: bool = False, varlen=None, paged=None):
    """The `triton` backend: q (B, H, T_q, D), k, v (B, H_kv, T_k, D), already validated -> out (B, H, T_q, D),
    and with return_lse (out, lse (B, H, T_q) float32, natural log, detached). With dropout, `seed`
    (a 1-element int64 tensor on q's device, draw_seed) picks the mask that dropout_keep_mask
    rebuilds; None draws one from torch's generator. The options as AttentionCall holds them:
    window (left, right) with -1 unbounded, sinks (H,), alibi_slopes (B, H) float32.

    `varlen` (a VarlenLayout, fastgpt/attention/varlen.py): packed sequences, q (total_q, H, D), k, v
    (total_k, H_kv, D) -> out (total_q, H, D) and lse (H, total_q); alibi_slopes (B, H), B the
    number of sequences. One launch of each kernel serves every sequence.

    `paged` (a PagedLayout, fastgpt/attention/paged.py, with its varlen): k, v are the pools
    (num_pages, page_size, H_kv, D), read in place through the block table; forward only."""
    pages = (None, 0)
    if paged is not None:  # the pools as (num_pages · page_size, H_kv, D): rows are found through the table
        k, v = k.flatten(0, 1), v.flatten(0, 1)
        pages = (paged.block_table, paged.page_size)
    if varlen is not None:
        q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))  # (1, H, total, D) views
        check_offsets(q, rows=varlen.max_q)
        check_offsets(k, v, rows=paged.page_size if paged is not None else varlen.max_k)  # paged: 64-bit rows
        packed = (varlen.cu_seqlens_q, varlen.cu_seqlens_k, varlen.max_q, varlen.max_k, *pages)
    else:
        check_offsets(q, k, v)
        packed = (None, None, 0, 0, *pages)
    if dropout_p > 0.0 and seed is None:
        seed = draw_seed(q.device)
    sinks = None if sinks is None else sinks.contiguous()  # read at one stride in the kernel; a copy is (H,)
    out, lse = flash_attention_fwd(q, k, v, seed if dropout_p > 0.0 else None, dropout_p, scale, causal, window[0],
                                   window[1], float(softcap), sinks, alibi_slopes, *packed)
    if varlen is not None:
        out, lse = out[0].transpose(0, 1), lse[0]  # (total_q, H, D) and (H, total_q)
    if not return_lse:
        return out
    return out, lse * LN_2  # base 2 in the kernels; -inf stays -inf
