"""The parsing and reporting of tests/cuda_torch_build.py (the script itself downloads a CUDA torch
and is not run here)."""

import importlib.util
import os
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("cuda_torch_build", Path(__file__).with_name("cuda_torch_build.py"))
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

PIP_OUTPUT = """\
Collecting torch==2.13.0
  Downloading torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl (526.6 MB)
     ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 526.6/526.6 MB 95.1 MB/s eta 0:00:00
  Using cached nvidia_cublas-13.1.1.3-py3-none-manylinux_2_27_x86_64.whl (423.1 MB)
  Downloading filelock-4.3.1-py3-none-any.whl (244 kB)
  Downloading cuda_toolkit-13.0.3.0-py2.py3-none-any.whl (2.5 kB)
Requirement already satisfied: ninja in ./venv/lib/python3.11/site-packages (1.13.0)
"""


def test_download_sizes_split_the_network_from_the_cache():
    downloaded, cached = script.download_sizes(PIP_OUTPUT)
    assert downloaded == 526_600_000 + 244_000 + 2_500
    assert cached == 423_100_000
    assert script.download_sizes("Requirement already satisfied: torch") == (0, 0)


def test_nvcc_release_reads_the_version_line():
    text = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"
    assert script.nvcc_release(text) == (13, 0)
    assert script.nvcc_release("") is None


@pytest.mark.parametrize("torch_cuda, nvcc, refused", [
    ("13.0", (13, 0), None),
    ("13.0", (13, 1), None),  # cpp_extension only warns about another minor version
    ("12.8", (13, 0), "CUDA 12.8 but nvcc at /cuda is CUDA 13.0"),
    (None, (13, 0), "CPU-only build"),
    ("13.0", None, "no nvcc"),
])
def test_cuda_mismatch_refuses_what_cpp_extension_refuses(torch_cuda, nvcc, refused):
    reason = script.cuda_mismatch(torch_cuda, nvcc, "/cuda")
    assert reason is None if refused is None else refused in reason


def test_toolkit_problem_names_a_cuda_home_without_headers(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\nexec /elsewhere/nvcc \"$@\"\n")
    assert "no include/cuda_runtime.h" in script.toolkit_problem(str(tmp_path))
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    assert script.toolkit_problem(str(tmp_path)) is None
    assert "no bin/nvcc" in script.toolkit_problem(str(tmp_path / "include"))


def test_kernel_table_and_missing_kernels():
    ops = ["causal_matmul_nt", "causal_softmax"]
    aot = {"ops": {"causal_matmul_nt": {"CPU": True, "CUDA": True}, "causal_softmax": {"CPU": True, "CUDA": False}}}
    jit = {"ops": {op: {"CPU": True, "CUDA": True} for op in ops}}
    table = script.kernel_table(ops, {"aot": aot, "jit": jit}).splitlines()
    assert table[0].split() == ["op", "aot", "CPU", "aot", "CUDA", "jit", "CPU", "jit", "CUDA"]
    assert table[2].split() == ["causal_softmax", "yes", "NO", "yes", "yes"]
    assert script.missing_cuda_kernels(aot) == ["causal_softmax"] and script.missing_cuda_kernels(jit) == []


def test_source_warnings_keep_fastgpts_own_once():
    log = ("/tmp/w/src/csrc/cuda/binding.cu(12): warning #177-D: variable declared but never referenced\n"
           "/usr/lib/gcc/x86_64-linux-gnu/12/include/avx512fintrin.h:188:10: warning: '__Y' is used uninitialized\n"
           "/tmp/w/src/csrc/cpu/common.h:3:1: warning: unused [-Wunused]\n"
           "/tmp/w/src/csrc/cpu/common.h:3:1: warning: unused [-Wunused]\n")
    assert script.source_warnings(log) == ["csrc/cuda/binding.cu(12): warning #177-D: variable declared but never "
                                           "referenced", "csrc/cpu/common.h:3:1: warning: unused [-Wunused]"]


def test_error_summary_leads_with_the_compiler_error():
    log = "\n".join(["[1/5] c++ ok", "x.h:10:10: fatal error: cusparse.h: No such file or directory",
                     *(f"traceback line {i}" for i in range(40)), "ERROR: Failed to build"])
    summary = script.error_summary(log, tail=3).splitlines()
    assert summary[0].endswith("cusparse.h: No such file or directory") and summary[-1] == "ERROR: Failed to build"
    assert len(summary) == 2 + 1 + 3


def test_pip_env_drops_local_sources_and_config():
    env = script.pip_env({"PATH": "/bin", "PIP_FIND_LINKS": "/opt/wheels", "PIP_CONSTRAINT": "c.txt", "PIP_CERT": "x"})
    assert env == {"PATH": "/bin", "PIP_CERT": "x", "PIP_CONFIG_FILE": os.devnull}
