"""The transformers Llama benchmark (benchmarks/hf_llama.py) end to end, CI-sized: structure and
finiteness, never speed."""

import json
import math

import pytest

pytest.importorskip("transformers", minversion="5.0",
                    reason='transformers 5.x is not installed: pip install "fastgpt[hf]"')

from fastgpt.attention import available_backends  # noqa: E402
from fastgpt.benchmarks.hf_llama import HFLlamaBench, main, markdown, run_hf_llama_benchmark  # noqa: E402


def test_hf_llama_benchmark_smoke():
    settings = HFLlamaBench.smoke()
    settings.backends = ["naive", "auto", "ext", "triton"]
    result = run_hf_llama_benchmark(settings)
    records = {r["provider"]: r for r in result["records"]}
    assert list(records) == ["eager", "sdpa", "fastgpt naive", "fastgpt auto", "fastgpt ext", "fastgpt triton"]
    timed = ["eager", "sdpa", "fastgpt naive", "fastgpt auto"] + (["fastgpt ext"] if "ext" in available_backends("cpu") else [])
    for name in timed:
        r = records[name]
        assert r["status"] == "ok", r
        assert math.isfinite(r["median_s"]) and r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["tokens_per_s"] > 0
        assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] >= 0
        assert r["loss_error"] < 1e-4 and len(r["raw_s"]) == settings.reps
    assert records["fastgpt auto"]["attention"].startswith("fastgpt auto (→ ")
    # Triton only emulated on CPU (its interpreter), or not runnable here: listed with its reason, not timed
    assert "median_s" not in records["fastgpt triton"] and records["fastgpt triton"]["status"] != "ok"
    table = markdown(result)
    assert "| transformers sdpa |" in table and "1.00×" in table


def test_hf_llama_benchmark_command_writes_json(tmp_path, capsys):
    path = tmp_path / "hf_llama.json"
    assert main(["--smoke", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "cpu_capability:" in out and "| fastgpt naive |" in out
    result = json.loads(path.read_text())
    assert {"device", "torch", "transformers", "commit"} <= set(result["environment"])
    assert result["settings"]["layers"] == HFLlamaBench.smoke().layers
