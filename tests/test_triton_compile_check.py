"""The Triton kernels' offline compile check (fastgpt.verify.triton_compile, the first half of
`fastgpt check`): every shipped config compiles for sm_80 and sm_90 without spills.

Compiling needs a process where Triton is not interpreting, so everything here runs in a
subprocess without TRITON_INTERPRET. A cold run compiles several hundred kernels; Triton's cache
(~/.triton/cache) makes the next run mostly cache reads.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from fastgpt.kernels import flash_attention_configs as cfg  # noqa: E402
from fastgpt.verify import triton_compile as triton_compile_check  # noqa: E402


def _compiler_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_jobs_cover_every_kernel_arch_dtype_head_dim_and_dropout():
    jobs = triton_compile_check.jobs([80, 90], list(triton_compile_check.DTYPES), cfg.CHECKED_HEAD_DIMS)
    # every padded width a head dim can run at is compiled, with and without the padding masks
    assert {cfg.padded_head_dim(D) for D in cfg.CHECKED_HEAD_DIMS} == {16, 32, 64, 128, 256}
    assert any(D != cfg.padded_head_dim(D) for D in cfg.CHECKED_HEAD_DIMS if D > 128)
    for kernel in cfg.KERNELS:
        for arch in (80, 90):
            for dtype in ("fp16", "bf16", "fp32"):
                for D in cfg.CHECKED_HEAD_DIMS:
                    for dropout in (False, True):
                        for grouped in (False, True):
                            checked = [j.config for j in jobs if (j.kernel, j.arch, j.dtype, j.head_dim, j.dropout,
                                                                  j.grouped) == (kernel, arch, dtype, D, dropout, grouped)]
                            # grouped-query (GROUP > 1): dK/dV, which loops over the group, at each list's widest D
                            wanted = not grouped or (kernel == "bwd_dkdv" and D in triton_compile_check.GROUPED_HEAD_DIMS)
                            shipped = cfg.configs(kernel, (arch // 10, 0), cfg.padded_head_dim(D), dtype == "fp32", grouped)
                            assert checked == (shipped if wanted else []), (kernel, arch, dtype, D, dropout, grouped)
    assert {cfg.padded_head_dim(D) for D in triton_compile_check.GROUPED_HEAD_DIMS} == {64, 128, 256}


def test_a_spilling_config_fails_the_check():
    # dK/dV with 64×64 blocks on 4 warps is the kind of "obvious" config that spills on sm_80
    code = ("from fastgpt.verify.triton_compile import Job, run_job\n"
            "from fastgpt.kernels.flash_attention_configs import KernelConfig\n"
            "r = run_job(Job('bwd_dkdv', 80, 'fp16', 64, True, KernelConfig(64, 64, 4, 2)))\n"
            "print(r.registers, r.spill_bytes, r.ok, r.error)\n")
    out = subprocess.run([sys.executable, "-c", code], env=_compiler_env(), capture_output=True, text=True, timeout=600)
    registers, spills, ok, error = out.stdout.split()[-4:]
    assert error == "None" and int(spills) > 0 and ok == "False", out.stdout + out.stderr


def test_static_check_passes_for_every_shipped_config():
    out = subprocess.run([sys.executable, "-m", "fastgpt.verify.triton_compile"], env=_compiler_env(),
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    assert " 0 failed" in out.stdout
    for kernel in ("fwd", "fwd_decode", "bwd_dkdv", "bwd_dq", "bwd_preprocess"):
        for arch in ("sm_80", "sm_90"):
            assert any(line.startswith(kernel) and arch in line for line in out.stdout.splitlines()), (kernel, arch)
    # dropout draws eight weights per 10-round Philox call: at most 10/8 rounds per weight in the PTX,
    # or 10/w where a thread holds only w < 8 weights of a tile (one call per weight, as the kernels
    # once drew, counts 7 to 10 here)
    lines = out.stdout.splitlines()
    assert lines[0].split()[-2:] == ["philox/w", "status"]
    rows = [line.split() for line in lines[1:] if line.split() and line.split()[0] in cfg.KERNELS]
    assert rows
    for row in rows:
        block_m, block_n, warps = (int(x[1:]) for x in row[3].split("/")[:3])  # M128/N64/w8/s3
        weights_per_thread = block_m * block_n / (32 * warps)
        assert 0.5 < float(row[-2]) <= 10 / min(8, weights_per_thread), row


def test_a_head_dim_outside_the_kernels_range_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        triton_compile_check.main(["--head-dim", "300"])
    assert "300 is outside the Triton kernels' head dims, 16..256" in capsys.readouterr().err


@pytest.mark.parametrize("jobs", ["0", "-2", "two"])
def test_jobs_below_one_are_refused_in_one_line(jobs, capsys):
    from fastgpt.cli import main as fastgpt_main

    for run in (triton_compile_check.main, lambda argv: fastgpt_main(["check", *argv])):
        with pytest.raises(SystemExit) as exit_info:
            run([f"--jobs={jobs}"])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"--jobs: {jobs!r} is not an integer >= 1" in error, error


def test_the_kernels_cache_key_is_the_same_in_every_process():
    # Triton's on-disk cache (what makes a second check, or a GPU run's second process, skip the
    # compiler) is found by this key: nothing in it may depend on the process, such as an address
    code = ("from fastgpt.kernels import flash_attention_ops as ops\n"
            "print(sorted({k: f.cache_key for k, f in ops._KERNELS.items()}.items()))\n")
    keys = [subprocess.run([sys.executable, "-c", code], env=_compiler_env(), capture_output=True, text=True,
                           timeout=120).stdout for _ in range(2)]
    assert keys[0] and keys[0] == keys[1], keys
