"""Packed sequences (fastgpt/attention/varlen.py) on ext.cpu_flash: the whole batch in one call of
the general CPU flash kernels (csrc/cpu/attention_flash_options.cpp), forward and backward, float32
and bfloat16, with every option. Parity with naive_varlen_attention in float64 by the project's rule
(outputs and every gradient, dsinks included) for batches of awkward lengths: one query or key,
a row block and one past it, a sequence of length 1 among long ones, T_q != T_k per sequence, a
sequence with no key. Dropout exactly through the kernel's own keep mask, which is the padded
(B, H, max_q, max_k) call's mask sequence by sequence; the lse (H, total_q); strided inputs; each
sequence the regular call of its own rows bit for bit; bad input refused in one line."""

from __future__ import annotations

import pytest
import torch

from fastgpt.attention import attention, naive_varlen_attention, varlen_attention, varlen_attention_with_mask
from fastgpt.verify.parity import compare

ext_ops = pytest.importorskip("fastgpt.ext.ops")  # builds or loads the extension
PATH = "ext.cpu_flash"

AWKWARD = [1, 2, 17, 255, 256, 257, 1000]  # one query, a row block and one past it, a long one among them
# name: (query lengths, key lengths). Causal ones need T_k >= T_q in each sequence (bottom-right).
# The sets without the 1000 keep the float64 reference, which materialises T_q × T_k, quick.
LENGTHS = {
    "awkward": (AWKWARD, AWKWARD),
    "longer-keys": ([17, 1, 255, 2, 257, 64], [40, 1, 256, 70, 300, 129]),
    "bidirectional": ([2, 255, 17, 1, 130, 65], [200, 0, 17, 5, 100, 257]),  # a sequence with no key, T_q > T_k
}
# name: (lengths, H, H_kv, D, options); sinks=True / alibi="H" or "BH" draw them per test.
CASES = {
    "causal-gqa": ("awkward", 2, 1, 16, dict()),
    "window+sinks": ("awkward", 2, 2, 16, dict(window=(40, 0), sinks=True)),
    "longer-keys": ("longer-keys", 2, 2, 16, dict()),
    "bidirectional+window+mqa": ("bidirectional", 2, 1, 16, dict(causal=False, window=(30, 7))),
    "bidirectional+sinks+alibi": ("bidirectional", 2, 2, 16, dict(causal=False, sinks=True, alibi="BH")),
    "softcap+alibi": ("longer-keys", 2, 2, 32, dict(softcap=2.0, alibi="H")),
    "everything": ("longer-keys", 4, 2, 16, dict(window=(50, 0), softcap=3.0, sinks=True, alibi="BH")),
}
DTYPES = [torch.float32, torch.bfloat16]


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)  # (B + 1,)


def _inputs(case, seed=0):
    """q (total_q, H, D), k, v (total_k, H_kv, D) float64, cu_seqlens_q/k, the upstream gradient,
    sinks (or None: an input with a gradient) and the other options (ALiBi slopes drawn)."""
    lengths, H, H_kv, D, options = CASES[case]
    q_lens, k_lens = LENGTHS[lengths]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), H, D, generator=g, dtype=torch.float64)
    k, v = torch.randn(sum(k_lens), 2 * H_kv, D, generator=g, dtype=torch.float64).split(H_kv, dim=1)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    options = dict(options)
    sinks = torch.randn(H, generator=g, dtype=torch.float64) if options.pop("sinks", False) else None
    alibi = options.pop("alibi", None)
    if alibi is not None:
        options["alibi_slopes"] = torch.rand((len(q_lens), H) if alibi == "BH" else (H,), generator=g) * 0.5
    return (q, k, v), _cu(q_lens), _cu(k_lens), dout, sinks, options


