"""`fastgpt bench decode`: one long-context decode step per kernel path, split-KV or not."""

import json

from fastgpt.cli import main


def test_decode_bench_times_each_path_and_names_the_refusals(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["bench", "decode", "--kv-lens", "64", "256", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
            "--reps", "2", "--backends", "naive", "ext.cpu_split_kv", "ext.cpu_flash_amx", "--out-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "decode.json").read_text())
    timed = {(r["T_k"], r["path"]) for r in result["rows"] if "median_s" in r}
    assert {(64, "naive"), (256, "naive")} <= timed
    refused = [r for r in result["rows"] if "refused" in r]
    assert all(r["path"] != "naive" for r in refused)
    assert (out / "decode.png").stat().st_size > 0
    assert "device" in result["environment"] and "GB/s" in capsys.readouterr().out


def test_decode_bench_refuses_bad_heads_and_foreign_flags(tmp_path, capsys):
    assert main(["bench", "decode", "--heads", "3", "--kv-heads", "2", "--out-dir", str(tmp_path)]) == 2
    assert "--kv-heads 2 must divide --heads 3" in capsys.readouterr().err
    assert main(["bench", "decode", "--steps", "3", "--out-dir", str(tmp_path)]) == 2
    assert "--steps applies to bench train, train --profile, packing; bench decode would ignore it" in \
        capsys.readouterr().err
    assert main(["bench", "packing", "--backends", "naive", "sdpa", "--out-dir", str(tmp_path)]) == 2
    assert "packing runs one attention backend in both modes" in capsys.readouterr().err


def test_paged_decode_bench_times_each_way_of_each_path(tmp_path, capsys):
    # --page-size: a step of --batch-size sequences over a paged cache, three ways per path
    out = tmp_path / "out"
    argv = ["bench", "decode", "--page-size", "16", "--batch-size", "3", "--kv-lens", "40", "--heads", "2",
            "--kv-heads", "1", "--head-dim", "16", "--reps", "2", "--backends", "naive", "ext.cpu_packed",
            "--out-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "decode_paged_P16.json").read_text())
    timed = {(r["path"], r["way"]) for r in result["rows"] if "median_s" in r}
    assert timed == {("naive", "paged call"), ("naive", "gather, then varlen"), ("naive", "contiguous")}
    refused = [r for r in result["rows"] if "refused" in r]
    assert [r["path"] for r in refused] == ["ext.cpu_packed"] and "paged" in refused[0]["refused"]
    assert result["config"]["batch"] == 3 and (out / "decode_paged_P16.png").stat().st_size > 0
    assert "x contiguous" in capsys.readouterr().out


def test_paged_decode_bench_refuses_bad_page_sizes_and_a_batch_without_pages(tmp_path, capsys):
    assert main(["bench", "decode", "--page-size", "24", "--out-dir", str(tmp_path)]) == 2
    assert "--page-size=24 is not supported: a page holds a multiple of 16 positions" in capsys.readouterr().err
    assert main(["bench", "decode", "--batch-size", "4", "--out-dir", str(tmp_path)]) == 2
    assert "--batch-size times the paged decode step: give --page-size too" in capsys.readouterr().err
