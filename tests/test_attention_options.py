"""The options of `fastgpt.attention.attention` (causal=False, window, softcap, sinks, ALiBi,
return_lse): their meaning, checked element by element against a loop written from the API's
docstring; their validation; and the registry's refusals by name. Each kernel's own parity for the
options is in its test file (test_triton_options.py, test_ext_options.py); sdpa's is here."""

import math

import pytest
import torch

from fastgpt.attention import (
    OPTIONS,
    AttentionCall,
    attention,
    backend_names,
    causal_attention,
    get_backend,
    naive_attention,
    refusal,
    select_kernel,
)
from fastgpt.attention.paged import paged_call, paged_layout
from fastgpt.attention.registry import choose
from fastgpt.attention.varlen import varlen_call
from fastgpt.verify.parity import compare, make_qkv


def loop_reference(q, k, v, scale=None, causal=True, window=(-1, -1), softcap=0.0, sinks=None, alibi=None):
    """(out, lse) one score at a time, as api.py's docstring writes it: q (B, H, T_q, D), k, v
    (B, H_kv, T_k, D) float64; alibi (B, H). Differentiable in q, k, v and sinks."""
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    left, right = window
    outs, lses = [], []
    for b in range(B):
        for h in range(H):
            for i in range(T_q):
                pos = T_k - T_q + i
                logits, values = [], []
                for j in range(T_k):
                    if (causal and j > pos) or (left >= 0 and j < pos - left) or (right >= 0 and j > pos + right):
                        continue
                    s = scale * (q[b, h, i] @ k[b, h // (H // H_kv), j])
                    if softcap > 0:
                        s = softcap * torch.tanh(s / softcap)
                    if alibi is not None:
                        s = s - alibi[b, h].double() * abs(pos - j)
                    logits.append(s)
                    values.append(v[b, h // (H // H_kv), j])
                terms = logits + ([sinks[h]] if sinks is not None else [])
                if not terms:
                    outs.append(torch.zeros(D, dtype=q.dtype))
                    lses.append(torch.tensor(-math.inf, dtype=q.dtype))
                    continue
                lse = torch.logsumexp(torch.stack(terms), 0)
                out = sum((torch.exp(s - lse) * val for s, val in zip(logits, values)), torch.zeros(D, dtype=q.dtype))
                outs.append(out)
                lses.append(lse)
    return torch.stack(outs).view(B, H, T_q, D), torch.stack(lses).view(B, H, T_q)


CASES = [  # (shape (B, H, H_kv, T_q, T_k, D), options)
    ((1, 2, 2, 5, 5, 4), dict(causal=False)),
    ((1, 2, 1, 3, 6, 4), dict(causal=False)),
    ((1, 2, 2, 6, 3, 4), dict(causal=False)),
    ((1, 2, 2, 7, 7, 4), dict(window=(2, 0))),
    ((1, 2, 2, 3, 7, 4), dict(window=(2, None))),
    ((1, 2, 2, 4, 7, 4), dict(causal=False, window=(1, 2))),
    ((1, 2, 2, 7, 3, 4), dict(causal=False, window=(1, 1))),  # rows that see no key
    ((1, 4, 2, 6, 6, 4), dict(softcap=0.5)),
    ((2, 2, 2, 6, 6, 4), dict(sinks=True)),
    ((1, 2, 2, 6, 6, 4), dict(alibi=True)),
    ((2, 4, 2, 4, 7, 4), dict(window=(2, 0), softcap=0.7, sinks=True, alibi=True)),
    ((1, 2, 2, 7, 3, 4), dict(causal=False, window=(0, 0), sinks=True)),
]


def _options(shape, spec, generator):
    B, H = shape[0], shape[1]
    options = {key: value for key, value in spec.items() if key not in ("sinks", "alibi")}
    if spec.get("sinks"):
        options["sinks"] = torch.randn(H, generator=generator, dtype=torch.float64)
    if spec.get("alibi"):
        options["alibi_slopes"] = torch.rand(B, H, generator=generator)  # float32, as the call keeps them
    return options


@pytest.mark.parametrize("shape,spec", CASES, ids=[str(i) for i in range(len(CASES))])
def test_the_reference_computes_what_the_docstring_writes(shape, spec):
    q, k, v = make_qkv(shape, torch.float64, "cpu", seed=3)
    options = _options(shape, spec, torch.Generator().manual_seed(4))
    out, lse = naive_attention(q, k, v, return_lse=True, **options)
    window = options.get("window") or (-1, -1)
    window = tuple(-1 if side is None else side for side in window)
    expected, expected_lse = loop_reference(q, k, v, causal=options.get("causal", True), window=window,
                                            softcap=options.get("softcap", 0.0), sinks=options.get("sinks"),
                                            alibi=options.get("alibi_slopes"))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape,spec", [CASES[i] for i in (6, 8, 10, 11)], ids=["empty-rows", "sinks", "all", "empty+sinks"])
def test_the_reference_gradients_match_the_loop_and_the_sink_formula(shape, spec):
    q, k, v = (t.detach().clone().requires_grad_() for t in make_qkv(shape, torch.float64, "cpu", seed=5))
    options = _options(shape, spec, torch.Generator().manual_seed(6))
    sinks = options.get("sinks")
    if sinks is not None:
        sinks.requires_grad_()
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out, lse = naive_attention(q, k, v, return_lse=True, **options)
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    grads = torch.autograd.grad(out, leaves, dout)
    window = tuple(-1 if side is None else side for side in options.get("window", (-1, -1)))
    loop_out, _ = loop_reference(q, k, v, causal=options.get("causal", True), window=window,
                                 softcap=options.get("softcap", 0.0), sinks=sinks, alibi=options.get("alibi_slopes"))
    for got, expected in zip(grads, torch.autograd.grad(loop_out, leaves, dout)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert all(torch.isfinite(g).all() for g in grads)
    if sinks is not None:  # dsinks_h = -Σ_{b,i} exp(sink_h - lse_{b,h,i}) · Δ_{b,h,i}, Δ = rowsum(dO∘out)
        delta = (dout * out.detach()).sum(-1)
        formula = -(torch.exp(sinks.detach()[None, :, None] - lse.double()) * delta).sum((0, 2))
        torch.testing.assert_close(grads[3], formula, rtol=1e-6, atol=1e-9)


def test_a_row_that_sees_no_key_is_zero_with_lse_minus_infinity():
    q, k, v = make_qkv((1, 2, 2, 7, 3, 4), torch.float64, "cpu")
    out, lse = attention(q, k, v, causal=False, window=(0, 0), return_lse=True, backend="naive")
    # pos = -4 + i: queries 0..3 sit left of every key, and a (0, 0) window sees only key pos
    assert (out[:, :, :4] == 0).all() and (lse[:, :, :4] == -math.inf).all()
    assert torch.isfinite(out[:, :, 4:]).all() and torch.isfinite(lse[:, :, 4:]).all()


def test_split_keys_merge_by_their_lse_into_the_whole():
    """What return_lse is for: two halves of the keys, merged by their log-sum-exp, give the whole call."""
    q, k, v = make_qkv((1, 2, 2, 5, 12, 8), torch.float64, "cpu")
    whole, lse = attention(q, k, v, causal=False, return_lse=True, backend="naive")
    a, lse_a = attention(q, k[:, :, :7], v[:, :, :7], causal=False, return_lse=True, backend="naive")
    b, lse_b = attention(q, k[:, :, 7:], v[:, :, 7:], causal=False, return_lse=True, backend="naive")
    merged_lse = torch.logaddexp(lse_a, lse_b)
    merged = a * torch.exp(lse_a - merged_lse)[..., None].double() + b * torch.exp(lse_b - merged_lse)[..., None].double()
    torch.testing.assert_close(merged, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged_lse, lse)


def test_the_plain_call_is_unchanged_and_causal_attention_is_attention_causal():
    q, k, v = make_qkv((2, 4, 2, 6, 9, 8), torch.float32, "cpu")
    plain = naive_attention(q, k, v)
    assert torch.equal(causal_attention(q, k, v, backend="naive"), plain)
    assert torch.equal(attention(q, k, v, backend="naive"), plain)
    assert torch.equal(attention(q, k, v, window=(None, 0), backend="naive"), plain)
    assert AttentionCall.of(q, k, v, window=(-1, 0)).options == frozenset()
    with pytest.raises(TypeError, match="causal=False"):
        causal_attention(q, k, v, causal=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=5), "window must be \\(left, right\\)"),
    (dict(window=(2, 3)), "window right=3 with causal=True"),
    (dict(window=(-2, 0)), "window left must be an int >= 0, or -1/None"),
    (dict(window=(1.5, 0)), "window left must be an int"),
    (dict(softcap=-1.0), "softcap must be a finite number >= 0"),
    (dict(softcap=math.inf), "softcap must be a finite number >= 0"),
    (dict(sinks=torch.zeros(3)), r"sinks has shape \(3\); it must be \(H,\) = \(4,\)"),
    (dict(sinks=torch.zeros(4, dtype=torch.int64)), "sinks has dtype torch.int64"),
    (dict(sinks=[0.0] * 4), "sinks must be a torch.Tensor"),
    (dict(sinks=torch.zeros(4, device="meta")), "sinks is on device meta"),
    (dict(alibi_slopes=torch.zeros(2, 3)), r"alibi_slopes has shape \(2, 3\); it must be \(H,\) = \(4,\) or \(B, H\) = \(2, 4\)"),
    (dict(return_lse=1), "return_lse must be True or False"),
    (dict(causal=None), "causal must be True or False"),
])
def test_bad_options_are_refused_in_one_line_naming_them(kwargs, match):
    q, k, v = make_qkv((2, 4, 2, 5, 6, 8), torch.float32, "cpu")
    with pytest.raises((TypeError, ValueError), match=match) as info:
        attention(q, k, v, backend="naive", **kwargs)
    assert "\n" not in str(info.value)


def test_only_a_causal_call_needs_as_many_keys_as_queries():
    q, k, v = make_qkv((1, 2, 2, 6, 3, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match="T_k >= T_q in a causal call"):
        attention(q, k, v, backend="naive")
    assert attention(q, k, v, causal=False, backend="naive").shape == q.shape


def _call_with(options_used: frozenset, q, k):
    H, B = q.shape[1], q.shape[0]
    options = dict(causal="bidirectional" not in options_used, return_lse="return_lse" in options_used,
                   softcap=1.5 if "softcap" in options_used else 0.0,
                   window=(3, 0 if "bidirectional" not in options_used else 2) if "window" in options_used else None,
                   sinks=torch.zeros(H) if "sinks" in options_used else None,
                   alibi_slopes=torch.ones(B, H) if "alibi" in options_used else None)
    if "varlen" in options_used or "paged" in options_used:  # the batch as packed sequences of equal length
        packed_q, packed_k = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (q, k))
        cu = torch.arange(B + 1, dtype=torch.int32) * q.shape[2]
        if "paged" in options_used:  # ... their keys in pages of 16, in the pool's order
            pages = torch.zeros(B, 16, k.shape[1], k.shape[3])
            pages[:, :k.shape[2]] = k.transpose(1, 2)
            layout = paged_layout(torch.arange(B, dtype=torch.int32)[:, None], torch.full((B,), k.shape[2]), 16, B, cu)
            return paged_call(packed_q, pages, pages, layout, **options)
        return varlen_call(packed_q, packed_k, packed_k, cu, cu, **options)
    return AttentionCall.of(q, k, k, **options)


@pytest.mark.parametrize("option", OPTIONS)
def test_every_path_that_lacks_an_option_refuses_it_by_name_and_auto_never_picks_it(option):
    q, k, _ = make_qkv((1, 4, 2, 6, 6, 16), torch.float32, "cpu")
    call = _call_with(frozenset({option}), q, k)
    assert call.options == ({"varlen", "paged"} if option == "paged" else {option})  # paged: a varlen call
    for name in backend_names():
        for path in get_backend(name).paths:
            if option not in path.options:
                reason = path.options_refusal(call)
                assert reason is not None and option in reason
    if option in ("varlen", "paged"):
        chosen = choose(call)
    else:
        chosen = select_kernel(q, k, k, **{"causal": False} if option == "bidirectional" else {},
                               **_option_kwargs(option, q))
    assert option in chosen.options


def _option_kwargs(option, q):
    return {"window": dict(window=(2, 0)), "softcap": dict(softcap=1.0), "sinks": dict(sinks=torch.zeros(q.shape[1])),
            "alibi": dict(alibi_slopes=torch.ones(q.shape[1])), "return_lse": dict(return_lse=True)}.get(option, {})


def test_sdpa_refuses_softcap_sinks_and_lse_saying_why():
    q, k, v = make_qkv((1, 2, 2, 4, 4, 8), torch.float32, "cpu")
    for kwargs, words in ((dict(softcap=2.0), "soft-capping"), (dict(sinks=torch.zeros(2)), "sinks"),
                          (dict(return_lse=True), "log-sum-exp")):
        with pytest.raises(ValueError, match=words):
            attention(q, k, v, backend="sdpa", **kwargs)
        assert words in refusal(AttentionCall.of(q, k, v, **kwargs), "sdpa")


SDPA_CASES = [c for c in CASES if not {"softcap", "sinks"} & set(c[1])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,spec", SDPA_CASES, ids=[str(i) for i in range(len(SDPA_CASES))])
def test_sdpa_parity_for_the_options_it_takes(shape, spec, dtype):
    inputs = make_qkv(shape, torch.float64, "cpu", seed=11)
    options = _options(shape, spec, torch.Generator().manual_seed(12))
    dout = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    result = compare(lambda q, k, v: attention(q, k, v, backend="sdpa", **options),
                     lambda q, k, v: naive_attention(q, k, v, **options), inputs, dout, dtype)
    assert result.ok, result.explain()


def test_sdpa_with_options_and_dropout_keeps_the_expected_fraction():
    q, k, v = make_qkv((2, 2, 2, 64, 64, 16), torch.float32, "cpu")
    torch.manual_seed(0)
    out = attention(q, k, v, causal=False, window=(8, 8), dropout_p=0.5, backend="sdpa")
    plain = attention(q, k, v, causal=False, window=(8, 8), backend="sdpa")
    assert out.shape == plain.shape and not torch.equal(out, plain)
    # the expectation of dropout is the plain output: the mean over many draws comes close
    mean = torch.stack([attention(q, k, v, causal=False, window=(8, 8), dropout_p=0.5, backend="sdpa")
                        for _ in range(200)]).mean(0)
    assert (mean - plain).abs().mean() < 0.1 * plain.abs().mean()


def test_call_kind_and_describe_name_the_options():
    q, k, v = make_qkv((1, 2, 2, 3, 7, 8), torch.float32, "cpu")
    assert AttentionCall.of(q, k, v).kind == "cached"
    call = AttentionCall.of(q, k, v, causal=False, window=(2, None), softcap=1.0)
    assert call.kind == "plain" and call.options == {"bidirectional", "window", "softcap"}
    assert "causal=False" in call.describe() and "window=(2, -1)" in call.describe()
    assert AttentionCall.like(q, kv_len=7, sinks=torch.zeros(2)).options == {"sinks"}


def test_fastgpt_parity_checks_the_options_and_the_sinks_gradient(capsys):
    from fastgpt.cli import main

    assert main(["parity", "--backends", "sdpa", "--variants", "window:8", "alibi", "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    assert "-- window:8" in out and "-- alibi" in out and "FAIL" not in out
    assert main(["parity", "--backends", "naive", "--variants", "sinks", "--dtypes", "float32"]) == 0
    assert "dsinks" in capsys.readouterr().out
    # sdpa refuses soft-capping by name, and a run where nothing was compared is no pass
    assert main(["parity", "--backends", "sdpa", "--variants", "softcap", "--dtypes", "float32"]) == 1
    assert "not supported: sdpa does not take softcap" in capsys.readouterr().out
    assert main(["parity", "--variants", "window:0"]) == 2
    assert "--variants 'window:0' is not a variant" in capsys.readouterr().err


def test_the_readme_table_of_options_is_the_registry_s():
    from pathlib import Path

    from fastgpt.attention import get_path, kernel_path_names

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = text.split("| kernel path | options it takes |\n|---|---|\n", 1)[1].split("\n\n", 1)[0]
    rows = dict(line.strip("|").replace("`", "").split(" | ") for line in table.splitlines())
    expected = {name: ", ".join(o for o in OPTIONS if o in get_path(name).options) or "none (plain causal only)"
                for name in kernel_path_names()}
    assert {name.strip(): value.strip() for name, value in rows.items()} == expected


def test_a_window_that_hides_no_key_is_no_option():
    q, k, v = make_qkv((1, 2, 2, 1, 5, 8), torch.float32, "cpu")  # a decode step over 5 keys
    assert AttentionCall.of(q, k, v, window=(4, 0)).options == frozenset()  # W = 5 sees every key
    assert AttentionCall.of(q, k, v, window=(3, 0)).options == {"window"}
    q, k, v = make_qkv((1, 2, 2, 4, 6, 8), torch.float32, "cpu")
    call = AttentionCall.of(q, k, v, causal=False, window=(5, 3))  # pos 2..5: every key on both sides
    assert call.options == {"bidirectional"} and call.window == (-1, -1)
    assert AttentionCall.of(q, k, v, causal=False, window=(5, 2)).window == (-1, 2)
    # the same numbers either way
    torch.testing.assert_close(attention(q, k, v, causal=False, window=(5, 3), backend="naive"),
                               attention(q, k, v, causal=False, backend="naive"), rtol=0, atol=0)
