"""Build script. Metadata lives in pyproject.toml; this file exists for the compiled extension.

The C++ extension in csrc/ is built just in time on first use by default (fastgpt/ext/build.py).
Installing with torch already present and without build isolation also builds it ahead of time,
as the module fastgpt._C:

    pip install --no-build-isolation .        (or -e . for a checkout)

torch is deliberately not in build-system.requires (pip would fetch a multi-GB CUDA torch into an
isolated build environment), so an isolated build, or one without torch, builds no extension and
the JIT path takes over. The CPU kernels are compiled for this machine's instruction set (as torch
reports it), or for FASTGPT_CPU_CAPABILITY=AVX2|AVX512|DEFAULT when building for other machines.
With a CUDA build of torch and a CUDA toolkit (CUDA_HOME) it is a CUDAExtension that also holds
the CUDA kernels (build.CUDA_SOURCES; FASTGPT_EXT_CUDA=0 leaves them out).
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

REPO = Path(__file__).resolve().parent


def _extension_build():
    """(ext_modules, cmdclass) for the ahead-of-time build, or nothing without torch."""
    if os.environ.get("FASTGPT_NO_AOT") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    # The flags and sources of the JIT build, from the one place that lists them (no fastgpt import:
    # the package may not be importable yet).
    spec = importlib.util.spec_from_file_location("_fastgpt_build", REPO / "fastgpt" / "ext" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)

    capability = os.environ.get("FASTGPT_CPU_CAPABILITY", build.cpu_capability())
    if capability not in build.ISA_FLAGS:
        raise SystemExit(f"FASTGPT_CPU_CAPABILITY={capability!r}; choose one of {', '.join(build.ISA_FLAGS)}")
    sources = [f"csrc/{s}" for s in build.SOURCES]
    kwargs = dict(extra_compile_args={"cxx": build.compile_flags(capability)}, extra_link_args=["-fopenmp"])
    if build.builds_cuda():
        kwargs["extra_compile_args"]["nvcc"] = build.cuda_flags()
        ext = CUDAExtension("fastgpt._C", sources + [f"csrc/{s}" for s in build.CUDA_SOURCES], **kwargs)
    else:
        ext = CppExtension("fastgpt._C", sources, **kwargs)
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":  # pip's build backends run this file as __main__; tests import it
    ext_modules, cmdclass = _extension_build()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
