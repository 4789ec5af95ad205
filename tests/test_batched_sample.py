"""Batched generation over the paged KV cache: each prompt's tokens are those it gets alone; prefix
sharing changes no token and shares pages; the pool stays within what the live sequences need;
`fastgpt sample --prompts FILE` end to end, and its refusals."""

import pytest
import torch

from fastgpt.cli import main
from fastgpt.model.batched import generate_all, generate_batched
from fastgpt.model.gpt import ModelConfig, build_model
from fastgpt.model.paged_kv import PagePool

BLOCK = 32


def tiny_model(backend: str = "naive", dtype=torch.float32):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=65, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, dropout_p=0.0,
                         backend=backend)
    return build_model(config).to(dtype).eval()


def prompts_with_common_prefixes():
    g = torch.Generator().manual_seed(5)
    common = torch.randint(65, (20,), generator=g).tolist()
    return [common + [1, 2], common[:17] + [3], torch.randint(65, (5,), generator=g).tolist(), common + [4] * 10,
            [7], common]


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_each_prompts_tokens_are_those_it_gets_alone(backend):
    model, prompts = tiny_model(backend), prompts_with_common_prefixes()
    limits = [12, 3, 10, 8, 40, 0]  # finishing at different times; prompt 4 reaches block_size
    batched = generate_all(model, prompts, limits, seed=7, batch_size=3, temperature=0.9)
    for i, (prompt, tokens) in enumerate(zip(prompts, batched)):
        expected = min(limits[i], BLOCK - len(prompt))
        alone = model.generate(torch.tensor([prompt]), expected, generator=torch.Generator().manual_seed(7 + i),
                               temperature=0.9)
        assert tokens == alone[0, len(prompt):].tolist(), f"prompt {i}"


def test_sequences_stop_at_max_new_tokens_the_stop_string_and_block_size():
    model, prompts = tiny_model(), [[1, 2, 3], [4] * (BLOCK - 3), [5, 6]]
    events = list(generate_batched(model, prompts, [6, 10, 0], seed=0))
    reasons = {e.index: e.finished for e in events if e.finished}
    assert reasons == {0: "max_new_tokens", 1: "block_size", 2: "max_new_tokens"}
    assert sum(e.index == 1 for e in events) == 3  # prompt and new tokens fill block_size
    first = [e.token for e in events if e.index == 0]
    stopped = list(generate_batched(model, prompts[:1], 6, seed=0, stop=first[2:4]))
    assert [e.token for e in stopped] == first[:4] and stopped[-1].finished == "stop"


@pytest.mark.parametrize("sampling", [dict(top_k=1), dict(temperature=1.0)], ids=["greedy", "sampled"])
def test_prefix_sharing_changes_no_token_and_shares_pages(sampling):
    model, prompts = tiny_model(dtype=torch.float64), prompts_with_common_prefixes()
    results, most_shared = {}, {}
    for share in (True, False):
        pool = PagePool(2, 2, 16, 16, 6 * 3, torch.float64, share_prefixes=share)
        out, shared = [[] for _ in prompts], 0
        for event in generate_batched(model, prompts, 10, seed=3, batch_size=6, pool=pool, **sampling):
            shared = max(shared, pool.shared_pages())
            out[event.index] += [] if event.token is None else [event.token]
        results[share], most_shared[share] = out, shared
    assert results[True] == results[False]
    # the 20-token prefix's first page is shared by prompts 0, 1, 3 and 5, its only full page
    assert most_shared == {True: 1, False: 0}


def test_pages_are_freed_and_reused_and_never_exceed_the_live_need():
    model = tiny_model()
    prompts = [[i + 1] * (3 + 4 * i) for i in range(7)]
    pool = model.make_page_pool(2, 16)  # room for 2 sequences of block_size: 2 × 2 pages
    seen = []
    for _ in generate_batched(model, prompts, [30, 5, 25, 10, 2, 20, 8], seed=0, batch_size=2, pool=pool):
        assert pool.pages_in_use <= pool.pages_needed() <= pool.num_pages
        seen.append(pool.pages_in_use)
    assert pool.num_pages == 4 and max(seen) == 4 and pool.pages_in_use == 0


def test_bad_arguments_are_refused_before_the_first_token():
    model = tiny_model()
    for args, message in [
        (([[1] * BLOCK], 1), f"prompt 0 has {BLOCK} tokens; it must have 1 to block_size - 1 = {BLOCK - 1}"),
        (([[]], 1), "prompt 0 has 0 tokens"),
        (([[1], [2]], [1]), "max_new_tokens has 1 values for 2 prompts"),
        (([], 1), "prompts is empty"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            generate_batched(model, *args)
    with pytest.raises(ValueError, match="page_size=24 is not supported"):
        generate_batched(model, [[1]], 1, page_size=24)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("batched")
    corpus = root / "small.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i % 7}.\n" for i in range(200)))
    out = str(root / "run")
    assert main(["train", "--preset", "cpu", "--data", str(corpus), "--out-dir", out, "--max-iters", "1",
                 "--sample-tokens", "0", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "32",
                 "--batch-size", "4", "--eval-iters", "1", "--eval-interval", "10", "--no-progress"]) == 0
    return root


