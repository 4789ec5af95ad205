"""The Triton attention backend against the float64 reference, in the interpreter on CPU (or
compiled, on a GPU): parity over PARITY_SHAPES, GQA_SHAPES and HEAD_DIM_SHAPES, dropout with the
kernel's own mask, determinism, memory, errors. bfloat16 is left to the GPU: the interpreter computes it wrongly."""

import pytest
import torch

from fastgpt.attention import causal_attention, causal_attention_with_mask, naive_attention
from fastgpt.verify.parity import (GQA_SHAPES, HEAD_DIM_SHAPES, PARITY_SHAPES, check_parity, compare, forward_backward,
                            make_qkv, shape_id)

flash_ops = pytest.importorskip("fastgpt.kernels.flash_attention_ops", reason="triton is not installed")
from fastgpt.kernels import flash_attention_configs as cfg  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def triton_attn(q, k, v, dropout_p=0.0, scale=None):
    return causal_attention(q, k, v, dropout_p=dropout_p, scale=scale, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=shape_id)
def test_parity_with_float64_reference(shape, dtype):
    result = check_parity("triton", shape, dtype, DEVICE)
    assert result.ok, f"{shape} {dtype}: errors {result.errors} over limits {result.limits}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GQA_SHAPES + HEAD_DIM_SHAPES, ids=shape_id)
def test_grouped_query_and_wide_or_odd_head_dims_match_the_reference(shape, dtype):
    result = check_parity("triton", shape, dtype, DEVICE)
    assert result.ok, f"{shape} {dtype}: errors {result.errors} over limits {result.limits}"


@pytest.mark.parametrize("D", [8, 15, 257, 320])
def test_head_dims_outside_16_to_256_are_refused_by_name(D):
    q = torch.zeros(1, 2, 4, D, device=DEVICE)
    with pytest.raises(ValueError, match=f"head dim D={D} is not supported: the Triton kernels take 16 <= D <= 256"):
        triton_attn(q, q, q)


def assert_matches_reference(kernel_fn, reference_fn, q, k, v, dout):
    """kernel_fn's out, dq, dk, dv within the parity rule of reference_fn, in q's dtype. The kernel
    runs first, so a reference may depend on what the kernel's call did (its dropout seed)."""
    result = compare(kernel_fn, reference_fn, (q, k, v), dout, q.dtype)
    assert result.ok, f"{result.explain()}: errors {result.errors}, limits {result.limits}"


def test_scale_and_any_strides():
    # head dim not unit-stride, k and v from unrelated layouts, a non-default scale
    B, H, T, D = 2, 3, 37, 32
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, D, T, generator=g).to(DEVICE).transpose(-1, -2)
    k = torch.randn(T, B, D, H, generator=g).to(DEVICE).permute(1, 3, 0, 2)
    v = torch.randn(B, H, T, 2 * D, generator=g).to(DEVICE)[..., ::2]
    dout = torch.randn(B, T, D, H, generator=g).to(DEVICE).permute(0, 3, 1, 2)
    assert_matches_reference(lambda a, b, c: triton_attn(a, b, c, scale=0.3),
                             lambda a, b, c: naive_attention(a, b, c, scale=0.3), q, k, v, dout)


def with_the_kernels_mask(p: float, check_mask=lambda keep: True):
    """(fn, reference): fn(q, k, v) runs the triton backend with dropout p and keeps the mask it
    drew (causal_attention_with_mask); reference(q, k, v), called after fn, is the naive math over
    that mask, which `check_mask` must accept."""
    drawn = {}

    def fn(a, b, c):
        out, drawn["keep"] = causal_attention_with_mask(a, b, c, dropout_p=p, backend="triton")
        return out

    def reference(a, b, c):
        assert check_mask(drawn["keep"])
        return naive_attention(a, b, c, p, keep_mask=drawn["keep"])

    return fn, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 100, 100, 32), (1, 2, 257, 257, 48), (2, 3, 37, 100, 32)], ids=shape_id)
def test_dropout_matches_reference_with_the_kernels_mask(shape, dtype):
    p = 0.3
    q, k, v = make_qkv(shape, dtype, DEVICE, seed=5)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    fn, reference = with_the_kernels_mask(p, lambda keep: 0 < keep.float().mean() < 1)
    assert_matches_reference(fn, reference, q, k, v, dout)


