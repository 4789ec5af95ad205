"""The CUDA softmax kernels (csrc/cuda/causal_softmax.cuh) run through the SIMT emulation: forward
(scale + causal mask + softmax + dropout), both backwards and the keep mask, on the packed causal
layout, every dtype, both ways of owning a row, against float64 math on the dense matrix; the
dropout mask bit for bit against an independent Python Philox and the CPU kernels' mask.

Shapes are small on purpose: every emulated warp op is a round of thread switches (~0.5 s per
launch of ~250 rows). (B·H, T_q, T_k) with T_q ≤ T_k, odd sizes, rows crossing the 64-row blocks.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from emu_build import HERE, build
from fastgpt.attention.naive import future_mask
from fastgpt.ext import layout
from fastgpt.verify.parity import assess, floor
from test_ext_dropout import philox4x32_10

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PATHS = {"warp": 1, "block": 2}  # SoftmaxPath::kWarpPerRow, kBlockPerRow
# (B·H, T_q, T_k, dropout_p): the warp path up to T = 130; the block path (1 row per launch
# block, ~10x dearer to emulate) on fewer rows.
SHAPES = {
    "warp": [(3, 1, 1, 0.0), (2, 17, 17, 0.3), (1, 66, 130, 0.0), (1, 130, 130, 0.2)],
    "block": [(2, 1, 100, 0.25), (1, 40, 129, 0.0)],
}
CASES = [(path, shape) for path, shapes in SHAPES.items() for shape in shapes]
CASE_IDS = [f"{path}-BH{bh}-Tq{tq}-Tk{tk}-p{p}" for path, (bh, tq, tk, p) in CASES]
SCALE = 0.37
SEED, OFFSET = 2**40 + 123, 7
M32 = 0xFFFFFFFF


@pytest.fixture(scope="module")
def lib():
    lib = ctypes.CDLL(str(build("softmax_emu", [HERE / "softmax_lib.cpp"], ["-O1"], shared=True)))
    i64, u64, f32, f64, ptr, i32 = (ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, ctypes.c_double,
                                    ctypes.c_void_p, ctypes.c_int)
    lib.emu_causal_softmax.argtypes = [i32, ptr, ptr, i64, i64, i64, f32, f64, u64, u64, i32, ctypes.c_char_p, i32]
    lib.emu_causal_softmax_backward.argtypes = [i32, ptr, ptr, ptr, i64, i64, i64, f32, i32, ctypes.c_char_p, i32]
    lib.emu_causal_softmax_dropout_backward.argtypes = [i32, ptr, ptr, ptr, i64, i64, i64, f32, f64, u64, u64, i32,
                                                        ctypes.c_char_p, i32]
    lib.emu_dropout_keep_mask.argtypes = [ptr, i64, i64, i64, f64, u64, u64, ctypes.c_char_p, i32]
    return lib


def call(fn, *args):
    err = ctypes.create_string_buffer(4096)
    ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    assert fn(*ptrs, err, len(err)) == 0, err.value.decode()


# ---- the packed layout: fastgpt/ext/layout.py (checked against the C++ and the README formula in
# tests/test_ext_ops.py) ----
def packed_size(T_q: int, T_k: int) -> int:
    return layout.packed_size(T_q, T_k)


def pack(dense: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """(BH, T_q, T_k) -> (BH, N); `fill` above the diagonal and in the padding."""
    return layout.pack(dense, dense.shape[1], dense.shape[2], fill)


def unpack(packed: torch.Tensor, T_q: int, T_k: int) -> torch.Tensor:
    return layout.unpack(packed, T_q, T_k)


def python_keep_mask(BH, T_q, T_k, p, seed, offset) -> torch.Tensor:
    """The documented stream (philox.h) on the packed rows: row r = bh·T_q + i, keep (r, j) iff
    word j % 4 of Philox(counter (j // 4, r, offset), key seed) >= floor(p · 2^32); False at j > o + i."""
    key, ctr = (seed & M32, seed >> 32), (offset & M32, offset >> 32)
    threshold = int(p * 2**32)
    keep = torch.zeros(BH * T_q, T_k, dtype=torch.bool)
    for row in range(BH * T_q):
        n = T_k - T_q + row % T_q + 1
        for g in range((n + 3) // 4):
            words = philox4x32_10((g, row, *ctr), key)
            for j in range(4 * g, min(n, 4 * g + 4)):
                keep[row, j] = words[j % 4] >= threshold
    return keep.view(BH, T_q, T_k)


# ---- float64 references on the dense matrix (fn run in any dtype: the same-dtype error) ----
def ref_probs(scores, keep, p):
    T_q, T_k = scores.shape[-2:]
    probs = torch.softmax((scores * SCALE).masked_fill(future_mask(T_q, T_k), float("-inf")), dim=-1)
    return probs * keep.to(probs.dtype) / (1.0 - p) if p > 0 else probs


def ref_grad_scores(scores, grad, keep, p):
    s = scores.detach().clone().requires_grad_(True)
    ref_probs(s, keep, p).backward(grad)
    return s.grad


def inputs(BH, T_q, T_k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = lambda: torch.randn(BH, T_q, T_k, generator=g, dtype=torch.float64).masked_fill(future_mask(T_q, T_k), 0)  # noqa: E731
    return dense().to(dtype), dense().to(dtype)


def assert_matches(got_packed, ref64, same_dtype, key, T_q, T_k, dtype):
    """got: the kernel's packed output. Exactly 0 above the diagonal and in the padding (it was NaN
    before the launch: every element is written); the rest within fastgpt.verify.parity's rule."""
    assert torch.equal(pack(unpack(got_packed, T_q, T_k)), got_packed), "non-zero (or unwritten) above the diagonal"
    result = assess({key: unpack(got_packed, T_q, T_k)}, {key: ref64}, {key: same_dtype}, dtype)
    assert result.ok, result.explain()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path, shape", CASES, ids=CASE_IDS)
def test_forward(lib, path, shape, dtype):
    BH, T_q, T_k, p = shape
    scores, _ = inputs(BH, T_q, T_k, dtype)
    packed_in = pack(scores, fill=float("nan"))  # nothing above the diagonal may be read
    out = torch.full_like(packed_in, float("nan"))
    call(lib.emu_causal_softmax, DTYPES[dtype], packed_in, out, BH, T_q, T_k, SCALE, p, SEED, OFFSET, PATHS[path])
    keep = python_keep_mask(BH, T_q, T_k, p, SEED, OFFSET)
    if p > 0:  # exactly the Python Philox's mask: zero where dropped, non-zero where kept
        assert torch.equal(unpack(out, T_q, T_k) != 0, keep)
    assert_matches(out, ref_probs(scores.double(), keep, p), ref_probs(scores, keep, p), "out", T_q, T_k, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path, shape", CASES, ids=CASE_IDS)
def test_backward_from_probs(lib, path, shape, dtype):
    BH, T_q, T_k, _ = shape
    scores, grad = inputs(BH, T_q, T_k, dtype)
    keep = torch.ones(BH, T_q, T_k, dtype=torch.bool)
    probs = ref_probs(scores.double(), keep, 0.0).to(dtype)  # P as the forward stores it
    out = torch.full((BH, packed_size(T_q, T_k)), float("nan"), dtype=dtype)
    call(lib.emu_causal_softmax_backward, DTYPES[dtype], pack(grad, float("nan")), pack(probs, float("nan")), out,
         BH, T_q, T_k, SCALE, PATHS[path])
    ref = ref_grad_scores(scores.double(), grad.double(), keep, 0.0)
    assert_matches(out, ref, ref_grad_scores(scores, grad, keep, 0.0), "grad", T_q, T_k, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path, shape", CASES, ids=CASE_IDS)
def test_dropout_backward_regenerates_the_mask(lib, path, shape, dtype):
    BH, T_q, T_k, p = shape
    p = p or 0.5  # this kernel exists for dropout: always some
    scores, grad = inputs(BH, T_q, T_k, dtype)
    out = torch.full((BH, packed_size(T_q, T_k)), float("nan"), dtype=dtype)
    call(lib.emu_causal_softmax_dropout_backward, DTYPES[dtype], pack(grad, float("nan")), pack(scores, float("nan")),
         out, BH, T_q, T_k, SCALE, p, SEED, OFFSET, PATHS[path])
    keep = python_keep_mask(BH, T_q, T_k, p, SEED, OFFSET)
    ref = ref_grad_scores(scores.double(), grad.double(), keep, p)
    assert_matches(out, ref, ref_grad_scores(scores, grad, keep, p), "grad", T_q, T_k, dtype)


def emulated_keep_mask(lib, BH, T_q, T_k, p, seed, offset):
    keep = torch.full((BH, T_q, T_k), 7, dtype=torch.uint8)  # 7: never written
    call(lib.emu_dropout_keep_mask, keep, BH, T_q, T_k, p, seed % 2**64, offset % 2**64)
    assert keep.max().item() <= 1
    return keep.bool()


@pytest.mark.parametrize("BH, T_q, T_k", [(2, 1, 1), (3, 11, 11), (2, 21, 130), (1, 130, 130)])
@pytest.mark.parametrize("seed, offset", [(0, 0), (2**40 + 17, 3), (-5, 2**33 + 1)])
def test_keep_mask_is_the_python_philox(lib, BH, T_q, T_k, seed, offset):
    p = 0.3
    got = emulated_keep_mask(lib, BH, T_q, T_k, p, seed, offset)
    assert torch.equal(got, python_keep_mask(BH, T_q, T_k, p, seed % 2**64, offset % 2**64))


@pytest.fixture(scope="module")
def cpu_ops():
    """torch.ops.fastgpt where the CPU extension builds here (in CI its own tests built it already)."""
    import fastgpt.ext as ext

    try:
        ext.load()
    except ext.ExtensionUnavailable as e:
        pytest.skip(f"the CPU extension is unavailable: {e}")
    return torch.ops.fastgpt


def test_keep_mask_is_the_cpu_kernels_mask(lib, cpu_ops):
    p, seed, offset = 0.35, 99, 5
    for B, H, T_q, T_k in [(2, 3, 70, 130), (1, 2, 130, 130)]:
        got = emulated_keep_mask(lib, B * H, T_q, T_k, p, seed, offset).view(B, H, T_q, T_k)
        cpu = cpu_ops.dropout_keep_mask(torch.empty(B, H, packed_size(T_q, T_k)), T_q, T_k, p, seed, offset)
        assert torch.equal(got, cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # the CPU kernels' dtypes
def test_values_agree_with_the_cpu_kernels(lib, cpu_ops, dtype):
    """Forward with dropout and both backwards: CPU and emulated CUDA within the dtype's floor
    (both compute in fp32; their exp and summation order differ)."""
    B, H, T_q, T_k, p = 1, 2, 50, 70, 0.25
    scores, grad = inputs(B * H, T_q, T_k, dtype)
    s, g = pack(scores), pack(grad)
    N = packed_size(T_q, T_k)
    emulated = [torch.empty(B * H, N, dtype=dtype) for _ in range(3)]
    call(lib.emu_causal_softmax, DTYPES[dtype], s, emulated[0], B * H, T_q, T_k, SCALE, p, SEED, OFFSET, 1)
    call(lib.emu_causal_softmax_backward, DTYPES[dtype], g, emulated[0], emulated[1], B * H, T_q, T_k, SCALE, 1)
    call(lib.emu_causal_softmax_dropout_backward, DTYPES[dtype], g, s, emulated[2], B * H, T_q, T_k, SCALE, p, SEED,
         OFFSET, 1)
    s4, g4, e0 = (t.view(B, H, N) for t in (s, g, emulated[0]))
    cpu = [cpu_ops.causal_softmax(s4, T_q, T_k, SCALE, p, SEED, OFFSET),
           cpu_ops.causal_softmax_backward(g4, e0, T_q, T_k, SCALE),
           cpu_ops.causal_softmax_dropout_backward(g4, s4, T_q, T_k, SCALE, p, SEED, OFFSET)]
    cpu = [unpack(c.view(B * H, N), T_q, T_k) for c in cpu]
    for name, got, want, atol in zip(["forward", "backward", "dropout backward"], emulated, cpu,
                                     [floor("out", dtype), floor("grad", dtype), floor("grad", dtype)]):
        torch.testing.assert_close(unpack(got, T_q, T_k).double(), want.double(), rtol=0, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_launchers_refuse_bad_sizes(lib):
    x = torch.zeros(64)
    err = ctypes.create_string_buffer(512)
    assert lib.emu_causal_softmax(0, x.data_ptr(), x.data_ptr(), 1, 5, 4, 1.0, 0.0, 0, 0, 0, err, 512) == 1
    assert b"T_q <= T_k" in err.value and b"T_q = 5" in err.value
    assert lib.emu_causal_softmax(0, x.data_ptr(), x.data_ptr(), 1, 1, 1, 1.0, 1.0, 0, 0, 0, err, 512) == 1
    assert b"dropout_p must be in [0, 1)" in err.value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_unaligned_pointers_take_the_scalar_path_with_the_same_bits(lib, dtype):
    """Tensors not 16-byte aligned (a view one element in) load and store element by element; the
    math per element is the same, so the results equal the aligned run's bit for bit."""
    BH, T_q, T_k, p = 2, 17, 40, 0.3
    scores, grad = inputs(BH, T_q, T_k, dtype)
    N = packed_size(T_q, T_k)

    def run(shift):
        buffers = [torch.zeros(BH * N + 1, dtype=dtype) for _ in range(4)]
        s, g, out, dsc = (b[shift:shift + BH * N].view(BH, N) for b in buffers)
        s.copy_(pack(scores)), g.copy_(pack(grad))
        assert (s.data_ptr() % 16 == 0) == (shift == 0)
        call(lib.emu_causal_softmax, DTYPES[dtype], s, out, BH, T_q, T_k, SCALE, p, SEED, OFFSET, PATHS["warp"])
        call(lib.emu_causal_softmax_dropout_backward, DTYPES[dtype], g, s, dsc, BH, T_q, T_k, SCALE, p, SEED, OFFSET,
             PATHS["warp"])
        return out.clone(), dsc.clone()

    aligned, unaligned = run(0), run(1)
    assert torch.equal(aligned[0], unaligned[0]) and torch.equal(aligned[1], unaligned[1])
