"""The CUDA causal matmuls (csrc/cuda/causal_matmul.cuh) executed in the SIMT emulation: every
kernel (nt, nn, tn), dtype (float32, float16, bfloat16) and path (wmma, SIMT) on the packed layout
with T_q ≤ T_k up to 130 and head dims 16-80, plain and grouped-query (k, v with H_kv heads
dividing H: nt and nn read the shared head, tn sums each group), against float64 with the parity rule (fastgpt.verify.parity:
the output factor × the error of the same product in the same dtype, plus the dtype's floor); against the C++ CPU
kernels where the extension has the packed schemas; and the whole set under ThreadSanitizer.
"""

from __future__ import annotations

import ctypes
import itertools
import shutil
import subprocess

import pytest
import torch

from emu_build import CSRC, HERE, TSAN_FLAGS, build
from ext_reference import valid_mask
from fastgpt.attention.naive import future_mask
from fastgpt.ext import layout
from fastgpt.verify.parity import assess

SOURCE = HERE / "matmul_entry.cpp"
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OPS = {"nt": 0, "nn": 1, "tn": 2}
# (dtype, force SIMT): fp32 runs SIMT only; the 16-bit dtypes run both paths.
PATHS = [(torch.float32, True), (torch.float16, False), (torch.float16, True), (torch.bfloat16, False),
         (torch.bfloat16, True)]
# (B, H, H_kv, T_q, T_k, D): one row block and several, short last blocks, T_q < T_k (o not a
# multiple of 64), D under one K step, several, and not a multiple of 16 or 64; the last two are
# grouped-query: three query heads over one key/value head (multi-query), and two groups of two
# over two row blocks with B > 1.
SHAPES = [(1, 2, 2, 1, 1, 16), (2, 1, 1, 17, 70, 32), (1, 2, 2, 64, 64, 64), (1, 1, 1, 100, 130, 80),
          (1, 1, 1, 130, 130, 24), (1, 3, 1, 17, 70, 40), (2, 4, 2, 65, 100, 16)]


@pytest.fixture(scope="module")
def lib():
    so = ctypes.CDLL(str(build("matmul_entry", [SOURCE], ["-O1", "-g"], shared=True)))
    so.fastgpt_emu_causal_matmul.restype = ctypes.c_int
    so.fastgpt_emu_causal_matmul.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + [
        ctypes.c_char_p, ctypes.c_int64]
    so.fastgpt_emu_causal_numel.restype = ctypes.c_int64
    so.fastgpt_emu_causal_numel.argtypes = [ctypes.c_int64, ctypes.c_int64]
    return so


# ---- the packed layout: fastgpt/ext/layout.py (checked against the C++ and the README formula in
# tests/test_ext_ops.py) ----

def pack(dense: torch.Tensor, T_k: int, fill: float = 0.0) -> torch.Tensor:
    """(B, H, T_q, T_k) -> packed (B, H, N), `fill` above the diagonal and in the padding."""
    return layout.pack(dense, dense.shape[2], T_k, fill)


def unpack(packed: torch.Tensor, T_q: int, T_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """packed (B, H, N) -> (dense (B, H, T_q, T_k), everything outside j ≤ o + i as one flat tensor)."""
    return layout.unpack(packed, T_q, T_k), packed[..., ~valid_mask(T_q, T_k)]


def rows_view(shape, dtype, seed):
    """A (B, H, T, D) operand as a strided view of a (B, T, H, D + 3) buffer (the layouts a qkv
    projection gives: rows of D are contiguous, nothing else is)."""
    B, H, T, D = shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, D + 3, generator=g, dtype=torch.float64).to(dtype)[..., :D].transpose(1, 2)


