"""fastgpt inside the transformers families that need more than plain causal attention: tiny
random-weight models built from configs (nothing downloaded), each against the same weights run
by transformers' own `eager` implementation, which computes every mask, soft-cap and sink.

    mistral     a sliding window of 8 on every layer, grouped-query (4 heads over 2)
    qwen2       use_sliding_window: layer 0 full, layer 1 a window of 8
    gemma2      soft-capping (attn_logit_softcapping=1, small enough to bend every score) and
                alternating layers: sliding window of 8, then full
    gemma3      alternating sliding (8) and full layers, q/k norms
    gpt_oss     learnable sinks per head (their gradient compared too), sliding (8) and full layers
    bert        a bidirectional encoder; and a BERT decoder's cross-attention over padded states
    modernbert  a bidirectional encoder, layer 0 global, layer 1 local: keys |i - j| <= 4
    vit         an encoder that makes no mask (attention_mask None, is_causal False)

The tolerance is fastgpt.verify.parity's rule at the model level, in float32: the logits and every
parameter's gradient of the fastgpt model may be off the float64 eager model by at most 2×
(logits) and 3× (gradients) the error of the float32 eager model, plus the float32 floors (1e-5
logits, 2e-5 gradients); a padded batch is compared at its real tokens (the upstream gradient zero
at the others). The forward-only checks (ViT, cross-attention) allow 1e-5 on unit-scale outputs.
The weights are drawn at unit-ish scale (initializer_range 0.2), the floors' assumption, so that
the floors do not dominate; the sequences (24 tokens; 9 generated past a prompt of 5) are longer
than the window, so that it hides keys and the sliding caches roll.

Each test runs with backend="auto" (the first kernel path that takes the call's options; which
ran is printed, from fastgpt.attention.kernels_ran) and "naive" (the float64-checked reference
math); the parity test also with "ext" and "sdpa" where their kernel paths take every call the
family makes (sdpa has no soft-capping and no sinks).
"""

import copy
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason='transformers 5.x is not installed: pip install "fastgpt[hf]"')

import fastgpt.integrations.transformers as fastgpt_hf  # noqa: E402
from fastgpt.attention import AttentionCall, kernels_ran, refusal  # noqa: E402
from fastgpt.verify.parity import assess  # noqa: E402

VOCAB = 100
WINDOW = 8
T = 24  # tokens per sequence: three windows
TOKEN_IDS = dict(bos_token_id=1, eos_token_id=None, pad_token_id=0)
DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=128, initializer_range=0.2,
               attention_dropout=0.0, **TOKEN_IDS)
ALTERNATING = ["sliding_attention", "full_attention"]


def mistral():
    return transformers.MistralForCausalLM, transformers.MistralConfig(**DECODER, sliding_window=WINDOW)


def qwen2():
    # use_sliding_window from layer max_window_layers on: layer 0 full, layer 1 sliding
    config = transformers.Qwen2Config(**DECODER, sliding_window=WINDOW, use_sliding_window=True, max_window_layers=1)
    return transformers.Qwen2ForCausalLM, config


def gemma2():
    config = transformers.Gemma2Config(**DECODER, sliding_window=WINDOW, layer_types=ALTERNATING,
                                       attn_logit_softcapping=1.0, query_pre_attn_scalar=16)
    return transformers.Gemma2ForCausalLM, config


def gemma3():
    config = transformers.Gemma3TextConfig(**DECODER, sliding_window=WINDOW, layer_types=ALTERNATING,
                                           query_pre_attn_scalar=16)
    return transformers.Gemma3ForCausalLM, config


def gpt_oss():
    config = transformers.GptOssConfig(**DECODER, sliding_window=WINDOW, layer_types=ALTERNATING,
                                       num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager",
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers.GptOssForCausalLM, config


def bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return transformers.BertForMaskedLM, config


def modernbert():
    # local_attention 2·4: the local layer's keys are |i - j| <= 4; layer 0 global, layer 1 local
    config = transformers.ModernBertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                           initializer_range=0.2, local_attention=8, global_attn_every_n_layers=2,
                                           pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                           sep_token_id=2)
    return transformers.ModernBertForMaskedLM, config


FAMILIES = {f.__name__: f for f in (mistral, qwen2, gemma2, gemma3, gpt_oss, bert, modernbert)}
DECODERS = ["mistral", "qwen2", "gemma2", "gemma3", "gpt_oss"]
ENCODERS = ["bert", "modernbert"]
# Each family's attention dropout, as its config names it.
DROPOUT_KEY = {**{f: "attention_dropout" for f in DECODERS + ["modernbert"]}, "bert": "attention_probs_dropout_prob"}


