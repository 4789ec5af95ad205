"""The kernels that read a paged KV cache in place: `ext.cpu_flash` (C++, float32 and bfloat16) and
`triton` (in the interpreter on CPU, fp32 and fp16). On the same kernel path a paged call gives the
bits of the packed call over the same keys laid out contiguously, for page sizes 16 and 256, block
tables in random order, decode steps and several new tokens per sequence, grouped heads and every
option; it is within the parity rule of the float64 reference; the pages are never gathered; a call
that wants gradients is refused by name (auto takes a path that gathers); the C++ op refuses a
block table that points outside the pool."""

import re

import pytest
import torch

from fastgpt.attention.paged import PagedLayout, paged_attention
from fastgpt.attention.registry import kernels_ran, refusal
from fastgpt.attention.varlen import varlen_attention
from fastgpt.verify.parity import assess
from paged_cases import D, H, scattered_pages

LENGTHS = [1, 17, 300, 40]  # one token among longer ones; 300 spans pages of 16 and 256 alike
Q_LENS = {"decode": [1, 1, 1, 1], "several-new-tokens": [1, 3, 17, 2]}
OPTIONS = {"causal": {}, "options": dict(window=(24, 0), softcap=20.0, alibi=True, sinks=True)}


def in_place_paths():
    """(path, dtype) pairs that read pages in place and can run here."""
    pairs = [("ext.cpu_flash", torch.float32), ("ext.cpu_flash", torch.bfloat16),
             ("triton", torch.float32), ("triton", torch.float16)]
    return [pytest.param(path, dtype, id=f"{path}-{str(dtype).removeprefix('torch.')}") for path, dtype in pairs]


def _skip_unless_runs(path: str, dtype: torch.dtype) -> None:
    from fastgpt.attention.call import AttentionCall

    probe = AttentionCall.like(torch.empty(1, H, 1, D, dtype=dtype), kv_heads=2, kv_len=4)
    reason = refusal(probe, path)
    if reason is not None:
        pytest.skip(f"{path} cannot run here: {reason}")


def _options(name: str, dtype: torch.dtype) -> dict:
    options = dict(OPTIONS[name])
    g = torch.Generator().manual_seed(5)
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.rand(H, generator=g) * 0.1
    if options.pop("sinks", False):
        options["sinks"] = torch.randn(H, generator=g).to(dtype)
    return options


def _step(q_lens, page_size, dtype, seed=0):
    k, v, k_pages, v_pages, table, seq_lens = scattered_pages(LENGTHS, page_size, dtype, seed=seed)
    q = torch.randn(sum(q_lens), H, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    cu_q = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *LENGTHS]).cumsum(0).to(torch.int32)
    return q, k, v, k_pages, v_pages, table, seq_lens, cu_q, cu_k


