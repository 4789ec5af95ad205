"""The benchmark harness end to end, CI-sized: structure and finiteness, never speed."""

import json
import math

import pytest

from fastgpt.benchmarks.attention import AttentionSweep, run_attention_benchmark
from fastgpt.benchmarks.common import attention_flops
from fastgpt.timing import percentile
from fastgpt.benchmarks.report import attention_markdown, train_markdown, write_results
from fastgpt.benchmarks.train import run_train_benchmark
from fastgpt.cli import main


def test_attention_flops_convention():
    # 4·B·H·T²·D forward, halved for causal; backward 2.5× forward
    assert attention_flops(1, 1, 8, 4, "forward") == 4 * 64 * 4 / 2
    assert attention_flops(2, 3, 8, 4, "forward+backward") == 3.5 * attention_flops(2, 3, 8, 4, "forward")
    with pytest.raises(ValueError, match="mode must be one of"):
        attention_flops(1, 1, 8, 4, "sideways")


def test_percentile():
    assert percentile([3, 1, 2, 4, 5], 50) == 3
    assert percentile([1, 2], 20) == pytest.approx(1.2)


def test_attention_benchmark_smoke(tmp_path):
    sweep = AttentionSweep.smoke("cpu")
    sweep.backends = ["naive", "sdpa"]
    result = run_attention_benchmark(sweep, progress=False)
    records = result["records"]
    assert len(records) == 2 * len(sweep.seq_lens) * len(sweep.modes) * len(sweep.dropouts)
    for r in records:
        assert r["status"] == "ok", r
        for key in ("median_s", "p20_s", "p80_s", "tflops", "tokens_per_s", "speedup_vs_naive"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert r["peak_memory_bytes"] is not None and r["peak_memory_bytes"] >= 0
        assert r["B"] * r["T"] <= sweep.tokens
    assert {"device", "torch", "commit", "timestamp"} <= set(result["environment"])

    files = write_results(result, tmp_path, "attention")
    assert json.loads(files["json"].read_text())["records"] == records
    assert len(files["csv"].read_text().splitlines()) == len(records) + 1
    table = attention_markdown(result)
    assert "| T | B | naive | sdpa |" in table and "forward+backward, dropout 0.2" in table


def test_bench_cli_writes_table_files_and_plot(tmp_path, capsys):
    assert main(["bench", "attention", "--smoke", "--backends", "naive", "sdpa", "--modes", "forward",
                 "--dropouts", "0", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    assert "**forward, dropout 0.0, float32**" in capsys.readouterr().out
    png = tmp_path / "attention_float32.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_train_benchmark_smoke(small_corpus):
    result = run_train_benchmark("cpu", "cpu", steps=1, reps=2, warmup=0, backends=["naive", "sdpa"],
                                 data=str(small_corpus), progress=False)
    assert [r["backend"] for r in result["records"]] == ["naive", "sdpa"]
    for r in result["records"]:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and math.isfinite(r["median_s"])
        assert r["mfu"] is None  # no known peak for a CPU
    assert "| naive |" in train_markdown(result)


def test_cpu_peak_memory_sees_matrices_a_buffer_pool_would_hide():
    # ext keeps freed T×T buffers in a pool; the measure must release it first, or a second call
    # would look free. One (B, H, T, T) fp32 matrix here is 8 MiB; fwd+bwd needs several.
    import torch

    from fastgpt.attention import causal_attention
    from fastgpt.benchmarks.common import peak_memory_bytes

    q = torch.randn(2, 4, 512, 16, requires_grad=True)
    call = lambda: torch.autograd.grad(causal_attention(q, q, q, backend="ext"), (q,), torch.ones_like(q))
    call()
    one_matrix = 2 * 4 * 512 * 512 * 4
    assert peak_memory_bytes(call, torch.device("cpu")) >= one_matrix


def test_emulated_backend_is_reported_not_timed():
    # conftest runs Triton in its interpreter on a CPU machine: the kernel is emulated there
    import torch

    from fastgpt.attention import get_backend

    if not get_backend("triton").emulated(torch.device("cpu")):
        pytest.skip("Triton is not interpreted in this session")
    sweep = AttentionSweep.smoke("cpu")
    sweep.backends, sweep.seq_lens, sweep.modes, sweep.dropouts = ["naive", "triton"], [16], ["forward"], [0.0]
    triton = next(r for r in run_attention_benchmark(sweep, progress=False)["records"] if r["backend"] == "triton")
    assert triton["status"].startswith("emulated") and "median_s" not in triton


def test_generate_benchmark_cli_smoke(tmp_path, capsys):
    # a tiny model: the harness's structure, never its speed
    assert main(["bench", "generate", "--smoke", "--backends", "sdpa", "--reps", "1", "--out-dir", str(tmp_path),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| sdpa | torch | short | cache | 10 |" in out and "| sdpa | skinny | short | cache | 10 |" in out
    # what `fastgpt sample` runs by default here, said beside the table
    assert "`fastgpt sample`'s defaults here: attention auto → " in out and "sdpa (decode over the cache)" in out
    result = json.loads((tmp_path / "generate.json").read_text())
    assert result["auto"]["attention_cached"] == "sdpa" and result["auto"]["linear"] in ("torch", "skinny")
    variants = [(r["case"], r["linear"], r["variant"]) for r in result["records"]]
    assert variants == [("short", kernel, variant) for kernel in ("torch", "skinny") for variant in ("no cache", "cache")] \
        + [("long", kernel, variant) for kernel in ("torch", "skinny") for variant in ("cache exact", "cache window")]
    assert (tmp_path / "generate.png").stat().st_size > 10_000
    for r in result["records"]:
        assert r["status"] == "ok" and math.isfinite(r["tokens_per_s"]) and len(r["seconds"]) == 1


def test_skinny_linear_benchmark_smoke(tmp_path, capsys):
    from fastgpt.benchmarks import skinny_linear

    skinny_linear.main(["--preset", "cpu", "--reps", "1", "--rows", "1", "5", "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert "| rows M | torch ms" in out and "| skinny | sum |" in out and "\n| 5 | " in out
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["rows"] for r in rows] == [1, 5] and all(r["torch_over_skinny"] > 0 for r in rows)


def test_ext_cpu_benchmark_smoke(tmp_path, capsys):
    # one repetition (about 12 s): the table's structure, never its speed
    from fastgpt.benchmarks import ext_cpu

    ext_cpu.main(["--reps", "1", "--json", str(tmp_path / "e.json")])
    out = capsys.readouterr().out
    assert "| forward+backward | 16, 6, 256, 256, 64 | 0.2 |" in out and "| decode forward | 1, 6, 1, 256, 64 | 0.0 |" in out
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["forward+backward"] * 4 + ["decode forward"] * 2
    assert all(r["sdpa_over_ext"] > 0 and len(r["raw_s"]["ext"]) == (1 if r["mode"] == "forward+backward" else 20)
               for r in rows)
