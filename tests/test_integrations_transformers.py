"""fastgpt inside Hugging Face transformers: tiny random-weight GPT-2 and Llama (grouped-query) models
built from configs, nothing downloaded, against transformers' own `sdpa` implementation; the mask
patterns the mask function describes, and what it still refuses by name. The families that need
windows, soft-capping, sinks or no causal mask are in test_hf_families.py.

Parity follows fastgpt.verify.parity's rule at the model level: the logits and every parameter's gradient
of the fastgpt model in float32 may be off the float64 `sdpa` model by at most 2× (logits) and 3×
(gradients) the error of the float32 `sdpa` model, plus the float32 floor. The weights are drawn
at unit-ish scale (initializer_range 0.2), the floors' assumption, so that the floors do not
dominate; the upstream gradient is one fixed random tensor, zero at padded positions.
"""

import copy
import re
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason='transformers 5.x is not installed: pip install "fastgpt[hf]"')

import fastgpt  # noqa: E402
import fastgpt.integrations.transformers as fastgpt_hf  # noqa: E402
from fastgpt.attention import get_backend, naive_attention  # noqa: E402
from fastgpt.attention.naive import hidden_keys  # noqa: E402
from fastgpt.verify.parity import assess  # noqa: E402

VOCAB = 61
BACKENDS = ["naive", "sdpa", "ext", "auto"]


def llama_config(**overrides):
    # 4 query heads over 2 key/value heads of 16: grouped-query attention, G = 2
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    initializer_range=0.2, bos_token_id=0, eos_token_id=None, pad_token_id=0,
                                    **overrides)


def gpt2_config(**overrides):
    overrides = {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, **overrides}
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                   initializer_range=0.2, bos_token_id=0, eos_token_id=None, pad_token_id=0,
                                   **overrides)


MODELS = {
    "llama": (transformers.LlamaForCausalLM, llama_config),
    "gpt2": (transformers.GPT2LMHeadModel, gpt2_config),
}


def build(kind: str, attn_implementation: str, seed: int = 0, **overrides):
    """The `kind` model with seed's weights: the same weights whatever the implementation. Each
    model gets its own config: from_config writes the implementation into the config it is given."""
    cls, config = MODELS[kind]
    torch.manual_seed(seed)
    return cls._from_config(copy.deepcopy(config(**overrides)), attn_implementation=attn_implementation)


def logits_and_grads(model, input_ids, dout, attention_mask=None, dtype=torch.float32):
    """{'out': logits, 'd<param>': its gradient} of one forward and backward from dout."""
    model = model.to(dtype)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids, attention_mask=attention_mask).logits
    logits.backward(dout.to(dtype))
    return {"out": logits.detach(), **{f"d{n}": p.grad for n, p in model.named_parameters()}}


