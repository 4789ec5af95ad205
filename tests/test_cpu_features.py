"""fastgpt.machine.cpu_features: the bf16 matrix units PyTorch detects, the warning without them, and where
it shows (the GEMM probe's line, a bf16 training run on CPU). The CPU's answers are monkeypatched:
the machine running the tests has whichever CPU it has."""

from __future__ import annotations

import pytest
import torch

from fastgpt.machine import cpu_features
from fastgpt.bench.gemm_probe import probe_line


def _cpu(monkeypatch, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


@pytest.mark.parametrize("amx, avx512_bf16, units", [(True, True, "AMX"), (False, True, "AVX512-BF16"),
                                                      (False, False, None)])
def test_units_and_warning(monkeypatch, amx, avx512_bf16, units):
    _cpu(monkeypatch, amx, avx512_bf16)
    assert cpu_features.bf16_matrix_units() == units
    warning = cpu_features.bf16_cpu_warning()
    if units is None:
        assert "no bfloat16 matrix instructions" in warning and "--dtype fp32" in warning
        assert torch.backends.cpu.get_cpu_capability() in warning  # names the CPU's instruction set
    else:
        assert warning is None


def test_probe_line_notes_software_bf16():
    fp32 = {"dtype": "float32", "n": 64, "reps": 1, "gflops": 80.0}
    bf16 = {"dtype": "bfloat16", "n": 64, "reps": 1, "gflops": 1.0}
    plain = probe_line({"float32": fp32, "bfloat16": {**bf16, "matrix_units": "AMX"}})
    assert "bfloat16 1 GFLOP/s" in plain and "software" not in plain
    noted = probe_line({"float32": fp32, "bfloat16": {**bf16, "matrix_units": None}})
    assert "runs in software" in noted
    # an older JSON without the field renders as before
    assert "software" not in probe_line({"float32": fp32, "bfloat16": bf16})


def test_bf16_training_on_such_a_cpu_warns(monkeypatch, tmp_path, capsys):
    from fastgpt.run.config import make_configs
    from fastgpt.run.trainer import Trainer

    _cpu(monkeypatch, False, False)
    overrides = {"device": "cpu", "dtype": "bf16", "progress": False, "out_dir": str(tmp_path), "max_iters": 1,
                 "eval_interval": 1, "eval_iters": 1, "batch_size": 2, "block_size": 8, "n_layer": 1, "n_head": 2,
                 "n_embd": 16, "sample_tokens": 0}
    Trainer(*make_configs("cpu", overrides)).run()
    assert "fastgpt: warning: --dtype bf16: this CPU" in capsys.readouterr().out
