"""Building the extension: what a missing compiler or ninja says, the cache, the first-use message.

These tests never compile: they drive fastgpt.ext.build with a monkeypatched environment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

from fastgpt.attention import causal_attention
from fastgpt.ext import build
from fastgpt.verify.parity import make_qkv


@pytest.fixture()
def not_loaded(monkeypatch):
    """This process as if the extension had never been loaded, with the JIT build forced."""
    monkeypatch.setattr(build, "is_loaded", lambda: False)
    monkeypatch.setattr(build, "_failure", None)
    monkeypatch.setenv("FASTGPT_EXT_BUILD", "jit")


def _hide_ninja(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no ninja binary on PATH ...
    monkeypatch.setitem(sys.modules, "ninja", None)  # ... and no pip package to borrow one from


def test_missing_compiler_says_what_to_install(not_loaded, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    reason = build.unavailable_reason()
    assert "no C++ compiler" in reason and "no-such-c++-compiler" in reason and "apt install g++" in reason
    with pytest.raises(build.ExtensionUnavailable, match="apt install g\\+\\+"):
        build.load()


def test_missing_ninja_says_what_to_install(not_loaded, monkeypatch, tmp_path):
    compiler = subprocess.check_output(["sh", "-c", "command -v c++"], text=True).strip()
    monkeypatch.setenv("CXX", compiler)  # the compiler stays reachable by absolute path
    _hide_ninja(monkeypatch, tmp_path)
    assert "pip install ninja" in build.unavailable_reason()
    with pytest.raises(build.ExtensionUnavailable, match="pip install ninja"):
        build.load()


def test_backend_raises_the_build_reason_and_never_falls_back(not_loaded, monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    _hide_ninja(monkeypatch, tmp_path)
    q, k, v = make_qkv((1, 2, 8, 16), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="backend='ext' is not available on device cpu: no C\\+\\+ compiler"):
        causal_attention(q, k, v, backend="ext")


def test_jit_build_announces_the_first_compile_and_caches_per_environment(not_loaded, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FASTGPT_CACHE_DIR", str(tmp_path))
    calls = []
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw))
    build._jit_build()
    err = capsys.readouterr().err
    assert "fastgpt: compiling the C++ extension (first use" in err
    (kw,) = calls
    assert kw["build_directory"].startswith(str(tmp_path)) and torch.__version__.split("+")[0] in kw["build_directory"]
    assert "-O3" in kw["extra_cflags"] and "-fopenmp" in kw["extra_cflags"]
    assert kw["is_python_module"] is False
    # A library newer than the sources: no message (cpp_extension and ninja then do nothing). A
    # whole shared library stands in for it: an empty or truncated one is removed for ninja to relink.
    shutil.copyfile(torch._C.__file__, tmp_path / kw["build_directory"] / f"{build.JIT_NAME}.so")
    build._jit_build()
    assert "compiling" not in capsys.readouterr().err


def test_import_fastgpt_compiles_nothing():
    # The ext backend's reasons and dtypes are asked without loading; the ops module is not imported.
    code = ("import fastgpt, fastgpt.ext, sys, torch; names = fastgpt.backend_names(); "
            "assert 'ext' in names, names; from fastgpt.ext import build; "
            "from fastgpt.attention import get_backend; b = get_backend('ext'); "
            "from fastgpt.attention import AttentionCall; b.backend_refusal(AttentionCall.like(torch.empty(1, 1, 1, 8))); "
            "b.unavailable_reason(torch.device('cpu')); "
            "b.empty_cache(); assert not build.is_loaded() and 'fastgpt.ext.ops' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "FASTGPT_EXT_BUILD": "jit"})


def _setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastgpt_setup", build.REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the build, does not run setup()
    return module


def test_setup_py_builds_the_same_sources_ahead_of_time(monkeypatch):
    monkeypatch.delenv("FASTGPT_NO_AOT", raising=False)
    monkeypatch.delenv("FASTGPT_CPU_CAPABILITY", raising=False)
    (extension,), cmdclass = _setup_module()._extension_build()
    assert extension.name == "fastgpt._C" and "build_ext" in cmdclass
    assert sorted(extension.sources) == sorted(f"csrc/{s}" for s in build.SOURCES)
    assert all((build.REPO / s).is_file() for s in extension.sources)
    assert extension.extra_compile_args["cxx"] == build.compile_flags(build.cpu_capability())


def test_setup_py_refuses_an_unknown_instruction_set(monkeypatch):
    monkeypatch.setenv("FASTGPT_CPU_CAPABILITY", "AVX1024")
    with pytest.raises(SystemExit, match="FASTGPT_CPU_CAPABILITY='AVX1024'"):
        _setup_module()._extension_build()


def _as_cuda_torch(monkeypatch):
    """This process as if torch were a CUDA build with a CUDA toolkit (nothing is compiled)."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.delenv("FASTGPT_EXT_CUDA", raising=False)