def tokens(B, T, seed=1):
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MODELS)
def test_logits_and_gradients_match_transformers_sdpa(kind, backend):
    if backend != "auto" and backend not in fastgpt.available_backends("cpu"):
        pytest.skip(f"{backend} cannot run on CPU here: {get_backend(backend).unavailable_reason(torch.device('cpu'))}")
    name = fastgpt_hf.register(backend)
    B, T = 3, 19
    input_ids = tokens(B, T)
    dout = torch.randn(B, T, VOCAB, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # GPT-2 scaling 1/(D**0.5 · (layer + 1)): the model's `scaling`, not the default, must reach the kernel
    overrides = {"gpt2": {"scale_attn_by_inverse_layer_idx": True}}.get(kind, {})
    got = logits_and_grads(build(kind, name, **overrides), input_ids, dout)
    oracle = logits_and_grads(build(kind, "sdpa", **overrides), input_ids, dout, dtype=torch.float64)
    same_dtype = logits_and_grads(build(kind, "sdpa", **overrides), input_ids, dout)
    result = assess(got, oracle, same_dtype, torch.float32)
    assert result.ok, result.explain()


@pytest.mark.parametrize("kind", MODELS)
def test_the_triton_kernels_in_gpt2_and_grouped_query_llama(kind):
    # separate: on CPU Triton runs in its interpreter (slow)
    if "triton" not in fastgpt.available_backends("cpu"):
        pytest.skip("the triton backend cannot run on CPU tensors here (TRITON_INTERPRET=1 is not set)")
    test_logits_and_gradients_match_transformers_sdpa(kind, "triton")


@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("kind", MODELS)
def test_a_padded_batch_is_exact_at_every_real_token(kind, gaps):
    # left padding (as generation pads), right padding (as training batches), none, and all three
    # in one batch (or padding between real tokens): one varlen call per layer over the real tokens
    name = fastgpt_hf.register("sdpa")
    B, T = 3, 17
    input_ids = tokens(B, T)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, 11:] = 0
    if gaps:
        mask[2, 3:6] = 0
    real = mask.bool()[..., None]
    dout = torch.randn(B, T, VOCAB, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * real
    fastgpt.attention.kernels_ran(reset=True)
    got = logits_and_grads(build(kind, name), input_ids, dout, mask)
    assert fastgpt.attention.kernels_ran() == {"sdpa": 2}  # one call per layer, whatever the padding
    oracle = logits_and_grads(build(kind, "sdpa"), input_ids, dout, mask, dtype=torch.float64)
    same_dtype = logits_and_grads(build(kind, "sdpa"), input_ids, dout, mask)
    for results in (got, oracle, same_dtype):  # padded positions' logits are left out (zeros here)
        results["out"] = results["out"] * real
    result = assess(got, oracle, same_dtype, torch.float32)
    assert result.ok, result.explain()


@pytest.mark.parametrize("backend", ["naive", "auto"])
@pytest.mark.parametrize("kind", MODELS)
def test_cached_greedy_generation_gives_the_same_tokens(kind, backend):
    name = fastgpt_hf.register(backend)
    prompt = tokens(2, 7)
    settings = dict(max_new_tokens=12, do_sample=False, use_cache=True)
    expected = build(kind, "sdpa").eval().generate(prompt, **settings)
    assert torch.equal(build(kind, name).eval().generate(prompt, **settings), expected)
    # a left-padded batch, as batched generation pads a short prompt: decode steps over its cache
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    expected = build(kind, "sdpa").eval().generate(prompt, attention_mask=mask, **settings)
    assert torch.equal(build(kind, name).eval().generate(prompt, attention_mask=mask, **settings), expected)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")  # 5.24's new name `cache` is not in 5.17
@pytest.mark.parametrize("kind", MODELS)
def test_several_new_tokens_over_a_cache_align_bottom_right(kind):
    # T_q = 5 new queries over T_k = 16 keys (prefill of 11, then 5 at once): the last 5 rows of the
    # full forward's logits
    name = fastgpt_hf.register("naive")
    model = build(kind, name).eval()
    input_ids = tokens(2, 16)
    with torch.no_grad():
        full = model(input_ids).logits
        cache = model(input_ids[:, :11], use_cache=True).past_key_values
        step = model(input_ids[:, 11:], past_key_values=cache, use_cache=True).logits
    assert (step - full[:, 11:]).abs().max() < 1e-5


@pytest.mark.parametrize("kind", MODELS)
def test_training_steps_with_attention_dropout(kind, monkeypatch):
    name = fastgpt_hf.register("auto")
    dropout = {"llama": {"attention_dropout": 0.1}, "gpt2": {"attn_pdrop": 0.1}}[kind]
    model = build(kind, name, **dropout)
    seen = []
    fastgpt_attention = fastgpt_hf.fastgpt_attention

    def recording(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return fastgpt_attention(*args, **kwargs)

    monkeypatch.setattr(fastgpt_hf, "fastgpt_attention", recording)
    input_ids = tokens(4, 24)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(4):
        loss = model(input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert set(seen) == {0.1}  # the model's attention dropout, in training
    with torch.no_grad():
        assert not torch.equal(model(input_ids).logits, model(input_ids).logits)  # dropout draws
        model.eval()
        seen.clear()
        assert torch.equal(model(input_ids).logits, model(input_ids).logits)
    assert set(seen) == {0.0}


@pytest.mark.parametrize("kind", MODELS)
def test_output_attentions_is_refused(kind):
    model = build(kind, fastgpt_hf.register("sdpa"))
    with pytest.raises(ValueError, match=r"does not return attention weights \(output_attentions=True\)"):
        model(tokens(1, 5), output_attentions=True)


def test_padding_between_real_tokens_under_a_window_is_refused():
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"attention_mask row 0 has padding between real tokens \(11011\) in a layer "
                                         r"with a window of \(2, 0\); .* takes left or right padding there"):
        transformers.MistralForCausalLM._from_config(
            transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=3),
            attn_implementation=fastgpt_hf.register("sdpa"))(tokens(2, 5), attention_mask=mask)


@pytest.mark.parametrize("flattening_kwargs", [False, True])
def test_packed_documents_give_the_logits_and_gradients_of_each_alone(flattening_kwargs):
    # transformers' padding-free training: three documents in one row, position_ids restarting at
    # each (DataCollatorWithFlattening), with or without its cu_seq_lens arguments
    name = fastgpt_hf.register("naive")
    lengths = (6, 1, 9)
    docs = [tokens(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    model = build("llama", name).double()
    ids = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 6, 7, 16], dtype=torch.int32)
    extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9) if flattening_kwargs else {}
    dout = torch.randn(1, 16, VOCAB, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fastgpt.attention.kernels_ran(reset=True)
    packed = model(ids, position_ids=position_ids, use_cache=False, **extra).logits
    assert fastgpt.attention.kernels_ran() == {"naive": 2}  # one varlen call per layer
    packed.backward(dout)
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = torch.cat([model(doc, use_cache=False).logits for doc in docs], dim=1)
    alone.backward(dout)
    torch.testing.assert_close(packed, alone, rtol=1e-12, atol=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-10, atol=1e-12)


def test_a_layer_without_a_mask_follows_its_is_causal():
    # a model that makes no mask (ViT, Whisper's encoder) passes None: eager then masks nothing, so a
    # layer that is not causal is bidirectional, and a causal one (None from the mask function) causal
    name = fastgpt_hf.register("naive")
    layer = build("llama", name).model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    for causal in (False, True):
        out, _ = fastgpt_hf.attention(layer, q, k, v, None, is_causal=causal, name=name)
        expected = naive_attention(q, k, v, causal=causal)
        assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)