def test_sample_prompts_end_to_end(checkpoint, capsys):
    capsys.readouterr()
    prompts = checkpoint / "prompts.txt"
    prompts.write_text("To be\n\nthat is\nTo be, or not to be, that\r\n", encoding="utf-8")
    run = ["sample", "--out-dir", str(checkpoint / "run"), "--seed", "4", "--linear", "torch", "--max-new-tokens", "12"]
    assert main([*run, "--prompts", str(prompts), "--batch-size", "2", "--stop", "e"]) == 0
    captured = capsys.readouterr()
    blocks = {}
    for block in captured.out.split("==> [")[1:]:
        header, _, text = block.partition("\n")
        blocks[int(header.split("]")[0])] = (header, text.removesuffix("\n"))
    assert sorted(blocks) == [0, 1, 2] and "line 3," in blocks[1][0] and "line 4," in blocks[2][0]
    assert "3 prompts," in captured.err and "paged KV cache, page size 16, batch size 2" in captured.err
    for i, line in enumerate(["To be", "that is", "To be, or not to be, that"]):
        header, text = blocks[i]
        assert text.startswith(line)
        assert main([*run[:3], *run[5:], "--prompt", line, "--seed", str(4 + i)]) == 0  # the same prompt alone
        alone = capsys.readouterr().out.removesuffix("\n")
        new = text[len(line):]
        if header.endswith("stop"):  # the stop string is not printed
            assert alone.startswith(line + new + "e") and "e" not in new
        else:
            assert alone.startswith(text)


@pytest.mark.parametrize("content, flags, message", [
    (None, [], "--prompts '{f}': no such file"),
    ("\n\n", [], "--prompts '{f}' holds no prompt: every line is empty"),
    (b"To \xff\n", [], "--prompts '{f}' is not UTF-8 text"),
    ("To be\nZebra!\n", [], "prompt 1 (line 2): text contains 2 character(s) not in the model's vocabulary: '!Z'"),
    ("To be\n", ["--page-size", "24"], "--page-size=24 is not supported: a page holds a multiple of 16 positions"),
    ("To be\n", ["--prompt", "x"], "--prompt and --prompts both give prompts"),
    ("To be\n", ["--no-kv-cache"], "--no-kv-cache applies to one --prompt only"),
    ("To be\n", ["--stop", "ö"], "--stop: text contains 1 character(s) not in the model's vocabulary"),
    ("To be, or not to be, that is the question\n", [], "prompt 0 (line 1) has 41 characters; the model's "
                                                         "block_size 32 leaves room for prompts of at most 31"),
])
def test_bad_prompts_are_one_line(checkpoint, capsys, content, flags, message):
    path = checkpoint / "bad.txt"
    path.unlink(missing_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    capsys.readouterr()
    assert main(["sample", "--out-dir", str(checkpoint / "run"), "--prompts", str(path), *flags]) == 2
    err = capsys.readouterr().err
    assert message.format(f=path) in err and len(err.strip().splitlines()) == 1


def test_one_prompt_refuses_the_flags_of_many(checkpoint, capsys):
    assert main(["sample", "--out-dir", str(checkpoint / "run"), "--stop", "."]) == 2
    assert "--stop applies to --prompts FILE only" in capsys.readouterr().err


def test_bench_generate_batched_smoke(tmp_path, capsys):
    assert main(["bench", "generate", "--batched", "--smoke", "--reps", "1", "--num-prompts", "3", "--backends",
                 "naive", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| naive | torch | batched |" in out and "| naive | torch | sequential |" in out and "3/3 |" in out
    assert {p.name for p in tmp_path.iterdir()} == {"generate_batched.json", "generate_batched.csv",
                                                    "generate_batched.png"}


@pytest.mark.parametrize("flags, message", [
    (["--batched", "--page-size", "24"], "--page-size=24 is not supported: a page holds a multiple of 16 positions"),
    (["--num-prompts", "3"], "--num-prompts applies to bench generate --batched; without --batched it would be ignored"),
])
def test_bench_generate_batched_refuses_bad_flags_before_work(flags, message, tmp_path, capsys):
    assert main(["bench", "generate", *flags, "--out-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_bigram_checkpoint_is_refused_with_prompts(checkpoint, capsys):
    out = str(checkpoint / "bigram")
    assert main(["train", "--preset", "bigram", "--data", str(checkpoint / "small.txt"), "--out-dir", out,
                 "--max-iters", "1", "--eval-iters", "1", "--sample-tokens", "0", "--no-progress"]) == 0
    (checkpoint / "one.txt").write_text("To be\n")
    capsys.readouterr()
    assert main(["sample", "--out-dir", out, "--prompts", str(checkpoint / "one.txt"), "--linear", "torch"]) == 2
    assert "--prompts needs a GPT checkpoint (attention over a paged KV cache); this one is bigram" in \
        capsys.readouterr().err
