"""Packed (varlen) attention on the Triton kernels against the float64 reference, in the interpreter on
CPU (compiled on a GPU): batches of awkward lengths (1, 2, 17, 255, 256, 257, 1000 in one call), a
sequence of one token among long ones, T_q != T_k per sequence (the causal diagonal bottom-right),
a sequence with no keys; every option with and without dropout (the kernels' own mask), grouped
heads, fp32 and fp16; outputs and every gradient (dq, dk, dv, dsinks) by the parity rule; the lse
(H, total_q); and one launch of each kernel for the whole batch.

H = 2 and D = 16 keep the interpreter quick; small blocks (SMALL_BLOCKS) give every short sequence
several blocks, so a band has edges, whole blocks between them and blocks it skips."""

import pytest
import torch

from fastgpt.attention import naive_varlen_attention, varlen_attention, varlen_attention_with_mask
from fastgpt.verify.parity import compare

flash_ops = pytest.importorskip("fastgpt.kernels.flash_attention_ops", reason="triton is not installed")
from fastgpt.kernels import flash_attention_configs as cfg  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRADS = ("dq", "dk", "dv", "dsinks")
SMALL_BLOCKS = {"fwd": cfg.KernelConfig(32, 16, 4, 1), "fwd_decode": cfg.KernelConfig(16, 16, 4, 1),
                "bwd_dkdv": cfg.KernelConfig(16, 32, 4, 1), "bwd_dq": cfg.KernelConfig(32, 16, 4, 1)}
# the long sequences in wide blocks: the interpreter's time goes by the number of tiles; 255, 256
# and 257 still end below, on and past a block boundary
WIDE_BLOCKS = {"fwd": cfg.KernelConfig(128, 64, 4, 1), "bwd_dkdv": cfg.KernelConfig(64, 128, 4, 1),
               "bwd_dq": cfg.KernelConfig(128, 64, 4, 1)}
# the awkward lengths in one packed batch: one token among long ones, and both sides of 256
AWKWARD = [1, 2, 17, 255, 256, 257, 1000]
# (dtype, dropout_p): each case runs exactly (fp32) without dropout and in fp16 with the kernels' mask
RUNS = [(torch.float32, 0.0), (torch.float16, 0.3)] + ([(torch.bfloat16, 0.3)] if DEVICE == "cuda" else [])


def run_id(run) -> str:
    dtype, dropout_p = run
    return str(dtype).removeprefix("torch.") + ("-dropout" if dropout_p else "")


def _blocks(monkeypatch, blocks):
    if DEVICE == "cpu":
        for kernel, config in blocks.items():
            monkeypatch.setitem(cfg.INTERPRETER_CONFIGS, kernel, config)


@pytest.fixture
def small_blocks(monkeypatch):
    _blocks(monkeypatch, SMALL_BLOCKS)


@pytest.fixture
def wide_blocks(monkeypatch):
    _blocks(monkeypatch, WIDE_BLOCKS)