def _check(case, dtype, dropout_p):
    (q, k, v), cu_q, cu_k, dout, sinks, options = _inputs(case)
    keep = {}

    def under_test(q, k, v, *sinks_arg):
        out, keep["mask"] = varlen_attention_with_mask(q, k, v, cu_q, cu_k, dropout_p=dropout_p, backend=PATH,
                                                       sinks=sinks_arg[0] if sinks_arg else None, **options)
        return out

    def reference(q, k, v, *sinks_arg):
        return naive_varlen_attention(q, k, v, cu_q, cu_k, dropout_p, keep_mask=keep["mask"],
                                      sinks=sinks_arg[0] if sinks_arg else None, **options)

    inputs = (q, k, v) + ((sinks,) if sinks is not None else ())
    names = ("dq", "dk", "dv") + (("dsinks",) if sinks is not None else ())
    return compare(under_test, reference, inputs, dout, dtype, grad_names=names)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_float64(case, dtype, dropout_p):
    result = _check(case, dtype, dropout_p)
    assert result.ok, f"{case}: {result.explain()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["everything", "bidirectional+window+mqa", "bidirectional+sinks+alibi"])
def test_the_log_sum_exp_is_h_by_total_q(case, dtype):
    """float32 lse (H, total_q), the sink counted in it, -inf where a row sees no key; detached."""
    (q, k, v), cu_q, cu_k, _, sinks, options = _inputs(case)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, backend=PATH, return_lse=True, sinks=sinks, **options)
    _, ref = naive_varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, return_lse=True, sinks=sinks,
                                    **options)
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0]) and not lse.requires_grad
    assert out.shape == q.shape and out.requires_grad
    assert torch.equal(lse.isinf(), ref.isinf())
    finite = ref.isfinite()
    atol = 2e-5 if dtype == torch.float32 else 2e-2  # bfloat16: the inputs' rounding moves the scores
    torch.testing.assert_close(lse[finite], ref[finite].float(), atol=atol, rtol=0)


def test_a_sequence_without_keys_gives_zeros_and_no_gradient():
    (q, k, v), cu_q, cu_k, _, _, _ = _inputs("bidirectional+window+mqa")
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, causal=False, backend=PATH, return_lse=True)
    rows = slice(int(cu_q[1]), int(cu_q[2]))  # sequence 1: 255 queries, no key
    assert torch.equal(out[rows], torch.zeros_like(out[rows])) and lse[:, rows].eq(float("-inf")).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(dq[rows], torch.zeros_like(dq[rows]))
    assert all(g.isfinite().all() for g in (dq, dk, dv))


def _each_sequence_on_its_own(q, k, v, cu_q, cu_k, **options):
    """out and (dq, dk, dv) of the regular call of each sequence's rows, concatenated."""
    outs, grads = [], [[], [], []]
    for b in range(cu_q.numel() - 1):
        rows_q, rows_k = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        leaves = [t[rows].transpose(0, 1).unsqueeze(0).detach().requires_grad_()  # (1, heads, T, D)
                  for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k))]
        out = attention(*leaves, backend=PATH, **options)
        out.backward(torch.ones_like(out))
        outs.append(out.detach()[0].transpose(0, 1))
        for acc, leaf in zip(grads, leaves):
            acc.append(leaf.grad[0].transpose(0, 1))
    return [torch.cat(outs)] + [torch.cat(g) for g in grads]


def test_each_sequence_is_its_regular_call_bit_for_bit():
    """The same work items as the regular call of each sequence alone (one sequence per batch
    entry), on strided views of fused projections: equal bits, forward and backward."""
    (q, k, v), cu_q, cu_k, _, _, options = _inputs("softcap+alibi")
    slopes = options.pop("alibi_slopes")  # (H,): the same slope for every sequence
    q_buf = torch.randn(q.shape[0], q.shape[1] + 3, q.shape[2])
    q_buf[:, :q.shape[1]] = q.float()
    q = q_buf[:, :q.shape[1]]  # rows strided past the other heads, as a fused projection leaves them
    k, v = (t.float() for t in (k, v))  # views of one (total_k, 2·H_kv, D) buffer
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = varlen_attention(*leaves, cu_q, cu_k, backend=PATH, alibi_slopes=slopes, **options)
    out.backward(torch.ones_like(out))
    packed = [out.detach()] + [t.grad for t in leaves]
    alone = _each_sequence_on_its_own(q, k, v, cu_q, cu_k, alibi_slopes=slopes, **options)
    for name, a, b in zip(("out", "dq", "dk", "dv"), packed, alone, strict=True):
        assert torch.equal(a, b), name


