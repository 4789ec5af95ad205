"""metrics.jsonl survives kills: strict JSON, rewritten atomically on --resume, a torn last line dropped."""

import json

import pytest

from fastgpt.cli import main
from fastgpt.run.metrics_log import json_line, read_records
from test_train import fastgpt_process, train_argv


def strict_records(path) -> list[dict]:
    """The records, parsed as strict JSON: NaN, Infinity and -Infinity are refused."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_records_are_strict_json_even_with_a_non_finite_number():
    line = json_line({"iter": 3, "val_loss": float("nan"), "tokens_per_s": float("inf"), "backend": "naive"})
    assert json.loads(line, parse_constant=lambda token: pytest.fail(token)) == \
        {"iter": 3, "val_loss": None, "tokens_per_s": None, "backend": "naive"}


def test_a_kill_mid_rewrite_on_resume_leaves_the_metrics_whole(small_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(small_corpus, out, max_iters=20, eval_interval=10, backend="naive")) == 0
    # a record past the checkpoint's iteration, as a run killed after its metrics line and before its
    # checkpoint leaves: the resume drops it, so it rewrites the file
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json_line({"iter": 25, "train_loss": 1.0, "val_loss": 1.0}))
    before = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()

    kill_at_the_rename = """
        import os
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith("metrics.jsonl"):
                os._exit(137)
            real_replace(src, dst)
        os.replace = replace
    """
    proc = fastgpt_process(["train", "--resume", "--out-dir", out, "--max-iters", "30"], inject=kill_at_the_rename)
    assert proc.returncode == 137, proc.stderr
    assert (out / "metrics.jsonl").read_bytes() == before  # truncate-then-write would have left it empty

    assert main(["train", "--resume", "--out-dir", str(out), "--max-iters", "30"]) == 0
    assert [r["iter"] for r in strict_records(out / "metrics.jsonl")] == [0, 10, 20, 30]
    assert not [p for p in out.iterdir() if p.name.startswith(".metrics.jsonl.tmp-")]


def test_a_line_torn_by_a_kill_mid_append_does_not_block_resume(small_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    # kill -9 halfway through appending the record of iteration 10 (its checkpoint is never written)
    kill_mid_append = """
        import os
        import fastgpt.run.metrics_log as metrics_log
        real_append = metrics_log.MetricsLog.append
        def append(self, record):
            if record["iter"] == 10:
                line = metrics_log.json_line(record)
                with open(self.path, "a") as f:
                    f.write(line[: len(line) // 2])
                os._exit(137)
            real_append(self, record)
        metrics_log.MetricsLog.append = append
    """
    proc = fastgpt_process(train_argv(small_corpus, out, max_iters=20, eval_interval=10, backend="naive"),
                           inject=kill_mid_append)
    assert proc.returncode == 137, proc.stderr
    torn = (out / "metrics.jsonl").read_text().splitlines()[-1]
    assert torn.startswith('{"iter": 10') and not torn.endswith("}")

    assert main(["train", "--resume", "--out-dir", str(out)]) == 0
    assert "dropped its last line, cut short by an interrupted write" in capsys.readouterr().out
    assert [r["iter"] for r in strict_records(out / "metrics.jsonl")] == [0, 10, 20]


def test_a_damaged_line_before_the_last_is_refused_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    record = {"train_loss": 4.0, "val_loss": 4.1}
    path.write_text(json_line({"iter": 0, **record}) + "garbage\n" + json_line({"iter": 10, **record}))
    with pytest.raises(ValueError, match="line 2 is not a metrics record"):
        read_records(path)
