"""The GPT's attention options: a sliding window, soft-capping and learnable sinks.

Off by default, so the lecture's model is unchanged (its parameters, state_dict and outputs bit
for bit); each option changes the output as a reference written out with explicit masks says;
sinks train; a window model's KV cache rolls over the last W keys and generates the tokens of the
uncached model; the options travel through checkpoints and `fastgpt train`'s flags.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastgpt.attention import causal_attention, kernels_ran
from fastgpt.cli import main
from fastgpt.model.attention import CausalSelfAttention
from fastgpt.model.gpt import ModelConfig, build_model
from fastgpt.run.checkpoint import load_checkpoint
from fastgpt.run.config import TrainConfig, make_configs
from fastgpt.run.trainer import Trainer, make_optimizer

# head size 32 // 4 = 8; a context of 32, so a few dozen generated tokens cross it
TINY = dict(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout_p=0.0, backend="naive")
OPTIONS = dict(window=6, softcap=2.0, sinks=True)
SMALL_RUN = ["--preset", "cpu", "--n-layer", "2", "--n-head", "4", "--n-embd", "32", "--block-size", "32",
             "--batch-size", "4", "--eval-iters", "2", "--eval-interval", "10", "--no-progress", "--no-decay-lr",
             "--sample-tokens", "0"]


def tiny_model(**fields):
    """The tiny GPT with `fields` over TINY, in eval mode; its q·k scores made O(1) (the N(0, 0.02)
    init keeps them near 0, where soft-capping would change almost nothing) and its sinks, if any,
    set to distinct values."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, **fields})).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(50)
            if block.attn.sinks is not None:
                block.attn.sinks.copy_(torch.linspace(-1.0, 1.0, block.attn.n_head))
    return model


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(65, (B, T), generator=torch.Generator().manual_seed(seed))


def heads(attn: CausalSelfAttention, h: torch.Tensor):
    """q (B, H, T, D), k and v (B, H_kv, T, D) of the layer's fused projection of h (B, T, C)."""
    B, T, _ = h.shape
    D, H, H_kv = attn.head_dim, attn.n_head, attn.n_kv_head
    q, k, v = attn.qkv(h).split([H * D, H_kv * D, H_kv * D], dim=2)
    return (q.view(B, T, H, D).transpose(1, 2), k.view(B, T, H_kv, D).transpose(1, 2),
            v.view(B, T, H_kv, D).transpose(1, 2))


def masked_attention(q, k, v, window, softcap, sinks):
    """The options' meaning written out (H_kv = H): scores, soft-capped, masked to keys
    i - W < j <= i, a sink logit per head joining each row's softmax and dropped after it."""
    T, D = q.shape[2], q.shape[3]
    s = q @ k.transpose(-2, -1) * D**-0.5  # (B, H, T, T)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (j <= i) & (j > i - (window or T + 1))
    s = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    return F.softmax(s, dim=-1)[..., :T] @ v


def reference_forward(model, idx: torch.Tensor, attend) -> torch.Tensor:
    """The GPT's forward written out, with attend(attn, q, k, v) -> (B, H, T, D) for the attention."""
    B, T = idx.shape
    x = model.token_embedding(idx) + model.position_embedding(torch.arange(T))
    for block in model.blocks:
        y = attend(block.attn, *heads(block.attn, block.ln1(x)))
        x = x + block.attn.proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + block.mlp(block.ln2(x))
    return model.lm_head(model.ln_f(x))


LECTURE_KEYS = ["token_embedding.weight", "position_embedding.weight",
                *(f"blocks.{i}.{name}" for i in range(2) for name in (
                    "ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
                    "ln2.weight", "ln2.bias", "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight", "mlp.proj.bias")),
                "ln_f.weight", "ln_f.bias", "lm_head.weight", "lm_head.bias"]


@pytest.mark.parametrize("backend", ["naive", "auto"])
def test_defaults_leave_the_lecture_model_unchanged(backend):
    config = ModelConfig(**TINY)
    assert (config.window, config.softcap, config.sinks) == (None, 0.0, False)
    model = tiny_model(backend=backend)
    assert list(model.state_dict()) == LECTURE_KEYS
    assert model.blocks[0].attn.attention_options() == {}  # the lecture's call: causal_attention, nothing more
    idx = tokens(2, 32)
    with torch.no_grad():
        lecture = reference_forward(model, idx, lambda attn, q, k, v: causal_attention(q, k, v, backend=backend))
        assert torch.equal(model(idx)[0], lecture)  # bit for bit


def test_sinks_add_one_parameter_per_head_and_layer_and_nothing_else():
    plain, with_sinks = tiny_model(), tiny_model(sinks=True, window=4, softcap=1.0)
    added = set(with_sinks.state_dict()) - set(plain.state_dict())
    assert added == {"blocks.0.attn.sinks", "blocks.1.attn.sinks"}
    assert with_sinks.blocks[0].attn.sinks.shape == (4,)
    assert sum(p.numel() for p in with_sinks.parameters()) == sum(p.numel() for p in plain.parameters()) + 2 * 4
    # the same seed gives the same weights: the options add parameters, they do not move the others
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, with_sinks.state_dict()[name])