def cu_seqlens(lengths) -> torch.Tensor:
    """(B + 1,) int32: sequence b's rows are cu[b] .. cu[b + 1] - 1."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def packed_inputs(q_lens, k_lens, heads=(2, 2), D=16, seed=0, sinks=False, alibi=False):
    """(q (total_q, H, D), k, v (total_k, H_kv, D)) float64, cu_seqlens_q, cu_seqlens_k, the upstream
    gradient, sinks (H,) float64 or None, and the (B, H) ALiBi slopes (one row per sequence) or None."""
    H, H_kv = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), H, D, generator=g, dtype=torch.float64).to(DEVICE)
    k, v = (torch.randn(sum(k_lens), H_kv, D, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(DEVICE)
    sink = torch.randn(H, generator=g, dtype=torch.float64).to(DEVICE) if sinks else None
    slopes = (torch.rand(len(q_lens), H, generator=g) + 0.1).to(DEVICE) if alibi else None
    return (q, k, v), cu_seqlens(q_lens), cu_seqlens(k_lens), dout, sink, slopes


def assert_parity(q_lens, k_lens, dtype, heads=(2, 2), dropout_p=0.0, seed=0, sinks=False, alibi=False, **options):
    (q, k, v), cu_q, cu_k, dout, sink, slopes = packed_inputs(q_lens, k_lens, heads, seed=seed, sinks=sinks,
                                                              alibi=alibi)
    options = dict(options, alibi_slopes=slopes)
    drawn = {}

    def under_test(q, k, v, *sinks):
        extra = dict(options, sinks=sinks[0] if sinks else None)
        if dropout_p == 0.0:
            return varlen_attention(q, k, v, cu_q, cu_k, backend="triton", **extra)
        out, drawn["keep"] = varlen_attention_with_mask(q, k, v, cu_q, cu_k, dropout_p=dropout_p, backend="triton",
                                                        **extra)
        return out

    def reference(q, k, v, *sinks):
        return naive_varlen_attention(q, k, v, cu_q, cu_k, dropout_p, keep_mask=drawn.get("keep"),
                                      sinks=sinks[0] if sinks else None, **options)

    tensors = (q, k, v) if sink is None else (q, k, v, sink)
    result = compare(under_test, reference, tensors, dout, dtype, grad_names=GRADS[:len(tensors)])
    assert result.ok, f"{result.explain()}: errors {result.errors}, limits {result.limits}"
    if dropout_p:
        keep = drawn["keep"]
        assert keep.shape == (len(q_lens), heads[0], max(q_lens), max(k_lens)) and keep.dtype == torch.bool
        assert 0 < keep.float().mean() < 1
        for b, (T_q, T_k) in enumerate(zip(q_lens, k_lens)):  # outside its corner nothing is drawn
            assert not keep[b, :, T_q:].any() and not keep[b, :, :, T_k:].any()


@pytest.mark.usefixtures("wide_blocks")
@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_awkward_lengths_in_one_batch_match_the_reference(run):
    # causal self-attention over the lengths, grouped heads; the 1000-token sequence spans
    # many blocks of every kernel while the one-token sequence's blocks are nearly all padding
    dtype, dropout_p = run
    assert_parity(AWKWARD, AWKWARD, dtype, heads=(2, 1), dropout_p=dropout_p)


# (id, q_lens, k_lens, heads, options); "sinks" and "alibi" stand for random tensors
CASES = [
    # bottom-right diagonal per sequence: 1 query over 30 keys (a decode step), T_q = T_k, and more
    ("causal_fewer_queries", [1, 5, 17, 40], [30, 5, 50, 41], (2, 2), dict()),
    # at most DECODE_MAX_QUERIES queries per sequence: the decode configs' launch
    ("decode_steps", [1, 1, 3, 1], [30, 5, 70, 12], (4, 2), dict(window=(20, 0), sinks=True)),
    ("bidirectional_a_sequence_without_keys", [3, 20, 7, 1], [10, 0, 33, 2], (2, 2), dict(causal=False)),
    ("window", [33, 1, 70], [33, 9, 80], (2, 2), dict(window=(9, 0))),
    ("bidirectional_window", [40, 2, 17], [33, 2, 60], (2, 2), dict(causal=False, window=(5, 3))),
    ("softcap", [17, 1, 33], [17, 20, 40], (2, 2), dict(softcap=2.0)),
    ("sinks", [17, 1, 33], [17, 20, 40], (2, 2), dict(sinks=True)),
    ("alibi_per_sequence", [17, 1, 33], [17, 20, 40], (2, 2), dict(alibi=True)),
    ("gqa_everything", [33, 1, 17], [17, 30, 40], (4, 2),
     dict(causal=False, window=(8, 3), softcap=4.0, sinks=True, alibi=True)),
]


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("run", RUNS, ids=run_id)
@pytest.mark.parametrize("q_lens,k_lens,heads,options", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_options_match_the_reference(q_lens, k_lens, heads, options, run):
    dtype, dropout_p = run
    assert_parity(q_lens, k_lens, dtype, heads, dropout_p=dropout_p, seed=3, **options)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("sinks", [False, True], ids=["no_sinks", "sinks"])
def test_lse_is_h_by_total_q_natural_log_and_detached(sinks):
    q_lens, k_lens = [3, 20, 7, 1], [10, 0, 33, 2]  # sequence 1 sees no key: lse -inf, or the sink's logit
    (q, k, v), cu_q, cu_k, _, sink, _ = packed_inputs(q_lens, k_lens, sinks=sinks)
    options = dict(causal=False, window=(6, 2), sinks=sink)
    ref_out, ref_lse = naive_varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, **options)
    q, k, v = (t.float().requires_grad_(True) for t in (q, k, v))
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, backend="triton", return_lse=True, **options)
    assert lse.shape == (2, sum(q_lens)) and lse.dtype == torch.float32 and not lse.requires_grad
    assert out.shape == q.shape
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and torch.equal(lse[~finite], ref_lse[~finite].float())
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < 1e-5
    assert (out.double() - ref_out).abs().max() < 1e-5
    assert torch.equal(out[3:23], torch.zeros_like(out[3:23]))  # no key, no value
    # dropout acts after the softmax: the lse is the same with it
    (_, dropped_lse), _ = varlen_attention_with_mask(q, k, v, cu_q, cu_k, dropout_p=0.5, backend="triton",
                                                     return_lse=True, **options)
    assert torch.equal(dropped_lse, lse)


@pytest.mark.usefixtures("small_blocks")
def test_views_of_a_fused_projection_take_no_copy_and_match():
    # q, k, v as strided views of one (total, 3, H, D) buffer, the layout of a fused qkv projection
    lengths = [5, 40, 1, 23]
    cu = cu_seqlens(lengths)
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(sum(lengths), 3, 2, 16, generator=g).to(DEVICE).requires_grad_(True)
    q, k, v = qkv.unbind(1)  # (total, H, D) each, token stride 3·H·D
    out = varlen_attention(q, k, v, cu, cu, backend="triton", window=(7, 0))
    ref = naive_varlen_attention(*(t.double() for t in (q, k, v)), cu, cu, window=(7, 0))
    assert (out.double() - ref).abs().max() < 1e-5
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and torch.isfinite(qkv.grad).all()


class LaunchCounter:
    """Wraps triton's kernels as flash_attention_ops launches them: records (kernel, grid) per launch."""

    def __init__(self, monkeypatch):
        self.launches = []
        wrap = flash_ops.wrap_triton
        monkeypatch.setattr(flash_ops, "wrap_triton", lambda kernel: self._counted(kernel, wrap(kernel)))

    def _counted(self, kernel, launchable):
        counter = self

        class Counted:
            def __getitem__(self, grid):
                meta = {"BLOCK_M": 16, "BLOCK_N": 16}
                name = getattr(kernel, "fn", kernel).__name__
                counter.launches.append((name, grid(meta) if callable(grid) else grid))
                return launchable[grid]

        return Counted()