def build(family: str, attn_implementation: str, seed: int = 0, **overrides):
    """The family's model with seed's weights, the same whatever the implementation; each model
    gets its own config (from_config writes the implementation into the config it is given)."""
    cls, config = FAMILIES[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return cls._from_config(copy.deepcopy(config), attn_implementation=attn_implementation)


def tokens(B, T, seed=1):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model, input_ids, dout, attention_mask=None, dtype=torch.float32):
    """{'out': logits, 'd<param>': its gradient} of one forward and backward from dout, in eval
    mode (no dropout; gradients all the same)."""
    model = model.to(dtype).eval()
    model.zero_grad(set_to_none=True)
    logits = model(input_ids, attention_mask=attention_mask).logits
    logits.backward(dout.to(dtype))
    return {"out": logits.detach(), **{f"d{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}}


def eager_mask_float32_fill(*args, dtype=torch.float32, **kwargs):
    """eager's mask, hidden keys filled with float32's most negative number whatever the model's
    dtype: eager runs its softmax in float32 even in a float64 model, where float64's would become
    -inf, and a padded query that sees no key NaN (and every gradient with it)."""
    return transformers.masking_utils.eager_mask(*args, dtype=torch.float32, **kwargs)


def eager_float64(model, *args, **kwargs):
    """logits_and_grads of an eager model in float64, its masks filled as eager_mask_float32_fill says."""
    masks = transformers.AttentionMaskInterface._global_mapping
    masks["eager"] = eager_mask_float32_fill
    try:
        return logits_and_grads(model, *args, **kwargs, dtype=torch.float64)
    finally:
        masks["eager"] = transformers.masking_utils.eager_mask


def parity(family, name, input_ids, attention_mask=None):
    """assess() of the `name` model against eager in float64 (oracle) and float32, the upstream
    gradient zero at padded positions, and padded positions' logits left out."""
    B, T = input_ids.shape
    real = torch.ones(B, T, 1, dtype=torch.bool) if attention_mask is None else attention_mask[..., None].bool()
    dout = torch.randn(B, T, VOCAB, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * real
    got = logits_and_grads(build(family, name), input_ids, dout, attention_mask)
    oracle = eager_float64(build(family, "eager"), input_ids, dout, attention_mask)
    same_dtype = logits_and_grads(build(family, "eager"), input_ids, dout, attention_mask)
    for results in (got, oracle, same_dtype):
        results["out"] = results["out"].where(real, 0.0)
    assert got.keys() == oracle.keys()  # every parameter that has a gradient in eager has one here
    return assess(got, oracle, same_dtype, torch.float32)


def backend_refusal(family: str, asked: str) -> str | None:
    """Why backend `asked` would not take some attention call of the family's forward (the calls
    "naive" receives), or None where it takes them all."""
    reasons = []
    original = fastgpt_hf.fastgpt_attention

    def asking(q, k, v, *, dropout_p, scale, backend, **options):
        reasons.append(refusal(AttentionCall.of(q, k, v, dropout_p, scale, **options), asked))
        return original(q, k, v, dropout_p=dropout_p, scale=scale, backend=backend, **options)

    fastgpt_hf.fastgpt_attention = asking
    try:
        with torch.no_grad():
            build(family, fastgpt_hf.register("naive")).eval()(tokens(2, T))
    finally:
        fastgpt_hf.fastgpt_attention = original
    return next((r for r in reasons if r is not None), None)


def registered(family: str, backend: str) -> str:
    """The implementation name for `backend`; skips a backend other than "auto" and "naive" (whose
    kernels are still growing the options) where it does not take every call of the family."""
    if backend not in ("auto", "naive"):
        reason = backend_refusal(family, backend)
        if reason is not None:
            pytest.skip(f"{backend} does not take every attention call of {family}: {reason}")
    return fastgpt_hf.register(backend)


def report_kernels(family: str, backend: str) -> dict[str, int]:
    """The kernel paths that ran since the last reset (printed: which path served each family)."""
    ran = kernels_ran(reset=True)
    print(f"{family} backend={backend}: {ran}")
    assert ran, "no fastgpt attention call ran"
    if backend != "auto":
        assert {path.partition(".")[0] for path in ran} == {backend}, ran
    return ran


@pytest.mark.parametrize("backend", ["auto", "naive", "ext", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_every_gradient_match_eager(family, backend):
    name = registered(family, backend)
    kernels_ran(reset=True)
    result = parity(family, name, tokens(2, T))
    report_kernels(family, backend)
    assert result.ok, result.explain()
    if family == "gpt_oss":  # the sinks' gradient is among those compared
        assert any(key.endswith("self_attn.sinks") for key in result.errors)


@pytest.mark.parametrize("backend", ["auto", "naive"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_padded_batch_matches_eager_at_real_tokens(family, backend):
    # row 0 unpadded, row 1 left-padded by 5 (as batched generation pads), row 2 right-padded by 13,
    # more than a window (as training batches pad): one attention call per distinct run
    name = fastgpt_hf.register(backend)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, T - 13:] = 0
    kernels_ran(reset=True)
    result = parity(family, name, tokens(3, T), mask)
    report_kernels(family, backend)
    assert result.ok, result.explain()


PROMPT = tokens(2, 5)
PROMPT_MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # row 1 left-padded, as batched generation pads
GENERATE = dict(max_new_tokens=9, do_sample=False, use_cache=True)


@functools.cache
def eager_tokens(family: str) -> torch.Tensor:
    return build(family, "eager").eval().generate(PROMPT, attention_mask=PROMPT_MASK, **GENERATE)


@pytest.mark.parametrize("backend", ["auto", "naive"])
@pytest.mark.parametrize("family", DECODERS)
def test_cached_greedy_generation_past_the_window_gives_eagers_tokens(family, backend):
    # 5 prompt tokens and 9 new ones: the sliding layers' caches grow to their 7 keys, then slide;
    # the padded row's run covers every cached key once its padding has slid out
    name = fastgpt_hf.register(backend)
    kernels_ran(reset=True)
    got = build(family, name).eval().generate(PROMPT, attention_mask=PROMPT_MASK, **GENERATE)
    report_kernels(family, backend)
    assert torch.equal(got, eager_tokens(family)), (got, eager_tokens(family))


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("family", DECODERS)
def test_new_tokens_over_a_sliding_cache_align_bottom_right(family, monkeypatch):
    # a prefill of 14, then 6 tokens at once: a sliding layer's cache holds its last 7 keys, so the
    # 6 queries see 13 keys of 20 positions, and the window (7, 0) still bites inside the step
    name = fastgpt_hf.register("naive")
    model = build(family, name).eval()
    input_ids = tokens(2, 20)
    with torch.no_grad():
        full = model(input_ids).logits
        cache = model(input_ids[:, :14], use_cache=True).past_key_values
        calls = []
        original = fastgpt_hf.fastgpt_attention

        def recording(q, k, v, **options):
            calls.append((q.shape[2], k.shape[2], options["window"]))
            return original(q, k, v, **options)

        monkeypatch.setattr(fastgpt_hf, "fastgpt_attention", recording)
        step = model(input_ids[:, 14:], past_key_values=cache, use_cache=True).logits
    assert (6, 13, (WINDOW - 1, 0)) in calls, calls  # a sliding layer over its rolling cache
    assert (step - full[:, 14:]).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["auto", "naive"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_with_attention_dropout(family, backend, monkeypatch):
    name = fastgpt_hf.register(backend)
    model = build(family, name, **{DROPOUT_KEY[family]: 0.1})
    seen = []
    original = fastgpt_hf.fastgpt_attention

    def recording(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return original(*args, **kwargs)

    monkeypatch.setattr(fastgpt_hf, "fastgpt_attention", recording)
    input_ids = tokens(2, T)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    kernels_ran(reset=True)
    for _ in range(3):
        loss = model(input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    report_kernels(family, backend)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert set(seen) == {0.1}  # the model's attention dropout, in training


@pytest.mark.parametrize("backend", ["auto", "naive"])
def test_an_encoder_that_makes_no_mask_is_bidirectional(backend):
    # ViT passes attention_mask=None with is_causal=False: eager masks nothing, and so does fastgpt
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    image_size=16, patch_size=4, initializer_range=0.2, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    outputs = []
    for implementation in ("eager", fastgpt_hf.register(backend)):
        torch.manual_seed(0)
        model = transformers.ViTModel._from_config(copy.deepcopy(config), attn_implementation=implementation).eval()
        with torch.no_grad():
            outputs.append(model(pixels).last_hidden_state)  # (2, 17, 64), layer-normed: unit scale
    report_kernels("vit", backend)
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["auto", "naive"])
def test_cross_attention_over_a_padded_encoder_output(backend):
    # a BERT decoder: causal self-attention over its right-padded tokens, and cross-attention (T_q = 7
    # queries over T_k = 9 encoder states, two rows padded) where every query reads the real keys
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, is_decoder=True, add_cross_attention=True,
                                     initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    encoded = torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(3))
    encoder_mask = torch.ones(3, 9, dtype=torch.long)
    encoder_mask[1, 6:] = 0
    encoder_mask[2, :2] = 0
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0
    logits = []
    for implementation in ("eager", fastgpt_hf.register(backend)):
        torch.manual_seed(0)
        model = transformers.BertLMHeadModel._from_config(copy.deepcopy(config), attn_implementation=implementation)
        with torch.no_grad():
            logits.append(model.eval()(tokens(3, 7), attention_mask=mask, encoder_hidden_states=encoded,
                                       encoder_attention_mask=encoder_mask).logits)
    report_kernels("bert decoder", backend)
    assert (logits[0] - logits[1])[mask.bool()].abs().max() < 1e-5