def emulate(lib, op: str, x0: torch.Tensor, x1: torch.Tensor, out: torch.Tensor, T_q, T_k, simt: bool,
            H_kv=None) -> torch.Tensor:
    """op on (x0, x1) into `out`; H the query heads (x0's: a of nt, p of nn and tn), H_kv the
    key/value heads (default H): b of nt, x of nn, the output of tn."""
    B, H, D = x0.shape[0], x0.shape[1], x1.shape[-1]
    H_kv = H if H_kv is None else H_kv
    strides = [(ctypes.c_int64 * 3)(*(t.stride()[:3] if t.dim() == 4 else (0, 0, 0))) for t in (x0, x1)]
    err = ctypes.create_string_buffer(4096)
    rc = lib.fastgpt_emu_causal_matmul(OPS[op], DTYPES[x1.dtype], int(simt), x0.data_ptr(), strides[0], x1.data_ptr(),
                                       strides[1], out.data_ptr(), B, H, H_kv, T_q, T_k, D, err, len(err))
    assert rc == 0, err.value.decode()
    return out


def per_query_head(x: torch.Tensor, H: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H, T, D), head h a copy of head h // (H / H_kv): the reference's copy."""
    return x.repeat_interleave(H // x.shape[1], dim=1)


def group_sum(x: torch.Tensor, H_kv: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H_kv, T, D), each group of H / H_kv consecutive heads summed."""
    B, H, T, D = x.shape
    return x.reshape(B, H_kv, H // H_kv, T, D).sum(2)


def check(got: torch.Tensor, ref: torch.Tensor, same_dtype: torch.Tensor, dtype):
    """fastgpt.verify.parity's rule for an output: its error against float64 within the output factor of
    the same product's error in `dtype`, plus the dtype's floor."""
    result = assess({"out": got}, {"out": ref}, {"out": same_dtype}, dtype)
    assert result.ok, result.explain()


def test_layout_numel_matches_the_readme_formula(lib):
    for T_q, T_k in [(1, 1), (17, 70), (64, 64), (65, 200), (100, 130), (2048, 2048)]:
        assert lib.fastgpt_emu_causal_numel(T_q, T_k) == layout.packed_size(T_q, T_k)
    N = lib.fastgpt_emu_causal_numel(2048, 2048)
    assert abs(N / 2048**2 - 0.516) < 0.001  # "N is 51.6% of T²" (csrc/README.md)


@pytest.mark.parametrize("dtype, simt", PATHS, ids=[f"{str(d)[6:]}-{'simt' if s else 'wmma'}" for d, s in PATHS])
@pytest.mark.parametrize("B, H, H_kv, T_q, T_k, D", SHAPES)
def test_emulated_matmuls_match_float64(lib, dtype, simt, B, H, H_kv, T_q, T_k, D):
    a = rows_view((B, H, T_q, D), dtype, 0)  # the query side: q, dO, dS
    b = rows_view((B, H_kv, T_k, D), dtype, 1)  # the key/value side: k, v
    b_copies = per_query_head(b, H)  # (B, H, T_k, D): what the reference reads, never the kernels
    mask = ~future_mask(T_q, T_k)
    N = lib.fastgpt_emu_causal_numel(T_q, T_k)

    # nt: S = tril_o(a · bᵀ), every one of the N elements written (zeros outside, padding included)
    s = emulate(lib, "nt", a, b, torch.full((B, H, N), float("nan"), dtype=dtype), T_q, T_k, simt, H_kv)
    s_dense, s_outside = unpack(s, T_q, T_k)
    assert (s_outside == 0).all(), "nt: nonzero (or unwritten) element above the diagonal or in the padding"
    check(s_dense, (a.double() @ b_copies.double().mT) * mask, (a @ b_copies.mT) * mask, dtype)

    # nn and tn read P only on and below the diagonal: NaN everywhere else
    p_dense = torch.randn(B, H, T_q, T_k, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype) * mask
    p = pack(p_dense, T_k, fill=float("nan"))
    out = emulate(lib, "nn", p, b, torch.empty(B, H, T_q, D, dtype=dtype), T_q, T_k, simt, H_kv)
    check(out, p_dense.double() @ b_copies.double(), p_dense @ b_copies, dtype)
    # tn: (B, H_kv, T_k, D), the sum over each group of query heads (the gradient of a shared head)
    out = emulate(lib, "tn", p, a, torch.full((B, H_kv, T_k, D), float("nan"), dtype=dtype), T_q, T_k, simt, H_kv)
    check(out, group_sum(p_dense.double().mT @ a.double(), H_kv), group_sum(p_dense.mT @ a, H_kv), dtype)


def test_emulated_matmuls_match_the_cpu_kernels(lib):
    from fastgpt.ext import build as ext_build

    reason = ext_build.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the C++ extension cannot be built here: {reason}")
    ext_build.load()
    mask = ~future_mask(70, 100)
    shapes = [(1, 2, 2, 70, 100, 32), (1, 4, 2, 70, 100, 32)]  # (B, H, H_kv, T_q, T_k, D): plain, grouped
    for (B, H, H_kv, T_q, T_k, D), dtype in itertools.product(shapes, (torch.float32, torch.bfloat16)):  # the CPU's
        # both against float64, the emulated kernel within the parity rule of the CPU kernel's error
        a, b = rows_view((B, H, T_q, D), dtype, 0), rows_view((B, H_kv, T_k, D), dtype, 1)
        b_copies = per_query_head(b, H).double()
        N = lib.fastgpt_emu_causal_numel(T_q, T_k)
        s = emulate(lib, "nt", a, b, torch.empty(B, H, N, dtype=dtype), T_q, T_k, False, H_kv)
        s_cpu = torch.ops.fastgpt.causal_matmul_nt(a, b)
        assert s_cpu.shape == s.shape and (unpack(s_cpu, T_q, T_k)[1] == 0).all()
        check(unpack(s, T_q, T_k)[0], (a.double() @ b_copies.mT) * mask, unpack(s_cpu, T_q, T_k)[0], dtype)
        # P at the unit scale the rule's floors assume (S itself would put the outputs near 60,
        # where fp32's rounding of a sum of 140 products is what separates the two kernels)
        p = (s.double() * (D * T_k) ** -0.5).to(dtype)
        p_dense = unpack(p, T_q, T_k)[0].double()
        nn_cpu = torch.ops.fastgpt.causal_matmul_nn(p, b, T_q)
        check(emulate(lib, "nn", p, b, torch.empty(B, H, T_q, D, dtype=dtype), T_q, T_k, False, H_kv),
              p_dense @ b_copies, nn_cpu, dtype)
        tn_cpu = torch.ops.fastgpt.causal_matmul_tn(p, a, T_k, H_kv)
        check(emulate(lib, "tn", p, a, torch.empty(B, H_kv, T_k, D, dtype=dtype), T_q, T_k, False, H_kv),
              group_sum(p_dense.mT @ a.double(), H_kv), tn_cpu, dtype)


def test_emulated_matmuls_are_clean_under_thread_sanitizer():
    """Every kernel, dtype and path (matmul_entry.cpp's own main, with a float64 check) under TSan,
    plain and grouped-query (tn's block refills its tiles for each query head of the group); D = 40
    > the 32-wide K step, so a missing barrier between steps would show."""
    exe = build("matmul-tsan", [SOURCE], [*TSAN_FLAGS, "-DFASTGPT_MATMUL_SELFTEST"])
    result = subprocess.run([exe], capture_output=True, text=True, timeout=600)
    assert "WARNING: ThreadSanitizer" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.count("ok ") == 15, result.stdout


def test_thread_sanitizer_catches_a_deleted_matmul_barrier(tmp_path):
    """The proof that the run above would see a race: without the barrier between two K steps,
    threads refill the shared tiles while others still read them (D = 40: two steps)."""
    marker = "__syncthreads();  // [sync: tiles consumed]"
    broken = tmp_path / "csrc"
    shutil.copytree(CSRC, broken)
    header = broken / "cuda" / "causal_matmul.cuh"
    text = header.read_text()
    assert text.count(marker) == 1, "the marked barrier of causal_matmul_nt_kernel is gone"
    header.write_text(text.replace(marker, "// barrier deleted by test_emulation_matmul.py"))
    exe = build("matmul-tsan-no-barrier", [SOURCE], [*TSAN_FLAGS, "-DFASTGPT_MATMUL_SELFTEST"], csrc=broken)
    result = subprocess.run([exe, "fp32"], capture_output=True, text=True, timeout=600,
                            env={"TSAN_OPTIONS": "halt_on_error=0 exitcode=66"})
    assert "WARNING: ThreadSanitizer: data race" in result.stderr, result.stdout + result.stderr[-2000:]
