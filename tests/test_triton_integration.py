"""The Triton backend inside fastgpt: errors that name the limit, torch.compile seeing one op, the
shipped configs being valid launches."""

import os
import subprocess
import sys

import pytest
import torch

from fastgpt.attention import causal_attention, get_backend
from fastgpt.verify.parity import forward_backward, make_qkv

pytest.importorskip("fastgpt.kernels.flash_attention_ops", reason="triton is not installed")
from fastgpt.kernels import flash_attention_configs as cfg  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
interpreter_only = pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU interpreter path")


def triton_attn(q, k, v, dropout_p=0.0):
    return causal_attention(q, k, v, dropout_p=dropout_p, backend="triton")


def test_float64_is_refused():
    q = torch.randn(1, 1, 4, 16, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64 is not supported"):
        triton_attn(q, q, q)


@interpreter_only
def test_bfloat16_is_refused_in_the_interpreter():
    q = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="interpreter computes bfloat16 wrongly"):
        triton_attn(q, q, q)


@interpreter_only
def test_cpu_without_interpreter_says_how_to_enable_it():
    code = ("import torch, fastgpt\n"
            "q = torch.randn(1, 1, 4, 16)\n"
            "try:\n"
            "    fastgpt.causal_attention(q, q, q, backend='triton')\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_registering_the_backend_does_not_import_triton():
    code = ("import sys, torch, fastgpt\n"
            "assert 'triton' in fastgpt.backend_names()\n"
            "fastgpt.causal_attention(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), backend='naive')\n"
            "print('triton' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_torch_compile_sees_one_op_and_no_graph_break():
    get_backend("triton")  # the registry's first use imports its modules: a model does this when built
    q, k, v = make_qkv((2, 2, 64, 32), torch.float32, DEVICE)

    def f(q, k, v):
        return triton_attn(q, k, v, dropout_p=0.1) * 2

    explained = torch._dynamo.explain(f)(q, k, v)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert explained.graphs[0].code.count("torch.ops.fastgpt.flash_attention_fwd") == 1

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    got = forward_backward(compiled, (q, k, v), torch.ones_like(q))
    torch.manual_seed(0)
    want = forward_backward(f, (q, k, v), torch.ones_like(q))
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_every_shipped_config_is_valid():
    for kernel in cfg.KERNELS:
        for arch, by_dim in [*cfg.SHIPPED[kernel].items(), *cfg.SHIPPED_FP32[kernel].items()]:
            for dclass, configs in by_dim.items():
                assert configs, (kernel, arch, dclass)
                for c in configs:
                    assert cfg.keep(kernel, c), (kernel, arch, dclass, c)
    for kernel, c in cfg.INTERPRETER_CONFIGS.items():
        assert cfg.keep(kernel, c), (kernel, c)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_kernels_folder_does_not_shadow_an_installed_kernels_package():
    # kernels/ installs as fastgpt.kernels; from the repository root (on sys.path first, as with
    # `python -c` or `python -m pytest` there) a bare `import kernels` must still give the installed
    # package of that name (Hugging Face's, which transformers 5 imports), or fail as without it
    code = ("try:\n"
            "    import kernels\n"
            "    print(kernels.__file__)\n"
            "except ModuleNotFoundError as e:\n"
            "    print('absent', e.name)\n"
            "import fastgpt.kernels.flash_attention_configs as c\n"
            "print(c.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    imported, configs = out.stdout.strip().splitlines()[-2:]
    ours = os.path.join(REPO, "kernels", "__init__.py")
    assert imported == "absent kernels" or ("site-packages" in imported and imported != ours), imported
    assert configs == "fastgpt.kernels.flash_attention_configs"


def test_the_transformers_integration_imports_from_the_repository_root():
    pytest.importorskip("transformers", reason="transformers is not installed")
    code = "import kernels, fastgpt.integrations.transformers; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "site-packages" in out.stdout, out.stdout + out.stderr[-3000:]


@pytest.mark.parametrize("version, refused", [("3.3.1", True), ("3.5.1", True), ("3.6.0", False), ("3.9.0", False)])
def test_a_triton_older_than_the_tested_range_is_named(version, refused, monkeypatch):
    from fastgpt.attention import triton_backend

    monkeypatch.setattr(triton_backend, "_triton_version", lambda: version)
    reason = triton_backend.unavailable_reason(torch.device("cpu"))
    if refused:
        assert reason == (f"triton {version} is older than 3.6, the oldest release fastgpt's kernels are tested with; "
                          "pip install 'triton>=3.6,<3.10'")
    else:
        assert reason is None or "older than" not in reason