@pytest.mark.parametrize("option", [dict(window=4), dict(softcap=0.5), dict(sinks=True)], ids=lambda o: next(iter(o)))
def test_each_option_changes_the_output(option):
    idx = tokens(2, 32)
    with torch.no_grad():
        plain, changed = tiny_model()(idx)[0], tiny_model(**option)(idx)[0]
    assert not torch.allclose(plain, changed, rtol=1e-3, atol=1e-3)
    if "window" in option:
        # the first W positions see all their keys anyway: only later ones change
        torch.testing.assert_close(changed[:, :4], plain[:, :4], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(changed[:, 4:], plain[:, 4:], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", ["naive", "auto"])
@pytest.mark.parametrize("options", [dict(window=5), dict(softcap=1.5), dict(sinks=True), OPTIONS],
                         ids=["window", "softcap", "sinks", "all"])
def test_options_equal_the_masked_reference(options, backend):
    model = tiny_model(**options, backend=backend).double()
    idx = tokens(2, 32)
    with torch.no_grad():
        got = model(idx)[0]
        want = reference_forward(model, idx, lambda attn, q, k, v: masked_attention(
            q, k, v, options.get("window"), options.get("softcap", 0.0), attn.sinks))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_sinks_get_gradients_and_train():
    model = tiny_model(**OPTIONS).train()
    idx = tokens(4, 32)
    targets = torch.roll(idx, -1, dims=1)
    optimizer = make_optimizer(model, TrainConfig(learning_rate=1e-2))
    sinks = [block.attn.sinks for block in model.blocks]
    assert all(any(s is p for p in optimizer.param_groups[1]["params"]) for s in sinks)  # no weight decay
    start = [s.detach().clone() for s in sinks]
    losses = []
    for _ in range(5):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in sinks)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(s, s0) for s, s0 in zip(sinks, start))


def test_the_rolling_cache_holds_at_most_window_keys():
    model = tiny_model(**OPTIONS)
    cache = model.make_kv_cache()
    idx = tokens(2, 30)
    with torch.no_grad():
        model(idx[:, :10], kv_cache=cache)  # a prefill longer than the window keeps its last 6
        for layer in cache.layers:
            assert layer.k.shape[2] == layer.v.shape[2] == 6 and layer.kept == 6
        for t in range(10, 30):
            model(idx[:, t:t + 1], kv_cache=cache)
            assert all(layer.k.shape[2] == 6 and layer.kept == 6 for layer in cache.layers)
    assert cache.length == 30  # positions seen: the next token's position embedding


def test_a_window_of_block_size_hides_nothing_and_keeps_the_whole_cache():
    plain, full_window = tiny_model(), tiny_model(window=32)
    idx = tokens(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(full_window(idx)[0], plain(idx)[0], rtol=1e-5, atol=1e-5)
    for model in (plain, full_window):
        assert [layer.capacity for layer in model.make_kv_cache().layers] == [32, 32]


@pytest.mark.parametrize("fields", [OPTIONS, dict(OPTIONS, n_kv_head=2)], ids=["heads", "grouped-query"])
def test_prefill_then_decode_with_a_window_gives_the_full_forwards_logits(fields):
    model = tiny_model(**fields)
    idx = tokens(2, 32, seed=3)
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.make_kv_cache()
        # prefill 9 (past the window), one token, then 5 at once, then one at a time
        steps = [model(idx[:, :9], kv_cache=cache)[0], model(idx[:, 9:10], kv_cache=cache)[0],
                 model(idx[:, 10:15], kv_cache=cache)[0]]
        steps += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(15, 32)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["naive", "auto"])
@pytest.mark.parametrize("prompt_len", [3, 40], ids=["prompt-shorter-than-block", "prompt-longer-than-block"])
def test_cached_generation_with_window_and_sinks_equals_uncached(prompt_len, backend):
    model = tiny_model(**OPTIONS, backend=backend)
    idx = tokens(2, prompt_len)
    new = 34  # crosses the window at once and block_size 32 within the run: decodes, then re-prefills

    def generate(**kwargs):
        return model.generate(idx, new, generator=torch.Generator().manual_seed(2), **kwargs)

    assert torch.equal(generate(kv_cache=True, cache_policy="exact"), generate(kv_cache=False))