@pytest.mark.usefixtures("small_blocks")
def test_a_packed_batch_is_one_launch_of_each_kernel(monkeypatch):
    counter = LaunchCounter(monkeypatch)
    q_lens, k_lens = [1, 17, 40, 2, 33], [9, 17, 48, 2, 40]
    (q, k, v), cu_q, cu_k, dout, sink, _ = packed_inputs(q_lens, k_lens, heads=(4, 2), sinks=True)
    q, k, v, sink = (t.float().requires_grad_(True) for t in (q, k, v, sink))
    out = varlen_attention(q, k, v, cu_q, cu_k, backend="triton", sinks=sink, dropout_p=0.1)
    out.backward(dout.float())
    names = [name for name, _ in counter.launches]
    assert names == ["_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"], names
    grids = dict(counter.launches)
    # the grid covers the longest sequence, every sequence on z (16-row blocks here)
    assert grids["_attn_fwd"] == (3, 4, 5) and grids["_attn_bwd_dq"] == (3, 4, 5)
    assert grids["_attn_bwd_dkdv"] == (3, 2, 5)  # one program per key block and key/value head
    assert grids["_attn_bwd_preprocess"][1:] == (4, 5)


def test_bfloat16_is_refused_by_name_in_the_interpreter():
    if DEVICE != "cpu":
        pytest.skip("the GPU computes bfloat16")
    (q, k, v), cu_q, cu_k, *_ = packed_inputs([3, 5], [3, 5])
    with pytest.raises(ValueError, match="interpreter computes bfloat16 wrongly"):
        varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_q, cu_k, backend="triton")


def test_the_triton_path_declares_varlen():
    from fastgpt.attention.registry import get_path

    path = get_path("triton")
    assert "varlen" in path.options and "varlen" not in path.option_notes
