"""The emulation tests' view of fastgpt.verify.cuda_emulation: no host compiler is a skip, with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastgpt.verify import cuda_emulation
from fastgpt.verify.cuda_emulation import CSRC, TSAN_FLAGS, TSAN_MAIN  # noqa: F401  (the tests' names)

HERE = Path(__file__).resolve().parent


def build(*args, **kwargs) -> Path:
    try:
        return cuda_emulation.build(*args, **kwargs)
    except cuda_emulation.NoCompiler as e:
        pytest.skip(str(e))
