"""The process-wide switches that narrow the instruction sets of the CPU kernels
(fastgpt.ext.cpu_isa, cpu_isa_settings; csrc/cpu/isa.h): what they report, that the context manager
restores them (after an exception too), that they change what runs, and that the environment
variables they replace (FASTGPT_CPU_AMX, FASTGPT_CPU_AVX512BF16) no longer change anything. The
tests that need AMX-BF16 skip on CPUs without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastgpt.machine.cpu_features import bf16_matrix_units

ext_ops = pytest.importorskip("fastgpt.ext.ops")  # builds or loads the extension
ops = torch.ops.fastgpt

REPO = Path(__file__).resolve().parent.parent
AMX_HERE = bf16_matrix_units() == "AMX"  # PyTorch's CPU detection, independent of the switches
needs_amx = pytest.mark.skipif(not AMX_HERE, reason="this CPU has no AMX-BF16: the switch has nothing to turn off")
DEFAULT = {"amx": True, "avx512bf16": True}  # every switch on: each feature is used where the CPU has it
# The environment variables that once picked kernel paths behind the registry's back (the ISA
# switches, the flash/packed choice, the GEMM of the build): the registry and fastgpt.ext.cpu_isa say it now.
GONE = ("FASTGPT_CPU_AMX", "FASTGPT_CPU_AVX512BF16", "FASTGPT_CPU_FLASH", "FASTGPT_EXT_BLAS")


def allowed() -> dict[str, bool]:
    return {name: s["allowed"] for name, s in ext_ops.cpu_isa_settings().items()}


@pytest.fixture(autouse=True)
def _switches_on():
    """Every test starts and ends with the switches at their defaults (a failing test leaves none off)."""
    ops.set_cpu_isa(True, True)
    yield
    ops.set_cpu_isa(True, True)


def test_settings_say_what_is_allowed_available_and_used():
    settings = ext_ops.cpu_isa_settings()
    assert set(settings) == {"amx", "avx512bf16"}
    for name, s in settings.items():
        assert set(s) == {"allowed", "available", "used"}, name
        assert s["allowed"] is True and s["used"] == s["available"], name
    assert settings["amx"]["available"] == AMX_HERE
    if AMX_HERE:  # every CPU with AMX-BF16 has AVX512-BF16
        assert settings["avx512bf16"]["available"] or torch.backends.cpu.get_cpu_capability() != "AVX512"


def test_the_op_sets_the_given_switches_and_returns_the_previous_ones():
    assert tuple(ops.set_cpu_isa()) == (True, True)  # no arguments: a read
    assert tuple(ops.set_cpu_isa(False, None)) == (True, True)
    assert allowed() == {"amx": False, "avx512bf16": True}
    assert tuple(ops.set_cpu_isa(None, False)) == (False, True)
    assert tuple(ops.set_cpu_isa(True, True)) == (False, False)
    assert allowed() == DEFAULT


def test_amx_off_runs_the_float32_tiles():
    with ext_ops.cpu_isa(amx=False):
        assert allowed() == {"amx": False, "avx512bf16": True}
        assert not ext_ops.cpu_isa_settings()["amx"]["used"]
        for D in (2, 64, 128):
            assert ext_ops.cpu_bf16_products(D) == "float32 tiles"
            assert not ops.cpu_bf16_uses_amx(D)
        # the products still run, on the other path
        q = torch.randn(1, 2, 70, 64).bfloat16()
        torch.testing.assert_close(ops.causal_matmul_nt(q, q).float(), ext_ops.causal_matmul_nt(q.float(), q.float()),
                                   rtol=2**-7, atol=1e-2)
    assert allowed() == DEFAULT
    assert ext_ops.cpu_bf16_products(64) == ("AMX" if AMX_HERE else "float32 tiles")


def test_the_block_restores_the_settings_after_an_exception():
    with ext_ops.cpu_isa(avx512bf16=False):
        before = allowed()
        with pytest.raises(RuntimeError, match="inside the block"):
            with ext_ops.cpu_isa(amx=False, avx512bf16=True):
                assert allowed() == {"amx": False, "avx512bf16": True}
                raise RuntimeError("inside the block")
        assert allowed() == before == {"amx": True, "avx512bf16": False}
    assert allowed() == DEFAULT


def test_none_leaves_a_switch_as_it_is_and_blocks_nest():
    with ext_ops.cpu_isa(amx=False):
        with ext_ops.cpu_isa():
            assert allowed() == {"amx": False, "avx512bf16": True}
        with ext_ops.cpu_isa(avx512bf16=False):
            assert allowed() == {"amx": False, "avx512bf16": False}
        assert allowed() == {"amx": False, "avx512bf16": True}
    assert allowed() == DEFAULT


@pytest.mark.parametrize("kwargs", [{"amx": 0}, {"amx": 1}, {"amx": "0"}, {"amx": True, "avx512bf16": 0}],
                         ids=["amx-int-0", "amx-int-1", "amx-str-0", "avx512bf16-int-0"])
def test_only_bools_are_taken(kwargs):
    with pytest.raises(TypeError, match="must be True, False or None"):
        ext_ops.cpu_isa(**kwargs)
    assert allowed() == DEFAULT


def test_the_environment_variables_change_nothing(monkeypatch):
    """FASTGPT_CPU_AMX=0 and FASTGPT_CPU_AVX512BF16=0 used to switch paths at every call; the
    switches are the only way now."""
    for name in GONE:
        monkeypatch.setenv(name, "0")
    assert allowed() == DEFAULT
    assert ops.cpu_bf16_uses_amx(64) == AMX_HERE
    assert ext_ops.cpu_bf16_products(64) == ("AMX" if AMX_HERE else "float32 tiles")


def test_no_source_reads_the_environment_variables():
    """Holds on every CPU, where the behavioural check above needs AMX to tell the two apart."""
    sources = [p for p in (REPO / "csrc").rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh")]
    sources += [*(REPO / "fastgpt").rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]
    readers = [str(p.relative_to(REPO)) for p in sources if any(name in p.read_text(encoding="utf-8") for name in GONE)]
    assert readers == []


@needs_amx
def test_amx_off_takes_the_bfloat16_flash_kernels_away():
    """The bfloat16 flash kernels run on AMX only: with the switch off the op refuses bfloat16."""
    q = torch.randn(1, 2, 8, 64).bfloat16()
    ops.causal_attention_flash_forward(q, q, q, 0.125, 0.0, 0, 0)
    with ext_ops.cpu_isa(amx=False):
        with pytest.raises(RuntimeError, match="bfloat16 where it runs on AMX"):
            ops.causal_attention_flash_forward(q, q, q, 0.125, 0.0, 0, 0)
