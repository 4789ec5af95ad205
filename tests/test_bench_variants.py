"""`fastgpt bench attention --variants`: the option sets it times, their work, and the "× causal"
column; structure only, never speed."""

import pytest

from fastgpt.bench.attention import AttentionSweep, run_attention_benchmark
from fastgpt.bench.variants import Variant, parse_variants
from fastgpt.cli import main


def test_variants_parse_to_the_api_options():
    assert Variant.parse("causal").options(2, 3, "cpu") == {}
    assert Variant.parse("window:256").options(2, 3, "cpu") == {"window": (255, 0)}
    assert Variant.parse("bidirectional").options(2, 3, "cpu") == {"causal": False}
    assert Variant.parse("softcap:30").options(2, 3, "cpu") == {"softcap": 30.0}
    assert Variant.parse("sinks").options(2, 3, "cpu")["sinks"].shape == (3,)
    slopes = Variant.parse("alibi").options(2, 4, "cpu")["alibi_slopes"]
    assert slopes.tolist() == [0.25, 0.0625, 0.015625, 0.00390625]


@pytest.mark.parametrize("text", ["window", "window:0", "window:x", "softcap:-1", "sinks:2", "local", "causal:1"])
def test_a_bad_variant_is_refused_naming_it_and_the_forms(text):
    with pytest.raises(ValueError, match=f"--variants {text!r} is not a variant; the forms are"):
        Variant.parse(text)


def test_a_variant_named_twice_is_refused():
    with pytest.raises(ValueError, match="names a variant twice"):
        parse_variants(["causal", "window:4", "causal"])


def test_the_work_of_a_window_is_its_share_of_the_causal_pairs():
    assert Variant.parse("causal").work_vs_causal(8) == 1.0
    assert Variant.parse("window:8").work_vs_causal(8) == 1.0
    assert Variant.parse("window:1").work_vs_causal(4) == pytest.approx(4 / 10)  # the diagonal only
    assert Variant.parse("window:2").work_vs_causal(4) == pytest.approx(7 / 10)  # 1 + 2 + 2 + 2
    assert Variant.parse("bidirectional").work_vs_causal(4) == pytest.approx(16 / 10)
    # at long T a window of W costs about 2W/T of causal
    assert Variant.parse("window:256").work_vs_causal(8192) == pytest.approx(2 * 256 / 8192, rel=0.05)


def test_the_sweep_times_each_variant_and_records_its_multiple_of_causal():
    sweep = AttentionSweep.smoke("cpu")
    sweep.backends, sweep.modes, sweep.dropouts = ["naive", "sdpa"], ["forward"], [0.0]
    sweep.variants = ["causal", "window:8", "softcap"]
    records = run_attention_benchmark(sweep, progress=False)["records"]
    assert {r["variant"] for r in records} == {"causal", "window:8", "softcap"}
    for r in records:
        if r["variant"] == "causal" or r["status"] != "ok":
            assert "vs_causal" not in r
        else:
            assert r["vs_causal"] > 0
    # sdpa has no soft-capping: its cell says so by name, naive's is timed
    softcap = {r["backend"]: r for r in records if r["variant"] == "softcap" and r["T"] == 16}
    assert "soft-capping" in softcap["sdpa"]["status"] and softcap["naive"]["status"] == "ok"


def test_the_cli_takes_variants_and_refuses_them_elsewhere(tmp_path, capsys):
    assert main(["bench", "attention", "--smoke", "--backends", "naive", "--modes", "forward", "--dropouts", "0",
                 "--variants", "causal", "window:4", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "**forward, dropout 0.0, float32, window:4**" in out and "× causal" in out
    assert (tmp_path / "attention_variants_float32.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "attention", "--smoke", "--variants", "window:0", "--out-dir", str(tmp_path)]) == 2
    assert "--variants 'window:0' is not a variant" in capsys.readouterr().err
    assert main(["bench", "train", "--variants", "causal", "--out-dir", str(tmp_path)]) == 2
    assert "--variants applies to bench attention" in capsys.readouterr().err


def test_validate_max_t_caps_the_reference_check(tmp_path):
    import json

    assert main(["bench", "attention", "--smoke", "--backends", "naive", "--modes", "forward", "--dropouts", "0",
                 "--validate-max-t", "16", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    assert json.loads((tmp_path / "attention.json").read_text())["sweep"]["validate_max_T"] == 16
    assert main(["bench", "generate", "--validate-max-t", "16", "--out-dir", str(tmp_path)]) == 2