def _forbid_gathering(monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("the pages were gathered: this path should read them in place")

    monkeypatch.setattr(PagedLayout, "gather", refuse)


@pytest.fixture
def never_gathered(monkeypatch):
    _forbid_gathering(monkeypatch)


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("q_lens", list(Q_LENS))
@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("path, dtype", in_place_paths())
def test_paged_equals_contiguous_bit_for_bit_on_the_same_path(path, dtype, page_size, q_lens, options, never_gathered):
    _skip_unless_runs(path, dtype)
    q, k, v, k_pages, v_pages, table, seq_lens, cu_q, cu_k = _step(Q_LENS[q_lens], page_size, dtype)
    opts = _options(options, dtype)
    kernels_ran(reset=True)
    paged, paged_lse = paged_attention(q, k_pages, v_pages, table, seq_lens, cu_q, backend=path, return_lse=True,
                                       **opts)
    assert kernels_ran(reset=True) == {path: 1}
    contiguous, lse = varlen_attention(q, k, v, cu_q, cu_k, backend=path, return_lse=True, **opts)
    assert torch.equal(paged, contiguous)
    assert torch.equal(paged_lse, lse)
    assert not paged.isnan().any()  # the unused slots (NaN) were never read


@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("path, dtype", in_place_paths())
def test_paged_in_place_is_within_parity_of_the_float64_reference(path, dtype, page_size, monkeypatch):
    _skip_unless_runs(path, dtype)
    q, _, _, k_pages, v_pages, table, seq_lens, cu_q, _ = _step(Q_LENS["several-new-tokens"], page_size, dtype, 3)
    opts = _options("options", dtype)
    exact = {**opts, "sinks": opts["sinks"].double()}
    # the reference gathers the pages (naive), in float64 and in dtype; the rule scales the latter's error
    oracle = paged_attention(q.double(), k_pages.double(), v_pages.double(), table, seq_lens, cu_q, backend="naive",
                             **exact)
    same_dtype = paged_attention(q, k_pages, v_pages, table, seq_lens, cu_q, backend="naive", **opts)
    _forbid_gathering(monkeypatch)
    got = paged_attention(q, k_pages, v_pages, table, seq_lens, cu_q, backend=path, **opts)
    result = assess({"out": got}, {"out": oracle}, {"out": same_dtype}, dtype)
    assert result.ok, result.explain()


@pytest.mark.parametrize("path", ["ext.cpu_flash", "triton"])
def test_a_paged_call_that_wants_gradients_is_refused_by_the_in_place_paths(path):
    _skip_unless_runs(path, torch.float32)
    q, _, _, k_pages, v_pages, table, seq_lens, cu_q, _ = _step(Q_LENS["decode"], 16, torch.float32)
    q.requires_grad_()
    with pytest.raises(ValueError, match=re.escape("it reads a paged KV cache in place, forward only")):
        paged_attention(q, k_pages, v_pages, table, seq_lens, cu_q, backend=path)
    with torch.no_grad():
        paged_attention(q, k_pages, v_pages, table, seq_lens, cu_q, backend=path)


def test_auto_with_gradients_takes_a_path_that_gathers_and_the_gradient_flows():
    q, _, _, k_pages, v_pages, table, seq_lens, cu_q, _ = _step(Q_LENS["decode"], 16, torch.float32)
    q.requires_grad_()
    kernels_ran(reset=True)
    paged_attention(q, k_pages, v_pages, table, seq_lens, cu_q).sum().backward()
    ran = kernels_ran(reset=True)
    assert set(ran) <= {"sdpa", "naive"} and sum(ran.values()) == 1
    assert q.grad is not None and q.grad.isfinite().all()


def test_the_cpp_op_refuses_a_block_table_outside_the_pool():
    _skip_unless_runs("ext.cpu_flash", torch.float32)
    from fastgpt.ext import ops

    q, _, _, k_pages, v_pages, table, _, cu_q, cu_k = _step(Q_LENS["decode"], 16, torch.float32)
    table = table.clone()
    table[2, 1] = k_pages.shape[0]  # sequence 2's second page: one past the pool
    with pytest.raises(RuntimeError, match=re.escape(f"block_table[2][1] = {k_pages.shape[0]} is outside the pool")):
        ops.attention_flash_paged(q, k_pages, v_pages, table, cu_q, cu_k, D**-0.5)
    with pytest.raises(ValueError, match="attention_flash_paged is forward only"):
        ops.attention_flash_paged(q.requires_grad_(), k_pages, v_pages, table, cu_q, cu_k, D**-0.5)


def test_fastgpt_parity_checks_a_paged_cache_the_output_only(capsys):
    from fastgpt.cli import main

    _skip_unless_runs("ext.cpu_flash", torch.float32)
    assert main(["parity", "--backends", "ext.cpu_flash", "naive", "--variants", "paged:32", "--dtypes",
                 "float32"]) == 0
    out = capsys.readouterr().out
    assert "-- paged:32" in out and "FAIL" not in out
    rows = [line for line in out.splitlines() if line.startswith("ext.cpu_flash float32")]
    assert rows and all(line.rstrip().endswith("ok") and line.count(" - ") >= 3 for line in rows)


def test_block_table_entries_past_a_sequences_pages_are_never_read():
    # unchecked and never read: whatever they hold (here past int32 and negative), the result is the same
    q, _, _, k_pages, v_pages, table, seq_lens, cu_q, _ = _step(Q_LENS["decode"], 16, torch.float32)
    wide = torch.cat([table.long(), torch.full((table.shape[0], 2), 2**40)], dim=1)
    wide[0, 1] = -7  # sequence 0 has one key: one page
    for path in ("naive", "ext.cpu_flash"):
        if path != "naive":
            _skip_unless_runs(path, torch.float32)
        with torch.no_grad():
            assert torch.equal(paged_attention(q, k_pages, v_pages, wide, seq_lens, cu_q, backend=path),
                               paged_attention(q, k_pages, v_pages, table, seq_lens, cu_q, backend=path))
