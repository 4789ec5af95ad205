"""The Triton kernels with every option of `attention` (bidirectional, a window, soft-capping, sinks,
ALiBi, the lse) against the float64 reference, in the interpreter on CPU (compiled on a GPU):
outputs and every gradient (dq, dk, dv, dsinks) by the parity rule, fp32 and fp16, with and without
dropout (the kernels' own mask), alone and combined, grouped-query and T_q != T_k; rows that see
no key; the band's block skipping; repeated backwards bit-equal.

The interpreter runs small blocks here (BLOCKS), so that a band has edge blocks, whole blocks between
them and blocks it skips at these small lengths."""

import pytest
import torch

from fastgpt.attention import attention, naive_attention
from fastgpt.attention.api import attention_with_mask
from fastgpt.verify.parity import compare, make_qkv

flash_ops = pytest.importorskip("fastgpt.kernels.flash_attention_ops", reason="triton is not installed")
from fastgpt.kernels import flash_attention_configs as cfg  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
GRADS = ("dq", "dk", "dv", "dsinks")
# unequal blocks: the forward and dQ walk keys in 16s, dK/dV queries in 16s over keys in 32s
BLOCKS = {"fwd": cfg.KernelConfig(32, 16, 4, 1), "fwd_decode": cfg.KernelConfig(16, 16, 4, 1),
          "bwd_dkdv": cfg.KernelConfig(16, 32, 4, 1), "bwd_dq": cfg.KernelConfig(32, 16, 4, 1)}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    if DEVICE == "cpu":
        for kernel, config in BLOCKS.items():
            monkeypatch.setitem(cfg.INTERPRETER_CONFIGS, kernel, config)


# (id, (B, H, H_kv, T_q, T_k, D), options); "sinks" and "alibi" stand for random tensors
CASES = [
    ("bidirectional", (2, 2, 2, 33, 33, 16), dict(causal=False)),
    ("bidirectional_more_queries", (1, 2, 2, 40, 17, 32), dict(causal=False)),
    ("bidirectional_fewer_queries", (1, 2, 2, 17, 40, 16), dict(causal=False)),
    ("window", (1, 2, 2, 70, 70, 16), dict(window=(20, 0))),
    ("window_fewer_queries", (2, 2, 2, 17, 70, 32), dict(window=(9, 0))),
    ("window_decode", (2, 4, 2, 5, 70, 16), dict(window=(20, 0), sinks=True)),  # the decode configs' launch
    ("softcap", (2, 2, 2, 33, 33, 16), dict(softcap=2.0)),
    ("sinks", (2, 2, 2, 33, 33, 16), dict(sinks=True)),
    ("alibi", (2, 2, 2, 17, 33, 32), dict(alibi=True)),
    ("window_softcap", (1, 2, 2, 70, 70, 16), dict(window=(24, 0), softcap=3.0)),
    ("sinks_window", (1, 2, 2, 33, 50, 16), dict(window=(6, 0), sinks=True)),
    ("gqa_window", (1, 6, 2, 33, 33, 16), dict(window=(17, 0))),
    ("bidirectional_window_gqa", (1, 4, 2, 40, 33, 16), dict(causal=False, window=(5, 18))),
    ("everything", (2, 4, 2, 33, 17, 32), dict(causal=False, window=(8, 3), softcap=4.0, sinks=True, alibi=True)),
]


def inputs(shape, options, seed=0):
    """q, k, v (float64, strided views of one buffer), the upstream gradient, sinks (or None) and
    the options with the ALiBi slopes (H,) drawn."""
    B, H, H_kv, T_q, T_k, D = shape
    q, k, v = make_qkv(shape, torch.float64, DEVICE, seed)
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(DEVICE)
    options = dict(options)
    sinks = torch.randn(H, generator=g, dtype=torch.float64).to(DEVICE) if options.pop("sinks", False) else None
    if options.pop("alibi", False):
        options["alibi_slopes"] = (torch.rand(H, generator=g) + 0.1).to(DEVICE)  # (H,) float32
    return (q, k, v), dout, sinks, options


