"""Linear + cross-entropy (fastgpt/ops/cross_entropy.py): every kernel path against the float64
reference (PyTorch's F.linear + F.cross_entropy in float64), the loss and the gradients of x, the
weight and the bias, by the parity rule (2×/3× the reference's own error in the dtype, plus a
floor), at awkward sizes (rows not a multiple of the chunk, hidden 1, vocab 1, every target
ignored), with label smoothing and ignore_index; the chunked path never makes the (N, V) logits;
refusals by name; which path ran is recorded."""

import math
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastgpt.ops.cross_entropy as lce
from fastgpt.attention import kernels_ran
from fastgpt.ops import LINEAR_CROSS_ENTROPY, linear_cross_entropy
from fastgpt.verify.parity import compare

# (rows, hidden, vocab, ignored every k-th target (0: none; 1: all))
SIZES = {"ragged-chunks": (37, 16, 101, 5), "hidden-1": (9, 1, 13, 4), "vocab-1": (11, 8, 1, 3),
         "all-ignored": (6, 8, 17, 1), "3d-rows": ((3, 7), 12, 29, 4)}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so every case walks several, the last one short."""
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 4 * 101)


def _inputs(size, seed=0):
    rows, hidden, vocab, every = SIZES[size]
    lead = rows if isinstance(rows, tuple) else (rows,)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1
    targets = torch.randint(vocab, lead, generator=g)
    if every:
        targets.view(-1)[::every] = -100
    return x, weight, bias, targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_parity_with_the_float64_reference(backend, dtype, size, with_bias, label_smoothing, reduction, small_chunks):
    x, weight, bias, targets = _inputs(size)
    options = dict(label_smoothing=label_smoothing, reduction=reduction)

    def under_test(x, weight, *bias):
        return linear_cross_entropy(x, weight, targets, *bias, backend=backend, **options)

    def reference(x, weight, *bias):
        return linear_cross_entropy(x, weight, targets, *bias, backend="naive", **options)

    inputs, names = ((x, weight, bias), ("dx", "dweight", "dbias")) if with_bias else ((x, weight), ("dx", "dweight"))
    dout = torch.tensor(0.7, dtype=torch.float64)
    if SIZES[size][3] == 1 and reduction == "mean":  # nothing to average: NaN, and zero gradients, as PyTorch
        loss = under_test(*(t.to(dtype).requires_grad_() for t in inputs))
        assert loss.isnan()
        return
    result = compare(under_test, reference, inputs, dout, dtype, names)
    assert result.ok, result.explain()


def test_every_target_ignored_gives_pytorchs_nan_mean_and_zero_gradients():
    x, weight, bias, targets = (t.float() if t.is_floating_point() else t for t in _inputs("all-ignored"))
    for backend in ("torch", "naive"):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        loss = linear_cross_entropy(*leaves[:2], targets, leaves[2], backend=backend)
        loss.backward()
        assert loss.isnan() and all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves), backend


class _LargestOutput(TorchDispatchMode):
    """The most elements any op's output had while it was on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_the_chunked_path_never_makes_the_logits_whole(monkeypatch):
    rows, hidden, vocab = 512, 8, 1000
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 64 * vocab)  # 64 rows of logits at a time
    x = torch.randn(rows, hidden, requires_grad=True)
    weight = torch.randn(vocab, hidden, requires_grad=True)
    targets = torch.randint(vocab, (rows,))
    for backend, most in (("torch", 64 * vocab), ("naive", rows * vocab)):
        with _LargestOutput() as seen:
            linear_cross_entropy(x, weight, targets, backend=backend).backward()
        assert seen.largest == most, (backend, seen.largest)


def test_reduction_none_runs_on_the_reference_and_the_chunked_path_refuses_it_by_name():
    x, weight, bias, targets = (t.float() if t.is_floating_point() else t for t in _inputs("ragged-chunks"))
    kernels_ran(reset=True)
    per_row = linear_cross_entropy(x, weight, targets, reduction="none")
    assert per_row.shape == targets.shape and kernels_ran(reset=True) == {"linear_cross_entropy:naive": 1}
    refusal = "torch does not take reduction_none (reduction_none: the gradients are made in the forward"
    with pytest.raises(ValueError, match=re.escape(refusal)):
        linear_cross_entropy(x, weight, targets, reduction="none", backend="torch")
    linear_cross_entropy(x, weight, targets)
    assert kernels_ran(reset=True) == {"linear_cross_entropy:torch": 1}
    assert LINEAR_CROSS_ENTROPY.backend_names() == ["naive", "torch"]


@pytest.mark.parametrize("change, message", [
    (dict(weight=torch.zeros(5, 3)), "x has shape (4, 8) and weight (5, 3): weight must be (V, H)"),
    (dict(targets=torch.zeros(3, dtype=torch.int64)),
     "targets is torch.int64 of shape (3); it must be int64 (or int32) of shape (4,)"),
    (dict(targets=torch.zeros(4)), "targets is torch.float32 of shape (4); it must be int64"),
    (dict(bias=torch.zeros(6)), "bias is torch.float32 (6); it must be (V,) = (5,)"),
    (dict(label_smoothing=1.5), "label_smoothing must be a number in [0, 1]; got 1.5"),
    (dict(reduction="max"), "reduction must be one of mean, sum, none; got 'max'"),
    (dict(ignore_index=1.0), "ignore_index must be an int; got 1.0"),
    (dict(x=torch.zeros(4, 8, dtype=torch.float64)), "x is torch.float64 and weight torch.float32"),
    (dict(backend="cuda-magic"), "backend='cuda-magic' is not a known linear_cross_entropy backend"),
])
def test_bad_input_is_refused_in_one_line_naming_it(change, message):
    args = dict(x=torch.zeros(4, 8), weight=torch.zeros(5, 8), targets=torch.zeros(4, dtype=torch.int64), bias=None)
    args.update(change)
    with pytest.raises((TypeError, ValueError), match=re.escape(message)) as info:
        linear_cross_entropy(args.pop("x"), args.pop("weight"), args.pop("targets"), args.pop("bias"), **args)
    assert "\n" not in str(info.value)


def test_the_benchmark_times_each_path_with_its_peak_memory(tmp_path, capsys):
    import json

    from fastgpt.cli import main

    out = tmp_path / "out"
    argv = ["bench", "cross-entropy", "--vocab-sizes", "300", "--tokens", "64", "--hidden", "8", "--reps", "2",
            "--out-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "cross_entropy.json").read_text())
    assert [(r["vocab"], r["path"]) for r in result["rows"]] == [(300, "naive"), (300, "torch")]
    assert all(r["median_s"] > 0 and r["logits_mib"] == 64 * 300 * 4 / 2**20 for r in result["rows"])
    assert (out / "cross_entropy.png").stat().st_size > 0 and "logits MiB" in capsys.readouterr().out
    assert main(["bench", "cross-entropy", "--backends", "auto", "--out-dir", str(out)]) == 2
    assert "--backends auto: the benchmark times named kernel paths: naive, torch" in capsys.readouterr().err
    assert main(["bench", "cross-entropy", "--seq-lens", "8", "--out-dir", str(out)]) == 2