def _shipped_block_shapes():
    """Every (BLOCK_M, BLOCK_N) that the GPU lists ship for each kernel, dealt into as few runs as
    the kernel with the most of them needs: run i takes each kernel's i-th pair, or its largest
    (the interpreter's time grows with the number of blocks). The kernels of one call are separate
    launches that share no block logic (the backward reads only the forward's per-row
    log-sum-exp), so every pair needs one run, not every combination of them."""
    per_kernel = {
        kernel: sorted({(c.block_m, c.block_n) for shipped in (cfg.SHIPPED, cfg.SHIPPED_FP32)
                        for arch in (80, 90) for dclass in (64, 128, 256) for c in shipped[kernel][arch][dclass]}
                       | ({(c.block_m, c.block_n) for cs in cfg.GROUPED_DKDV.values() for c in cs}
                          if kernel == "bwd_dkdv" else set()))
        for kernel in cfg.KERNELS}
    runs = max(map(len, per_kernel.values()))
    return [tuple((kernel, *pairs[min(i, len(pairs) - 1)]) for kernel, pairs in per_kernel.items()) for i in range(runs)]


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the autotuner runs every shipped config anyway")
@pytest.mark.parametrize("blocks", _shipped_block_shapes(), ids=lambda b: "-".join(f"{m}x{n}" for _, m, n in b))
def test_shipped_block_shapes_are_correct(blocks, monkeypatch):
    # the GPU configs are only compiled by fastgpt.verify.triton_compile; their block logic runs here
    for kernel, block_m, block_n in blocks:
        monkeypatch.setitem(cfg.INTERPRETER_CONFIGS, kernel, cfg.KernelConfig(block_m, block_n, 4, 1))
    p = 0.25
    # T=150: several blocks of every size, a ragged end; then 37 and 5 (decode configs) queries
    # over the same keys, at offsets 113 and 145 that no block size divides
    for shape in [(1, 2, 150, 150, 64), (1, 2, 37, 150, 64), (1, 2, 5, 150, 64)]:
        q, k, v = make_qkv(shape, torch.float32, DEVICE, seed=7)
        dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
        assert_matches_reference(*with_the_kernels_mask(p), q, k, v, dout)


def test_few_queries_launch_the_decode_configs(monkeypatch):
    launched = []
    launcher = flash_ops._launcher
    monkeypatch.setattr(flash_ops, "_launcher", lambda kernel, *a: launched.append(kernel) or launcher(kernel, *a))
    for T_q in (1, cfg.DECODE_MAX_QUERIES, cfg.DECODE_MAX_QUERIES + 1):
        q, k, v = make_qkv((1, 2, T_q, 40, 16), torch.float32, DEVICE)
        triton_attn(q, k, v)
    assert launched == ["fwd_decode", "fwd_decode", "fwd"]


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_kept_fraction(p):
    seed = flash_ops.draw_seed(torch.device(DEVICE))
    keep = flash_ops.dropout_keep_mask(seed, (2, 4, 384, 16), p)  # 1.2 M weights
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    # independent streams per (b, h) and per row: no two share a mask
    flat = keep.flatten(0, 1)
    assert not torch.equal(flat[0], flat[1])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


def test_keys_that_share_a_philox_call_are_independent():
    # one Philox call gives the uniforms of 8 neighbouring keys (kernels/flash_attention.py): the
    # 8 keep bits of a group must be uncorrelated, and groups must not repeat along rows or heads
    seed = flash_ops.draw_seed(torch.device(DEVICE))
    keep = flash_ops.dropout_keep_mask(seed, (2, 4, 384, 16), 0.5).float()  # 1.2 M weights
    lanes = keep[..., :384].reshape(-1, 8).T  # (8, samples): key 8g + t, t = 0..7
    corr = torch.corrcoef(lanes) - torch.eye(8)
    assert corr.abs().max() < 0.01  # 147k samples per lane: an independent pair stays within ~0.008
    groups = keep[0, 0, :, :64].reshape(384, 8, 8)  # (query, group, lane)
    assert not torch.equal(groups[:, 0], groups[:, 1]) and not torch.equal(groups[0], groups[1])


@pytest.mark.parametrize("p", [0.2, 1 / 3, 0.9])
def test_dropout_probability_is_p_to_16_bits(p):
    # 16-bit uniforms: a weight is dropped with probability ceil(p·2¹⁶)/2¹⁶, within 2⁻¹⁶ of p;
    # over 1.2 M weights the kept fraction stays within 4 standard deviations of 1 - p
    seed = flash_ops.draw_seed(torch.device(DEVICE))
    keep = flash_ops.dropout_keep_mask(seed, (2, 4, 384, 16), p, 384)  # dense (B, H, T_q, T_k)
    kept = keep.float().mean().item()
    assert abs(kept - (1 - p)) < 4 * (p * (1 - p) / keep.numel()) ** 0.5 + 2**-16, (kept, 1 - p)


