"""Test-session setup shared by every test file.

TRITON_INTERPRET must be set before anything imports triton-jitted code, so it is set here, at
collection time, on machines without a GPU: the Triton kernels then run on CPU tensors in the
interpreter. On a GPU machine the variable is left as the user set it.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The test process runs `fastgpt train` in-process many times: it keeps glibc's malloc as it is
# (tests/test_host_memory.py checks the tuning in fresh processes and through a fake libc).
os.environ.setdefault("FASTGPT_KEEP_FREED_MEMORY", "0")

REPO = Path(__file__).resolve().parent.parent
# CI and the developers' machines keep the corpus beside the checkout; FASTGPT_DATA overrides.
SHARED_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """The real tiny-shakespeare corpus; tests that need it are skipped, with a reason, without it."""
    path = Path(os.environ.get("FASTGPT_DATA", SHARED_CORPUS))
    if not path.is_file():
        pytest.skip(f"tiny-shakespeare not found at {path}; set FASTGPT_DATA to its path")
    return path


@pytest.fixture()
def small_corpus(tmp_path) -> Path:
    """A few KB of text with a small vocabulary, for fast end-to-end tests."""
    text = "".join(f"To be, or not to be, that is the question {i % 7}.\n" for i in range(200))
    path = tmp_path / "small.txt"
    path.write_text(text, encoding="utf-8")
    return path
