"""Build script. Metadata lives in pyproject.toml; this file exists for the compiled extension.

The C++/CUDA extension in csrc/ is built just in time on first use by default. The ahead-of-time
build will be added here (CppExtension, or CUDAExtension when CUDA is present) once csrc/ exists.
"""

from setuptools import setup

setup()