def test_the_dropout_mask_is_the_padded_calls():
    """Query i of sequence b draws the row of (b, h, i) in the (B, H, max_q, max_k) call and keeps
    its key indices: a bidirectional call's mask is that call's mask inside each sequence, False
    outside it; the kept fraction is 1 - p."""
    (q, k, v), cu_q, cu_k, _, _, _ = _inputs("bidirectional+window+mqa")
    q, k, v = (t.float() for t in (q, k, v))
    torch.manual_seed(5)
    _, keep = varlen_attention_with_mask(q, k, v, cu_q, cu_k, dropout_p=0.3, causal=False, backend=PATH)
    torch.manual_seed(5)
    seed = int(ext_ops.draw_seed())
    q_lens, k_lens = (cu[1:] - cu[:-1] for cu in (cu_q, cu_k))
    B, H, max_q, max_k = len(q_lens), q.shape[1], int(q_lens.max()), int(k_lens.max())
    assert keep.shape == (B, H, max_q, max_k) and keep.dtype == torch.bool
    padded = ext_ops.attention_dropout_keep_mask(torch.empty(B, H, max_q, 1), max_k, 0.3, seed, causal=False,
                                                window=(-1, -1))
    inside = torch.zeros_like(keep)
    for b, (T_q, T_k) in enumerate(zip(q_lens.tolist(), k_lens.tolist())):
        inside[b, :, :T_q, :T_k] = True
    assert torch.equal(keep, padded & inside)
    assert 0.65 < keep[inside].float().mean() < 0.75


def test_repeats_are_bit_equal_and_do_not_depend_on_the_thread_count():
    (q, k, v), cu_q, cu_k, _, sinks, options = _inputs("everything")
    q, k, v, sinks = (t.float() for t in (q, k, v, sinks))

    def run():
        torch.manual_seed(7)  # the dropout seed
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, sinks)]
        out = varlen_attention(*leaves[:3], cu_q, cu_k, sinks=leaves[3], dropout_p=0.1, backend=PATH, **options)
        out.backward(torch.ones_like(out))
        return [out.detach()] + [t.grad for t in leaves]

    first, again = run(), run()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, one_thread, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_the_whole_batch_is_one_call_of_each_op():
    """One forward and one backward op call for all seven sequences: no loop over them in Python."""
    (q, k, v), cu_q, cu_k, _, _, options = _inputs("causal-gqa")
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        varlen_attention(q, k, v, cu_q, cu_k, backend=PATH, **options).sum().backward()
    calls = [event.name for event in profile.events() if event.name.startswith("fastgpt::")]
    assert calls.count("fastgpt::attention_flash_varlen_forward") == 1
    assert calls.count("fastgpt::attention_flash_varlen_backward") == 1
    assert len(calls) == 2, calls


@pytest.mark.parametrize("path", ["ext.cpu_packed", "ext.cpu_flash_amx"])
def test_the_other_paths_refuse_varlen_by_name(path):
    q, k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    cu = _cu([2, 3])
    with pytest.raises(ValueError, match=f"{path} does not take varlen"):
        varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, cu, backend=path)


def _op_args(total_q=10, total_k=12, H=2, H_kv=1, D=8):
    q, k, v = torch.randn(total_q, H, D), torch.randn(total_k, H_kv, D), torch.randn(total_k, H_kv, D)
    return q, k, v, _cu([4, 6]), _cu([5, 7])


def _forward(q, k, v, cu_q, cu_k, sinks=None, slopes=None, causal=True, window=(-1, 0)):
    return torch.ops.fastgpt.attention_flash_varlen_forward(q, k, v, cu_q, cu_k, sinks, slopes, 0.3, causal, *window,
                                                            0.0, 0.0, 0, 0)