MASKS = transformers.masking_utils
MASK_PATTERNS = {  # transformers' mask function -> (causal, window) as fastgpt's attention takes them
    "causal": (lambda: MASKS.causal_mask_function, (True, None)),
    "bidirectional": (lambda: MASKS.bidirectional_mask_function, (False, None)),
    "sliding_causal_8": (lambda: MASKS.sliding_window_causal_mask_function(8), (True, (7, 0))),
    "sliding_bidirectional_4": (lambda: MASKS.sliding_window_bidirectional_mask_function(4), (False, (4, 4))),
    "causal_and_two_windows": (lambda: MASKS.and_masks(MASKS.causal_mask_function, MASKS.sliding_window_overlay(8),
                                                       MASKS.sliding_window_overlay(5)), (True, (4, 0))),
    "left_window_only": (lambda: MASKS.and_masks(MASKS.sliding_window_overlay(3), MASKS.bidirectional_mask_function),
                         (False, (2, -1))),
}


@pytest.mark.parametrize("pattern", MASK_PATTERNS)
def test_the_mask_patterns_it_describes_hide_the_keys_transformers_hides(pattern):
    # the description, drawn by fastgpt's reference (bottom-right), against transformers' own mask
    # function evaluated at every (query, key) position: 5 queries at the end of 12 keys
    make, described = MASK_PATTERNS[pattern]
    mask_function = make()
    causal, window = fastgpt_hf.describe_mask_function(mask_function)
    assert (causal, window) == described
    T_q, T_k = 5, 12
    q_idx = torch.arange(T_k - T_q, T_k)[:, None]
    kv_idx = torch.arange(T_k)[None, :]
    seen = mask_function(torch.tensor(0), torch.tensor(0), q_idx, kv_idx).expand(T_q, T_k)
    assert torch.equal(~seen, hidden_keys(T_q, T_k, causal, window if window is not None else (-1, -1)))


