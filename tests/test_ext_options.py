"""The CPU flash kernels with every option of fastgpt.attention.attention (ext.cpu_flash,
csrc/cpu/attention_flash_options.cpp): bidirectional and cross attention, sliding windows,
soft-capping, sinks, ALiBi and the log-sum-exp, alone and combined, with grouped-query heads,
T_q != T_k and dropout, in float32 and bfloat16. Parity with the float64 reference by the project's
rule (outputs and every gradient, dsinks included), dropout exactly through the kernel's own keep
mask, rows that see no key, bit-equal repeats, the keys outside a window never read, and the plain
causal call still on its own kernel."""

from __future__ import annotations

import pytest
import torch

from fastgpt.attention import attention, select_kernel
from fastgpt.attention.api import attention_with_mask
from fastgpt.attention.naive import hidden_keys, naive_attention
from fastgpt.verify.parity import compare, make_qkv

ext_ops = pytest.importorskip("fastgpt.ext.ops")  # builds or loads the extension
PATH = "ext.cpu_flash"

# name: ((B, H, H_kv, T_q, T_k, D), options); sinks=True / alibi=True / alibi="BH" draw them per test.
# T of 70 to 150: two or three row blocks, the last ragged; odd offsets T_k - T_q.
CASES = {
    "bidirectional": ((2, 2, 2, 70, 70, 16), dict(causal=False)),
    "cross-Tq<Tk": ((1, 3, 3, 37, 90, 16), dict(causal=False)),
    "cross-Tq>Tk": ((1, 2, 2, 90, 37, 16), dict(causal=False)),
    "window": ((1, 2, 2, 150, 150, 16), dict(window=(19, 0))),
    "window-bidirectional": ((1, 2, 2, 100, 100, 16), dict(causal=False, window=(9, 4))),
    "window-Tq<Tk": ((2, 2, 2, 37, 130, 32), dict(window=(20, 0))),
    "window-cross-Tq>Tk": ((1, 2, 2, 130, 50, 16), dict(causal=False, window=(5, 70))),
    "softcap": ((1, 2, 2, 70, 70, 16), dict(softcap=1.5)),
    "window+softcap": ((1, 2, 2, 130, 130, 16), dict(window=(30, 0), softcap=2.0)),
    "sinks": ((2, 2, 2, 70, 70, 16), dict(sinks=True)),
    "sinks+window": ((1, 4, 2, 130, 130, 16), dict(sinks=True, window=(15, 0))),
    "gqa+window": ((2, 6, 2, 100, 100, 32), dict(window=(25, 0))),
    "gqa-mqa+bidirectional": ((1, 4, 1, 50, 80, 16), dict(causal=False)),
    "alibi": ((1, 2, 2, 70, 90, 16), dict(alibi=True)),
    "alibi-per-batch+bidirectional": ((2, 2, 2, 60, 60, 16), dict(alibi="BH", causal=False)),
    "everything": ((2, 4, 2, 70, 110, 16), dict(window=(30, 0), softcap=3.0, sinks=True, alibi=True)),
    "everything-bidirectional": ((1, 4, 2, 90, 70, 16), dict(causal=False, window=(12, 3), softcap=2.5, sinks=True,
                                                              alibi=True)),
}
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(shape, options, seed=0):
    """q, k, v (strided views of one fused buffer), the upstream gradient, sinks (or None, a float64
    input that gets a gradient) and the call's other options (alibi slopes drawn as asked)."""
    q, k, v = make_qkv(shape, torch.float64, "cpu", seed)
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    options = dict(options)
    sinks = torch.randn(q.shape[1], generator=g, dtype=torch.float64) if options.pop("sinks", False) else None
    alibi = options.pop("alibi", None)
    if alibi is not None:
        slopes_shape = (q.shape[0], q.shape[1]) if alibi == "BH" else (q.shape[1],)
        options["alibi_slopes"] = torch.rand(slopes_shape, generator=g) * 0.5
    return (q, k, v), dout, sinks, options