BAD_OP_INPUT = {
    "cu_seqlens_q runs from 0 to 9; it must run from 0 to total_q = 10":
        lambda q, k, v, cu_q, cu_k: _forward(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), cu_k),
    r"cu_seqlens_k\[2\] = 3 < cu_seqlens_k\[1\] = 9; it must never decrease":
        lambda q, k, v, cu_q, cu_k: _forward(q, k, v, _cu([4, 2, 4]), torch.tensor([0, 9, 3, 12], dtype=torch.int32)),
    "cu_seqlens_q has 3 entries and cu_seqlens_k 4":
        lambda q, k, v, cu_q, cu_k: _forward(q, k, v, cu_q, torch.tensor([0, 5, 6, 12], dtype=torch.int32)),
    "cu_seqlens_q is Long of shape": lambda q, k, v, cu_q, cu_k: _forward(q, k, v, cu_q.long(), cu_k),
    "sequence 0 has T_q = 6 > T_k = 5 in a causal call":
        lambda q, k, v, cu_q, cu_k: _forward(q, k, v, _cu([6, 4]), cu_k),
    r"q must have 3 dims \(total_q, H, D\) in a packed call":
        lambda q, k, v, cu_q, cu_k: _forward(q[None], k, v, cu_q, cu_k),
    r"alibi_slopes has shape \[2\]; it must be \(B, H\) = \[2, 2\]":
        lambda q, k, v, cu_q, cu_k: _forward(q, k, v, cu_q, cu_k, slopes=torch.zeros(2)),
    r"lse is Float of shape \[10, 2\]":
        lambda q, k, v, cu_q, cu_k: torch.ops.fastgpt.attention_flash_varlen_backward(
            q, q, k, v, q, torch.zeros(10, 2), cu_q, cu_k, None, None, 0.3, True, -1, 0, 0.0, 0.0, 0, 0),
}


@pytest.mark.parametrize("message", list(BAD_OP_INPUT))
def test_bad_input_to_the_op_is_refused_in_one_line(message):
    with pytest.raises(RuntimeError, match=message) as caught:
        BAD_OP_INPUT[message](*_op_args())
    assert "\n" not in str(caught.value).strip()


def test_bad_input_to_the_python_op_is_refused_by_name():
    q, k, v, cu_q, cu_k = _op_args()
    with pytest.raises(ValueError, match="cu_seqlens_k must be a \\(B \\+ 1,\\) int32 tensor"):
        ext_ops.attention_flash_varlen(q, k, v, cu_q, cu_k.long(), 0.3)
    with pytest.raises(ValueError, match=r"alibi_slopes must be a floating tensor of shape \(2,\) or \(2, 2\)"):
        ext_ops.attention_flash_varlen(q, k, v, cu_q, cu_k, 0.3, alibi_slopes=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="q must be a 3-dim tensor"):
        ext_ops.attention_flash_varlen(q[None], k, v, cu_q, cu_k, 0.3)


def test_opcheck():
    """Schemas and fake kernels of the three varlen ops (their autograd is ops.py's Function)."""
    q, k, v, cu_q, cu_k = _op_args()
    sinks, slopes = torch.randn(2), torch.rand(2, 2)
    args = (0.3, False, 3, 2, 2.5, 0.1, 5, 0)
    out, lse = torch.ops.fastgpt.attention_flash_varlen_forward(q, k, v, cu_q, cu_k, sinks, slopes, *args)
    dout = torch.randn_like(out)
    cases = [(torch.ops.fastgpt.attention_flash_varlen_forward, (q, k, v, cu_q, cu_k, sinks, slopes, *args)),
             (torch.ops.fastgpt.attention_flash_varlen_backward,
              (dout, q, k, v, out, lse, cu_q, cu_k, sinks, slopes, *args)),
             (torch.ops.fastgpt.attention_flash_varlen_backward,
              (dout, q, k, v, out, lse, cu_q, cu_k, None, None, *args)),
             (torch.ops.fastgpt.attention_varlen_dropout_keep_mask, (q, cu_q, cu_k, 6, 7, False, 3, 2, 0.1, 5, 0))]
    for op, op_args in cases:
        torch.library.opcheck(op.default, op_args)
