"""The CUDA kernels' nvcc compile check (fastgpt.verify.cuda_compile, the second half of
`fastgpt check`): every kernel of csrc/cuda/ for every dtype and variant compiles for sm_80 and
sm_90 with zero spills and within the shared memory of one block. The parser tests run everywhere;
the compile test is skipped, with the reason, without nvcc. A cold compile is one nvcc call; the
result is cached by source hash."""

import re

import pytest

from fastgpt.verify.compile_check import SHARED_LIMIT
from fastgpt.verify import cuda_compile as cuda_compile_check
from fastgpt.verify.cuda_compile import KernelReport, parse_dynamic_shared, parse_ptxas

# Real `nvcc -Xptxas -v` output (CUDA 13.0): sm_80 reports cmem, sm_90 not; the third kernel has no
# static shared memory and spills; a non-inlined device function must not be taken for a kernel.
REPORT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN7fastgpt4cuda23causal_matmul_tn_kernelI13__nv_bfloat16Lb0EEEvPKT_S5_NS0_10RowStridesEPS3_lllll' for 'sm_80'
ptxas info    : Function properties for _ZN7fastgpt4cuda23causal_matmul_tn_kernelI13__nv_bfloat16Lb0EEEvPKT_S5_NS0_10RowStridesEPS3_lllll
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 26624 bytes smem, 440 bytes cmem[0]
ptxas info    : Compile time = 85.156 ms
ptxas info    : Compiling entry function '_ZN7fastgpt4cuda23causal_matmul_nt_kernelIfLb0EEEvPKT_NS0_10RowStridesES4_S5_PS2_lllll' for 'sm_90'
ptxas info    : Function properties for _ZN7fastgpt4cuda23causal_matmul_nt_kernelIfLb0EEEvPKT_NS0_10RowStridesES4_S5_PS2_lllll
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 79 registers, used 1 barriers, 34304 bytes smem
ptxas info    : Compiling function '_Z6helperPf' for 'sm_90'
ptxas info    : Function properties for _Z6helperPf
    24 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 12 registers
ptxas info    : Compiling entry function '_Z5spillPf' for 'sm_90'
ptxas info    : Function properties for _Z5spillPf
    256 bytes stack frame, 120 bytes spill stores, 96 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
"""


def test_parse_ptxas_reads_registers_spills_and_shared_memory():
    tn, nt, spill = parse_ptxas(REPORT)
    assert (tn.arch, tn.registers, tn.spill_bytes, tn.static_shared) == (80, 80, 0, 26624)
    assert (nt.arch, nt.registers, nt.spill_bytes, nt.static_shared) == (90, 79, 0, 34304)
    assert (spill.name, spill.registers, spill.spill_stores, spill.spill_loads, spill.static_shared) == (
        "_Z5spillPf", 255, 120, 96, 0)
    assert tn.ok and nt.ok and not spill.ok


def test_demangled_names_give_family_dtype_and_variant():
    k = KernelReport("void fastgpt::cuda::causal_matmul_nt_kernel<__nv_bfloat16, true>(__nv_bfloat16 const*, "
                     "fastgpt::cuda::RowStrides, long, long)", 80)
    assert (k.family, k.dtype, k.variant) == ("causal_matmul_nt_kernel", "bf16", "wmma")
    k = KernelReport("void fastgpt::cuda::causal_matmul_tn_kernel<float, false>(float const*)", 90)
    assert (k.family, k.dtype, k.variant) == ("causal_matmul_tn_kernel", "fp32", "simt")


def test_shared_memory_over_the_limit_or_any_spill_fails():
    assert KernelReport("k", 80, registers=32, static_shared=SHARED_LIMIT[80]).ok
    # the launcher's dynamic shared memory counts too
    assert not KernelReport("k", 80, registers=32, static_shared=SHARED_LIMIT[80] - 100, dynamic_shared=101).ok
    assert KernelReport("k", 90, registers=32, static_shared=SHARED_LIMIT[80] + 1).ok
    assert not KernelReport("k", 90, registers=32, spill_loads=4).ok
    assert parse_dynamic_shared("causal_matmul_nt_kernel 0\nsoftmax_kernel 98304\n") == {
        "causal_matmul_nt_kernel": 0, "softmax_kernel": 98304}


def _kernel_families() -> set[str]:
    """Every __global__ function template declared in csrc/cuda/*.cuh."""
    names = set()
    for header in (cuda_compile_check.CSRC / "cuda").glob("*.cuh"):
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", header.read_text()))
    return names


def test_every_cuda_kernel_compiles_for_sm80_and_sm90_without_spills():
    reason = cuda_compile_check.unavailable_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    kernels, seconds, cached = cuda_compile_check.compile_reports(sorted(SHARED_LIMIT))
    print(cuda_compile_check.table(kernels))
    print(f"nvcc: {seconds:.1f} s{' (cached)' if cached else ''}")
    families = _kernel_families()
    assert {"causal_matmul_nt_kernel", "causal_matmul_nn_kernel", "causal_matmul_tn_kernel"} <= families
    compiled = {(k.family, k.arch, k.dtype, k.variant) for k in kernels}
    for family in families:  # compile_check.cu must instantiate every kernel declared in a header
        for arch in SHARED_LIMIT:
            assert (family, arch, "fp32", "simt") in compiled if family.startswith("causal_matmul") else any(
                (f, a) == (family, arch) for f, a, _, _ in compiled), (family, arch)
            if family.startswith("causal_matmul"):
                for dtype in ("fp16", "bf16"):
                    for variant in ("wmma", "simt"):
                        assert (family, arch, dtype, variant) in compiled, (family, arch, dtype, variant)
    bad = [(k.name, k.arch, k.registers, k.spill_bytes, k.shared_bytes) for k in kernels if not k.ok]
    assert not bad, bad
    assert all(k.spill_bytes == 0 and k.shared_bytes <= SHARED_LIMIT[k.arch] for k in kernels)


def test_without_nvcc_the_check_is_skipped_with_the_reason(monkeypatch, capsys):
    monkeypatch.setattr(cuda_compile_check, "find_nvcc", lambda: None)
    assert "nvcc not found" in cuda_compile_check.unavailable_reason()
    assert cuda_compile_check.main([]) == 0
    assert "compile check skipped: nvcc not found" in capsys.readouterr().out


def test_the_build_targets_the_archs_the_checks_compile_for():
    from fastgpt.verify import compile_check
    from fastgpt.ext import build

    assert tuple(compile_check.ARCHS) == tuple(sorted(build.CUDA_ARCHS))