def assert_parity(shape, options, dtype, dropout_p=0.0, seed=0):
    (q, k, v), dout, sinks, options = inputs(shape, options, seed)
    drawn = {}

    def under_test(q, k, v, *sinks):
        extra = dict(options, sinks=sinks[0] if sinks else None)
        if dropout_p == 0.0:
            return attention(q, k, v, backend="triton", **extra)
        out, drawn["keep"] = attention_with_mask(q, k, v, dropout_p=dropout_p, backend="triton", **extra)
        return out

    def reference(q, k, v, *sinks):
        return naive_attention(q, k, v, dropout_p, keep_mask=drawn.get("keep"), sinks=sinks[0] if sinks else None,
                               **options)

    tensors = (q, k, v) if sinks is None else (q, k, v, sinks)
    result = compare(under_test, reference, tensors, dout, dtype, grad_names=GRADS[:len(tensors)])
    assert result.ok, f"{result.explain()}: errors {result.errors}, limits {result.limits}"
    if dropout_p:
        assert 0 < drawn["keep"].float().mean() < 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,options", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_options_match_the_reference(shape, options, dtype):
    assert_parity(shape, options, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,options", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_options_with_dropout_match_the_reference_with_the_kernels_mask(shape, options, dtype):
    assert_parity(shape, options, dtype, dropout_p=0.3, seed=3)


@pytest.mark.parametrize("sinks", [False, True], ids=["no_sinks", "sinks"])
def test_rows_that_see_no_key(sinks):
    # 20 queries over 8 keys, bidirectional, window (1, 1): query i sits at key position i - 12,
    # so queries 0..10 see no key: out 0, lse -inf (the sink's logit with sinks), gradients 0
    shape, options = (1, 2, 2, 20, 8, 16), dict(causal=False, window=(1, 1), sinks=sinks)
    assert_parity(shape, options, torch.float32)
    assert_parity(shape, options, torch.float32, dropout_p=0.3)
    (q, k, v), dout, sink, options = inputs(shape, options)
    q, k, v = (t.float().requires_grad_(True) for t in (q, k, v))
    out, lse = attention(q, k, v, backend="triton", return_lse=True, sinks=sink, **options)
    out.backward(dout.float())
    assert torch.equal(out[:, :, :11], torch.zeros_like(out[:, :, :11]))
    sink_lse = torch.full((2,), float("-inf")) if sink is None else sink.float()  # (H,)
    assert torch.equal(lse[:, :, :11], sink_lse[None, :, None].expand(1, 2, 11))
    assert torch.isfinite(lse[:, :, 11:]).all()
    assert torch.equal(q.grad[:, :, :11], torch.zeros_like(q.grad[:, :, :11]))
    assert all(torch.isfinite(t).all() for t in (out, q.grad, k.grad, v.grad))


@pytest.mark.parametrize("shape,options", [CASES[1][1:], CASES[-1][1:], ((1, 2, 2, 17, 33, 16), dict(window=(5, 0)))],
                         ids=["bidirectional", "everything", "window"])
def test_return_lse_is_the_references_natural_log_and_detached(shape, options):
    (q, k, v), _, sinks, options = inputs(shape, options)
    ref_out, ref_lse = naive_attention(q, k, v, sinks=sinks, return_lse=True, **options)
    q, k, v = (t.float().requires_grad_(True) for t in (q, k, v))
    out, lse = attention(q, k, v, backend="triton", return_lse=True, sinks=sinks, **options)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3] and not lse.requires_grad
    assert (lse.double() - ref_lse.double()).abs().max() < 1e-5
    assert torch.equal(out, attention(q, k, v, backend="triton", sinks=sinks, **options))
    assert (out.double() - ref_out).abs().max() < 1e-5
    # dropout acts after the softmax: the lse of a call with dropout is the same
    (_, dropped_lse), _ = attention_with_mask(q, k, v, dropout_p=0.5, backend="triton", return_lse=True, sinks=sinks,
                                              **options)
    assert torch.equal(dropped_lse, lse)


def test_a_window_skips_the_key_blocks_outside_its_band():
    # NaN keys and values far left of every band of the later queries: a kernel that visited their
    # blocks (even masked: 0·NaN is NaN) would turn those rows, and their dq, NaN
    (q, k, v), dout, _, _ = inputs((1, 2, 2, 96, 96, 16), {})
    k, v = k.float().clone(), v.float().clone()
    k[:, :, :16], v[:, :, :16] = float("nan"), float("nan")
    q, k, v = (t.float().requires_grad_(True) for t in (q, k, v))
    out = attention(q, k, v, backend="triton", window=(4, 0))
    out.backward(dout.float())
    assert torch.isfinite(out[:, :, 48:]).all() and torch.isfinite(q.grad[:, :, 48:]).all()
    assert torch.isfinite(k.grad[:, :, 32:]).all() and torch.isfinite(v.grad[:, :, 32:]).all()


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_repeated_backward_with_options_is_bit_equal(dropout_p):
    (q, k, v), dout, sinks, options = inputs((1, 4, 2, 40, 33, 16), CASES[-1][2])
    q, k, v, sinks = (t.half().requires_grad_(True) for t in (q, k, v, sinks))
    out = attention(q, k, v, backend="triton", dropout_p=dropout_p, sinks=sinks, **options)
    grads = [torch.autograd.grad(out, (q, k, v, sinks), dout.half(), retain_graph=True) for _ in range(3)]
    for later in grads[1:]:
        for a, b in zip(grads[0], later):
            assert torch.equal(a, b)
    assert grads[0][3].dtype == torch.float16


def test_the_plain_causal_call_sets_no_option_switch():
    _, switches = flash_ops.option_args(33, 33, 0.25, True, -1, 0, 0.0, None)
    assert switches == {"BANDED": False, "SOFTCAP": False, "ALIBI": False}
    _, switches = flash_ops.option_args(33, 33, 0.25, False, -1, -1, 0.0, None)
    assert switches["BANDED"]
