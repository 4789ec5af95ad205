"""The benchmark harness end to end, CI-sized: structure and finiteness, never speed."""

import json
import math

import pytest

from fastgpt.bench.attention import AttentionSweep, run_attention_benchmark
from fastgpt.bench.common import attention_flops
from fastgpt.bench.gemm_probe import fraction_of_gemm, gemm_flops, probe_gemm
from fastgpt.machine.timing import percentile
from fastgpt.bench.report import attention_markdown, train_markdown, write_results
from fastgpt.bench.train import run_train_benchmark
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


def test_gemm_probe_measures_one_square_product():
    probe = probe_gemm("float32", "cpu", n=64, reps=3)
    assert (probe["dtype"], probe["n"], probe["reps"]) == ("float32", 64, 3)
    assert probe["p20_s"] <= probe["median_s"] <= probe["p80_s"]
    assert probe["gflops"] == pytest.approx(gemm_flops(64) / probe["median_s"] / 1e9)
    assert gemm_flops(64) == 2 * 64 ** 3
    assert fraction_of_gemm(probe["gflops"] * 0.5e9, probe) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="n >= 1 and reps >= 1; got n=0"):
        probe_gemm("float32", "cpu", n=0)


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
        # the cell's rate against the GEMM probe of the same run and dtype
        assert r["gemm_tflops"] == result["gemm_probe"]["float32"]["gflops"] / 1e3
        assert r["fraction_of_gemm"] == pytest.approx(r["tflops"] / r["gemm_tflops"])
    assert result["gemm_probe"]["float32"]["n"] == sweep.gemm_n
    assert {"device", "torch", "commit", "timestamp", "cpu_threads"} <= set(result["environment"])

    files = write_results(result, tmp_path, "attention")
    assert json.loads(files["json"].read_text())["records"] == records
    csv_lines = files["csv"].read_text().splitlines()
    assert len(csv_lines) == len(records) + 1
    assert {"fraction_of_gemm", "gemm_tflops", "env_device", "env_torch", "env_cpu_threads"} <= set(csv_lines[0].split(","))
    table = attention_markdown(result)
    assert "| T | B | naive | sdpa |" in table and "forward+backward, dropout 0.2" in table
    assert "GEMM probe (torch.mm, n = 128, median of 15, this run): float32 " in table
    first = next(r for r in records if r["backend"] == "sdpa")
    assert f"{first['tflops'] * 1e3:.3g} · {100 * first['fraction_of_gemm']:.0f}% · " in table


def test_attention_bench_dtype_flag_runs_bf16_with_its_own_probe(tmp_path, capsys):
    assert main(["bench", "attention", "--smoke", "--dtype", "bf16", "--backends", "naive", "sdpa", "--modes",
                 "forward+backward", "--dropouts", "0", "--seq-lens", "16", "--out-dir", str(tmp_path),
                 "--no-progress"]) == 0
    assert "**forward+backward, dropout 0.0, bfloat16** (median ms [p20–p80] · × naive · GFLOP/s · % of GEMM" \
        in capsys.readouterr().out
    result = json.loads((tmp_path / "attention.json").read_text())
    assert list(result["gemm_probe"]) == ["bfloat16"]
    assert all(r["status"] == "ok" and r["dtype"] == "bfloat16" and r["fraction_of_gemm"] > 0 for r in result["records"])
    assert main(["bench", "attention", "--smoke", "--dtype", "bf16", "--dtypes", "float32"]) == 2
    assert "--dtype bf16 and --dtypes float32 both name the sweep's dtypes" in capsys.readouterr().err