def test_dropout_reproducible_from_torch_seed():
    q, k, v = make_qkv((2, 2, 64, 32), torch.float32, DEVICE)

    def run(seed):
        torch.manual_seed(seed)
        return forward_backward(lambda a, b, c: triton_attn(a, b, c, dropout_p=0.2), (q, k, v), torch.ones_like(q))

    first, again, other = run(0), run(0), run(1)
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(first["out"], other["out"])


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_repeated_backward_is_bit_equal(dropout_p):
    q, k, v = (t.detach().requires_grad_(True) for t in make_qkv((2, 2, 100, 64), torch.float16, DEVICE))
    out = triton_attn(q, k, v, dropout_p)
    dout = torch.randn_like(out)
    grads = []
    for _ in range(3):
        grads.append(torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    for later in grads[1:]:
        for a, b in zip(grads[0], later):
            assert torch.equal(a, b)


def test_saves_no_t_by_t_tensor():
    B, H, T, D = 1, 2, 257, 16  # T > B·H·D, so a T×T tensor would be the largest saved
    q, k, v = (t.detach().requires_grad_(True) for t in make_qkv((B, H, T, D), torch.float32, DEVICE))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = triton_attn(q, k, v, dropout_p=0.1)
    assert saved, "the autograd graph saved nothing: no backward was recorded"
    assert max(t.numel() for t in saved) <= B * H * T * D
    assert sum(t.numel() * t.element_size() for t in saved) <= 4 * B * H * T * D * 4 + B * H * T * 4 + 8
    out.sum().backward()
    assert q.grad is not None


def test_output_layout_is_bthd():
    # out is a (B, H, T, D) view of (B, T, H, D) memory: merging heads needs no copy
    q, k, v = make_qkv((2, 3, 17, 16), torch.float32, DEVICE)
    out = triton_attn(q, k, v)
    assert out.shape == q.shape
    assert out.transpose(1, 2).is_contiguous()


def test_grouped_query_dropout_uses_one_mask_per_query_head():
    # 6 query heads over 2 key/value heads, fewer queries than keys: the kernels' mask is drawn per
    # query head (b·H + h), so heads sharing k and v still drop different weights
    p = 0.3
    q, k, v = make_qkv((2, 6, 2, 37, 50, 32), torch.float32, DEVICE, seed=9)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    # (B, H, T_q, T_k): two query heads of one group drop different weights
    fn, reference = with_the_kernels_mask(p, lambda keep: not torch.equal(keep[:, 0], keep[:, 1]))
    assert_matches_reference(fn, reference, q, k, v, dout)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_grouped_query_backward_is_bit_equal_and_sums_the_group(dropout_p):
    # dK, dV of a shared head sum its query heads' gradients in a fixed order: repeated backwards
    # are bit-equal, and they equal the sum over the heads of the same call on copied k and v
    shape = (2, 6, 2, 45, 45, 32)
    q, k, v = (t.detach().requires_grad_(True) for t in make_qkv(shape, torch.float32, DEVICE, seed=11))
    torch.manual_seed(0)
    out = triton_attn(q, k, v, dropout_p)
    dout = torch.randn_like(out)
    grads = [torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) for _ in range(3)]
    for later in grads[1:]:
        for a, b in zip(grads[0], later):
            assert torch.equal(a, b)
    k_rep, v_rep = (t.detach().repeat_interleave(3, dim=1).requires_grad_(True) for t in (k, v))
    torch.manual_seed(0)  # the same seed, so the same mask: it depends on the query head only
    out_rep = triton_attn(q, k_rep, v_rep, dropout_p)
    assert torch.allclose(out_rep, out, atol=1e-6, rtol=0)
    dk_rep, dv_rep = torch.autograd.grad(out_rep, (k_rep, v_rep), dout)
    B, _, T, D = k.shape
    assert torch.allclose(dk_rep.view(B, 2, 3, T, D).sum(2), grads[0][1], atol=1e-5, rtol=0)
    assert torch.allclose(dv_rep.view(B, 2, 3, T, D).sum(2), grads[0][2], atol=1e-5, rtol=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's conversions; a GPU compiles the loops")
@pytest.mark.parametrize("shape", [(1, 2, 40, 40, 32), (1, 4, 2, 5, 70, 16)], ids=shape_id)
def test_loop_bounds_reach_the_interpreter_as_python_ints(shape, monkeypatch):
    # Triton 3.6's interpreter turns a loop bound into an int with int() of the tensor's
    # one-element array, which numpy >= 2.4 refuses (3.7 squeezes it first): that conversion,
    # made strict whatever numpy is installed, must never be reached by the kernels
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    patch_tensor = interpreter._patch_lang_tensor

    def strict_index(self):
        data = self.handle.data
        if data.ndim:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return int(data)

    def patch_like_triton_3_6(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", strict_index)

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_like_triton_3_6)
    result = check_parity("triton", shape, torch.float32, DEVICE)  # forward and backward, grouped-query too
    assert result.ok, f"{shape}: errors {result.errors} over limits {result.limits}"