def _check(shape, options, dtype, dropout_p):
    (q, k, v), dout, sinks, options = _inputs(shape, options)
    keep = {}

    def under_test(q, k, v, *sinks_arg):
        out, keep["mask"] = attention_with_mask(q, k, v, dropout_p=dropout_p, backend=PATH,
                                                sinks=sinks_arg[0] if sinks_arg else None, **options)
        return out

    def reference(q, k, v, *sinks_arg):
        return naive_attention(q, k, v, dropout_p, keep_mask=keep["mask"], sinks=sinks_arg[0] if sinks_arg else None,
                               **options)

    inputs = (q, k, v) + ((sinks,) if sinks is not None else ())
    names = ("dq", "dk", "dv") + (("dsinks",) if sinks is not None else ())
    return compare(under_test, reference, inputs, dout, dtype, grad_names=names)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_float64(case, dtype, dropout_p):
    shape, options = CASES[case]
    result = _check(shape, options, dtype, dropout_p)
    assert result.ok, f"{case}: {result.explain()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["window-cross-Tq>Tk", "everything", "sinks", "cross-Tq<Tk"])
def test_the_log_sum_exp_is_each_rows(case, dtype):
    """float32 lse (B, H, T_q), the sink counted in it, -inf where a row sees no key; detached."""
    (q, k, v), _, sinks, options = _inputs(*CASES[case])
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = attention(q, k, v, backend=PATH, return_lse=True, sinks=sinks, **options)
    _, ref = naive_attention(q.double(), k.double(), v.double(), return_lse=True, sinks=sinks, **options)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3] and not lse.requires_grad
    assert torch.equal(lse.isinf(), ref.isinf())
    finite = ref.isfinite()
    atol = 2e-5 if dtype == torch.float32 else 2e-2  # bfloat16: the inputs' rounding moves the scores
    torch.testing.assert_close(lse[finite], ref[finite], atol=atol, rtol=0)
    assert out.requires_grad  # the output keeps its graph beside the detached lse


@pytest.mark.parametrize("with_sinks", [False, True], ids=["plain", "sinks"])
def test_a_row_that_sees_no_key(with_sinks):
    """causal=False with a window beside the keys: out 0, lse -inf (the sink's logit with sinks) and
    no gradient from those rows."""
    B, H, T_q, T_k, D = 1, 2, 130, 50, 16
    q, k, v = (t.requires_grad_() for t in make_qkv((B, H, H, T_q, T_k, D), torch.float32, "cpu"))
    sinks = torch.tensor([0.5, -1.0], requires_grad=True) if with_sinks else None
    window = (3, 2)
    out, lse = attention(q, k, v, causal=False, window=window, sinks=sinks, backend=PATH, return_lse=True)
    empty = hidden_keys(T_q, T_k, False, window).all(-1)  # (T_q,): pos = i - 80 < -2
    assert empty.sum() == 78
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    expected = sinks.detach()[None, :, None].expand(B, H, int(empty.sum())) if with_sinks else torch.full_like(
        lse[:, :, empty], float("-inf"))
    assert torch.equal(lse[:, :, empty], expected)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v) + ((sinks,) if with_sinks else ()), dout)
    assert torch.equal(grads[0][:, :, empty], torch.zeros_like(grads[0][:, :, empty]))
    assert all(g.isfinite().all() for g in grads)


def _forward_backward(q, k, v, sinks, seed, **options):
    torch.manual_seed(seed)  # the dropout seed
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, sinks)]
    out = attention(*leaves[:3], sinks=leaves[3], dropout_p=0.1, backend=PATH, **options)
    out.backward(torch.ones_like(out))
    return [out.detach()] + [t.grad for t in leaves]


def test_repeated_backwards_are_bit_equal_and_do_not_depend_on_the_thread_count():
    (q, k, v), _, sinks, options = _inputs(*CASES["everything"])
    q, k, v, sinks = (t.float() for t in (q, k, v, sinks))
    first = _forward_backward(q, k, v, sinks, 7, **options)
    again = _forward_backward(q, k, v, sinks, 7, **options)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = _forward_backward(q, k, v, sinks, 7, **options)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, one_thread, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_the_keys_outside_a_window_are_never_read():
    """NaN in key 0 reaches only the rows whose row block spans it: the first block (64 rows). With
    a window of 17 the later blocks never read the key (where full causal attention multiplies it,
    by a weight 0, into every row block: NaN)."""
    q, k, v = (t.contiguous() for t in make_qkv((1, 2, 2, 256, 256, 16), torch.float32, "cpu"))
    k[:, :, 0] = float("nan")
    v[:, :, 0] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, window=(16, 0), backend=PATH)
    assert out[:, :, 64:].isfinite().all() and out[:, :, :17].isnan().all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for grad in (dq, dk, dv):  # the first block's keys take its NaN rows' gradients
        assert grad[:, :, 64:].isfinite().all()