def test_cpu_only_torch_builds_and_accepts_no_cuda():
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    assert not build.builds_cuda()
    assert "CPU-only build" in build.cuda_unavailable_reason()


def test_jit_build_adds_the_cuda_binding_when_torch_has_cuda(not_loaded, monkeypatch, tmp_path):
    _as_cuda_torch(monkeypatch)
    monkeypatch.setenv("FASTGPT_CACHE_DIR", str(tmp_path))
    calls = []
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw))
    build._jit_build()
    (kw,) = calls
    assert kw["sources"][-1].endswith("csrc/cuda/binding.cu") and len(kw["sources"]) == len(build.SOURCES) + 1
    assert kw["extra_cuda_cflags"] == build.cuda_flags()
    assert {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"} <= set(build.cuda_flags())
    # a CPU-only build of the same environment lives in another directory
    monkeypatch.setenv("FASTGPT_EXT_CUDA", "0")
    build._jit_build()
    assert "binding.cu" not in " ".join(calls[1]["sources"]) and calls[1]["build_directory"] != kw["build_directory"]


def test_setup_py_builds_the_cuda_binding_when_torch_has_cuda(monkeypatch):
    _as_cuda_torch(monkeypatch)
    monkeypatch.delenv("FASTGPT_NO_AOT", raising=False)
    monkeypatch.delenv("FASTGPT_CPU_CAPABILITY", raising=False)
    (extension,), _ = _setup_module()._extension_build()
    assert sorted(extension.sources) == sorted(f"csrc/{s}" for s in (*build.SOURCES, *build.CUDA_SOURCES))
    assert all((build.REPO / s).is_file() for s in extension.sources)
    assert extension.extra_compile_args["nvcc"] == build.cuda_flags()


def test_cuda_is_refused_until_every_attention_op_has_a_cuda_kernel(monkeypatch):
    _as_cuda_torch(monkeypatch)
    monkeypatch.setattr(build, "is_loaded", lambda: True)  # the ops registered ...
    monkeypatch.setattr(build, "ops_without_cuda_kernels", lambda: ["causal_softmax"])  # ... one without CUDA
    reason = build.cuda_unavailable_reason()
    assert reason is not None and "no CUDA kernels for causal_softmax" in reason
    monkeypatch.setattr(build, "ops_without_cuda_kernels", lambda: [])
    assert build.cuda_unavailable_reason() is None


def test_a_stale_ahead_of_time_build_is_refused_by_name(monkeypatch):
    # fastgpt._C built before an op was added: importing it has registered the namespace, so no
    # JIT build can load beside it; the error names the missing op and the way out
    monkeypatch.delenv("FASTGPT_EXT_BUILD", raising=False)
    fake = types.ModuleType("fastgpt._C")
    fake.cpu_capability = build.cpu_capability()
    monkeypatch.setitem(sys.modules, "fastgpt._C", fake)
    monkeypatch.setattr(build, "REGISTERED_OPS", ())
    assert build._aot_module() is fake
    monkeypatch.setattr(build, "REGISTERED_OPS", ("op_from_the_future",))
    with pytest.raises(build.ExtensionUnavailable,
                       match=r"fastgpt._C is older than this source tree: it lacks fastgpt::op_from_the_future; rebuild"):
        build._aot_module()


def test_registered_ops_lists_every_schema_of_registration_cpp():
    source = (build.CSRC / "registration.cpp").read_text()
    assert sorted(re.findall(r'm\.def\("(\w+)\(', source)) == sorted(build.REGISTERED_OPS)