def test_masks_it_cannot_describe_are_refused_by_name():
    name = fastgpt_hf.register("sdpa")
    # Gemma-3 as a bidirectional encoder overlays its own window with or_mask_function
    config = transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                           use_bidirectional_attention=True, pad_token_id=0)
    model = transformers.Gemma3TextModel._from_config(config, attn_implementation=name)
    with pytest.raises(ValueError, match=r"does not support a mask the model overlays with or_mask_function"):
        model(tokens(1, 5))
    chunked = transformers.masking_utils.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"does not support chunked attention \(chunked_overlay"):
        fastgpt_hf.describe_mask_function(chunked, name)


def test_a_static_cache_and_a_prepared_4d_mask_are_refused():
    model = build("llama", fastgpt_hf.register("sdpa")).eval()
    with pytest.raises(ValueError, match=r"needs the newest query to be the newest key; .* static, preallocated cache"):
        model.generate(tokens(1, 5), max_new_tokens=2, do_sample=False, cache_implementation="static")
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match=r"an attention_mask of shape \(1, 1, 5, 5\) that its mask function did not"):
        model(tokens(1, 5), attention_mask=mask)


def test_arguments_that_change_the_math_are_refused():
    name = fastgpt_hf.register("sdpa")
    layer = build("llama", name).model.layers[0].self_attn
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match=r"does not support a position bias added to the scores \(position_bias="):
        fastgpt_hf.attention(layer, q, k, k, None, position_bias=torch.zeros(1, 4, 3, 3), name=name)
    with pytest.raises(ValueError, match=r"cu_seqlens_q = \[0, 2\] must start at 0, never decrease, and end at 3"):
        fastgpt_hf.attention(layer, q, k, k, None, cu_seq_lens_q=torch.tensor([0, 2]), name=name)
    out, weights = fastgpt_hf.attention(layer, q, k, k, None, position_bias=None, name=name)  # None: absent
    assert out.shape == (1, 3, 4, 16) and weights is None


def test_register_names():
    assert fastgpt_hf.register() == "fastgpt"
    assert fastgpt_hf.register("naive") == "fastgpt_naive"
    assert fastgpt_hf.register("sdpa", name="mine") == "mine"
    assert transformers.AttentionInterface._global_mapping["mine"].keywords["backend"] == "sdpa"
    with pytest.raises(ValueError, match="backend='nope' is not a known attention backend"):
        fastgpt_hf.register("nope")
    with pytest.raises(ValueError, match="name='sdpa' is already an attention implementation of transformers"):
        fastgpt_hf.register(name="sdpa")
    with pytest.raises(ValueError, match="transformers reads a name with '/' as a Hub kernel"):
        fastgpt_hf.register(name="org/kernel")


@pytest.mark.parametrize("name, says", [
    ("", "name='' is empty: models look their attention up by this name"),
    ("   ", "name='   ' holds whitespace"),
    ("fast gpt", "name='fast gpt' holds whitespace"),
    (3, "name=3 must be a string (or None for the default); got int"),
    (b"fastgpt", "name=b'fastgpt' must be a string (or None for the default); got bytes"),
])
def test_register_refuses_hostile_names_for_what_they_are(name, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        fastgpt_hf.register(name=name)


def test_import_fastgpt_does_not_import_transformers():
    code = "import sys, fastgpt, fastgpt.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # without transformers, the integration says how to get it
    code = "import sys; sys.modules['transformers'] = None; import fastgpt.integrations.transformers"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and 'pip install "fastgpt[hf]"' in proc.stderr