def test_dropout_keeps_the_plain_calls_mask():
    """A causal call with an option draws the plain flash kernels' stream: the same kept elements
    inside the window, and False outside it."""
    q, k, v = make_qkv((2, 2, 2, 40, 70, 16), torch.float32, "cpu")
    torch.manual_seed(3)
    _, plain = attention_with_mask(q, k, v, dropout_p=0.3, backend=PATH)
    torch.manual_seed(3)
    _, windowed = attention_with_mask(q, k, v, dropout_p=0.3, backend=PATH, window=(9, 0))
    outside = hidden_keys(40, 70, True, (9, 0))
    assert torch.equal(windowed, plain & ~outside)
    assert 0.6 < plain[:, :, ~hidden_keys(40, 70)].float().mean() < 0.8


def test_the_plain_call_keeps_its_kernel():
    """Plain float32: the causal flash op (C++ node), bit for bit; bfloat16 without options stays
    on the paths it ran before (ext.cpu_flash declines it); every option call takes ext.cpu_flash."""
    q, k, v = (t.requires_grad_() for t in make_qkv((4, 2, 2, 70, 70, 16), torch.float32, "cpu"))
    out = attention(q, k, v, backend=PATH)
    assert "ExtFlashAttention" in out.grad_fn.name()
    assert torch.equal(out, torch.ops.fastgpt.causal_attention_flash(q, k, v, 16**-0.5, 0.0, 0, 0))
    one_head = torch.empty(1, 1, 8, 64)
    for dtype in DTYPES:
        x = one_head.to(dtype)
        assert select_kernel(x, backend="ext", window=(3, 0)).name == PATH  # few heads, bfloat16: still here
        assert select_kernel(x, backend="ext", causal=False, return_lse=True).name == PATH
    assert select_kernel(one_head.to(torch.bfloat16), backend="ext").name != PATH


@pytest.mark.parametrize("path", ["ext.cpu_packed", "ext.cpu_flash_amx"])
def test_the_causal_only_paths_refuse_options_by_name(path):
    x = torch.empty(2, 2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"{path} does not take window, softcap"):
        select_kernel(x, backend=path, window=(3, 0), softcap=2.0)
    with pytest.raises(ValueError, match="does not take return_lse"):
        select_kernel(x, backend=path, return_lse=True)


def test_bad_arguments_are_refused_by_name():
    q, k, v = make_qkv((1, 2, 2, 8, 8, 16), torch.float32, "cpu")
    with pytest.raises(ValueError, match="window must be"):
        ext_ops.attention_flash(q, k, v, 0.25, window=(2,))
    with pytest.raises(ValueError, match="sinks must be"):
        ext_ops.attention_flash(q, k, v, 0.25, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="T_q = 8 > T_k = 4 in a causal call"):
        ext_ops.attention_flash(q, k[:, :, :4], v[:, :, :4], 0.25)
    with pytest.raises(RuntimeError, match="alibi_slopes has shape"):
        torch.ops.fastgpt.attention_flash_forward(q, k, v, None, torch.zeros(2), 0.25, True, -1, 0, 0.0, 0.0, 0, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_opcheck(dtype):
    """Schemas and fake kernels of the three ops (their autograd is the Python Function in ops.py)."""
    (q, k, v), dout, sinks, options = _inputs(*CASES["everything-bidirectional"])
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    sinks, slopes = sinks.float(), options["alibi_slopes"].expand(q.shape[0], -1).contiguous()
    args = (0.25, False, 12, 3, 2.5, 0.1, 5, 0)
    out, lse = torch.ops.fastgpt.attention_flash_forward(q, k, v, sinks, slopes, *args)
    cases = [(torch.ops.fastgpt.attention_flash_forward, (q, k, v, sinks, slopes, *args)),
             (torch.ops.fastgpt.attention_flash_backward, (dout, q, k, v, out, lse, sinks, slopes, *args)),
             (torch.ops.fastgpt.attention_flash_backward, (dout, q, k, v, out, lse, None, None, *args)),
             (torch.ops.fastgpt.attention_dropout_keep_mask, (q, k.shape[2], False, 12, 3, 0.1, 5, 0))]
    for op, op_args in cases:
        torch.library.opcheck(op.default, op_args)