def test_options_are_saved_in_checkpoints_and_restored(small_corpus, tmp_path):
    model_config, train_config = make_configs("cpu", {
        **{k: v for k, v in TINY.items() if k != "vocab_size"}, **OPTIONS, "backend": "auto", "data": str(small_corpus),
        "out_dir": str(tmp_path), "batch_size": 4, "eval_iters": 2, "progress": False, "sample_tokens": 0})
    trainer = Trainer(model_config, train_config)
    kernels_ran(reset=True)
    trainer.step()
    assert list(kernels_ran()) == [trainer.attention_kernel()]  # the path the trainer reports is the one that ran
    trainer.save()
    state = load_checkpoint(tmp_path / "ckpt.pt")
    assert {k: state["model_config"][k] for k in OPTIONS} == OPTIONS
    restored = build_model(ModelConfig(**state["model_config"])).eval()
    restored.load_state_dict(state["model"])
    trainer.model.eval()
    idx = torch.randint(trainer.model_config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(restored(idx)[0], trainer.model(idx)[0])


def test_a_checkpoint_written_before_the_options_loads_with_them_off(small_corpus, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", str(small_corpus), "--out-dir", str(out), "--max-iters", "1",
                 "--backend", "naive", *SMALL_RUN]) == 0
    state = torch.load(out / "ckpt.pt", weights_only=True)
    for name in OPTIONS:  # as a checkpoint of the lecture's model was written
        del state["model_config"][name]
    torch.save(state, out / "ckpt.pt")
    config = ModelConfig(**load_checkpoint(out / "ckpt.pt")["model_config"])
    assert (config.window, config.softcap, config.sinks) == (None, 0.0, False)
    assert main(["sample", "--out-dir", str(out), "--prompt", "To", "--max-new-tokens", "4", "--seed", "0",
                 "--linear", "torch"]) == 0


def test_fastgpt_train_takes_the_option_flags_and_sample_restores_them(small_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(small_corpus), "--out-dir", str(out), "--max-iters", "3",
                 "--window", "8", "--softcap", "30", "--sinks", "--dropout-p", "0.1", *SMALL_RUN]) == 0
    state = load_checkpoint(out / "ckpt.pt")
    assert {k: state["model_config"][k] for k in OPTIONS} == dict(window=8, softcap=30.0, sinks=True)
    assert "blocks.1.attn.sinks" in state["model"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(record.get("kernels") for record in records)  # the kernel path that ran, recorded
    capsys.readouterr()
    assert main(["sample", "--out-dir", str(out), "--prompt", "To", "--max-new-tokens", "40", "--seed", "0",
                 "--linear", "torch"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("To") and len(text) == 2 + 40 + 1


@pytest.mark.parametrize("flags, message", [
    (["--window", "0"], "window=0"),
    (["--window", "-3"], "window=-3"),
    (["--window", "33"], "window=33"),
    (["--softcap", "-1"], "softcap=-1.0"),
    (["--softcap", "nan"], "softcap=nan"),
    (["--softcap", "inf"], "softcap=inf"),
    (["--model", "bigram", "--window", "4"], "window=4"),
])
def test_fastgpt_train_refuses_bad_option_values_in_one_line(small_corpus, tmp_path, capsys, flags, message):
    assert main(["train", "--data", str(small_corpus), "--out-dir", str(tmp_path / "run"), "--max-iters", "1",
                 *SMALL_RUN, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastgpt train: error:") and message in err
    assert not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.parametrize("field, value, match", [
    ("window", 0, r"window=0 must be an integer in \[1, block_size=32\]"),
    ("window", 33, r"window=33 must be an integer in \[1, block_size=32\]"),
    ("window", 2.5, r"window=2.5 must be an integer"),
    ("softcap", -0.5, r"softcap=-0.5 must be a finite number >= 0"),
    ("softcap", math.inf, r"softcap=inf must be a finite number >= 0"),
    ("sinks", 1, r"sinks=1 must be True or False"),
])
def test_bad_option_values_are_refused_naming_the_field_value_and_limit(field, value, match):
    with pytest.raises(ValueError, match=match):
        build_model(ModelConfig(**{**TINY, field: value}))


def test_the_attention_layer_refuses_a_window_below_one():
    with pytest.raises(ValueError, match=r"window=0 must be an integer >= 1"):
        CausalSelfAttention(32, 4, window=0)


def test_resume_refuses_adding_sinks(small_corpus, tmp_path):
    assert main(["train", "--data", str(small_corpus), "--out-dir", str(tmp_path), "--max-iters", "1",
                 "--backend", "naive", *SMALL_RUN]) == 0
    with pytest.raises(ValueError, match="cannot change sinks from False to True when resuming"):
        Trainer.resume(tmp_path, {"sinks": True})


def test_mfu_counts_the_attention_over_the_window_only():
    from fastgpt.run.flops import training_flops_per_step

    full = training_flops_per_step(1000, 2, 32, 4, 64)
    windowed = training_flops_per_step(1000, 2, 32, 4, 64, window=16)
    assert full - windowed == 12 * 2 * 32 * (64 - 16) * 4 * 64
    assert training_flops_per_step(1000, 2, 32, 4, 64, window=128) == full