@pytest.mark.parametrize("amx", [True, False])
def test_attention_bench_says_where_ext_bf16_ran(tmp_path, capsys, amx):
    """An ext bfloat16 cell on CPU records which kernels it timed; cpu_isa(amx=False) forces the float32 tiles."""
    from fastgpt.ext import cpu_isa
    from fastgpt.machine.cpu_features import bf16_matrix_units

    with cpu_isa(amx=amx):
        assert main(["bench", "attention", "--smoke", "--dtype", "bf16", "--backends", "ext", "--modes", "forward",
                     "--dropouts", "0", "--seq-lens", "16", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    expected = "AMX" if amx and bf16_matrix_units() == "AMX" else "float32 tiles"
    records = json.loads((tmp_path / "attention.json").read_text())["records"]
    assert [r["kernel_detail"] for r in records if r["backend"] == "ext"] == [f"bfloat16 products on {expected}"]
    assert f"bfloat16 products on {expected}" in capsys.readouterr().out


@pytest.mark.parametrize("backend, expected", [("ext", "ext.cpu_flash"), ("ext.cpu_packed", "ext.cpu_packed")])
def test_attention_bench_records_the_kernel_path_that_ran(tmp_path, capsys, monkeypatch, backend, expected):
    """A cell records the kernel path the registry ran: float32 ext takes its flash path, and a
    named path runs itself; the table's notes say which, with the path's description."""
    import torch

    from fastgpt.attention import get_path

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # flash whatever the smoke sweep's head count
    assert main(["bench", "attention", "--smoke", "--backends", backend, "--modes", "forward+backward",
                 "--dropouts", "0", "--seq-lens", "16", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    records = json.loads((tmp_path / "attention.json").read_text())["records"]
    assert [r["kernel_path"] for r in records if r["backend"] == backend] == [expected]
    assert [r["kernel_path"] for r in records if r["backend"] == "naive"] == ["naive"]
    assert f"ran kernel path `{expected}`: {get_path(expected).description}" in capsys.readouterr().out


def test_a_backward_only_cell_records_the_path_its_forward_ran(tmp_path):
    # the timed calls replay one forward's graph: the record names the path that forward ran
    assert main(["bench", "attention", "--smoke", "--backends", "ext.cpu_packed", "--modes", "backward",
                 "--dropouts", "0", "--seq-lens", "16", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    records = json.loads((tmp_path / "attention.json").read_text())["records"]
    assert {r["backend"]: r["kernel_path"] for r in records} == {"naive": "naive", "ext.cpu_packed": "ext.cpu_packed"}


def test_bench_cli_writes_table_files_and_plot(tmp_path, capsys):
    assert main(["bench", "attention", "--smoke", "--backends", "naive", "sdpa", "--modes", "forward",
                 "--dropouts", "0", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    assert "**forward, dropout 0.0, float32**" in capsys.readouterr().out
    png = tmp_path / "attention_float32.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("dtype, probed", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_train_benchmark_smoke(small_corpus, dtype, probed):
    result = run_train_benchmark("cpu", "cpu", steps=1, reps=2, warmup=0, backends=["naive", "sdpa"],
                                 data=str(small_corpus), progress=False, dtype=dtype, gemm_n=64)
    assert [r["backend"] for r in result["records"]] == ["naive", "sdpa"]
    assert list(result["gemm_probe"]) == [probed] and result["dtype"] == dtype
    for r in result["records"]:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and math.isfinite(r["median_s"])
        assert r["mfu"] is None  # no known peak for a CPU
        assert r["backend"] in r["kernels"] and "linear.torch" in r["kernels"], r["kernels"]  # what the steps ran
        assert r["fraction_of_gemm"] == pytest.approx(r["gflops"] / result["gemm_probe"][probed]["gflops"])
    table = train_markdown(result)
    assert "| naive |" in table and f"dtype {dtype}" in table and f"this run): {probed} " in table


def test_cpu_peak_memory_sees_matrices_a_buffer_pool_would_hide(monkeypatch):
    # ext's materialised kernels keep freed T×T buffers in a pool; the measure must release it
    # first, or a second call would look free. One (B, H, T, T) fp32 matrix here is 8 MiB; fwd+bwd
    # needs several. (The float32 flash kernels store none: the packed path is named here.)
    import torch

    from fastgpt.attention import causal_attention
    from fastgpt.bench.common import peak_memory_bytes

    q = torch.randn(2, 4, 512, 16, requires_grad=True)
    call = lambda: torch.autograd.grad(causal_attention(q, q, q, backend="ext.cpu_packed"), (q,), torch.ones_like(q))
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
