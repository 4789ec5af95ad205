"""The registry records the kernel path that actually ran: for every path this machine can run,
named, through its backend's name and through auto; and the training metrics line says it too."""

from __future__ import annotations

import json

import pytest
import torch

from fastgpt.attention import (AttentionCall, backend_names, causal_attention, get_backend, kernel_path_names,
                               kernels_ran, naive_attention, refusal, select_kernel)
from fastgpt.verify.parity import make_qkv

# (B, H, H_kv, T_q, T_k, D): enough key/value heads for the flash paths' threads, a cached step
SHAPES = [(2, 4, 2, 24, 24, 16), (2, 4, 4, 3, 24, 16)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def runnable_call(path: str):
    """(q, k, v) of a shape and dtype that `path` runs on CPU here, or the reasons it runs none."""
    reasons = []
    for dtype in DTYPES:
        for shape in SHAPES:
            q, k, v = make_qkv(shape, dtype, "cpu")
            reason = refusal(AttentionCall.of(q, k, v), path)
            if reason is None:
                return (q, k, v), None
            reasons.append(reason)
    return None, "; ".join(dict.fromkeys(reasons))


@pytest.mark.parametrize("path", kernel_path_names())
def test_a_named_path_records_itself_and_matches_the_reference(path):
    inputs, reason = runnable_call(path)
    if inputs is None:
        pytest.skip(f"{path} does not run on this machine: {reason}")
    q, k, v = inputs
    kernels_ran(reset=True)
    out = causal_attention(q, k, v, backend=path)
    assert kernels_ran(reset=True) == {path: 1}
    ref = naive_attention(q.double(), k.double(), v.double())
    tol = 1e-4 if q.dtype == torch.float32 else 5e-2
    assert (out.double() - ref).abs().max() < tol


@pytest.mark.parametrize("backend", ["auto", *backend_names()])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_and_a_backend_record_the_path_select_kernel_names(backend, shape, dtype):
    q, k, v = make_qkv(shape, dtype, "cpu")
    if refusal(AttentionCall.of(q, k, v, 0.1), backend) is not None:
        pytest.skip(f"{backend} does not run {dtype} here")
    chosen = select_kernel(q, k, v, dropout_p=0.1, backend=backend)
    assert backend in ("auto", chosen.backend) and chosen.name in kernel_path_names()
    kernels_ran(reset=True)
    causal_attention(q, k, v, dropout_p=0.1, backend=backend)
    assert kernels_ran(reset=True) == {chosen.name: 1}


def test_a_path_outside_its_backend_is_refused_by_name():
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="not a known attention backend or kernel path"):
        select_kernel(q, backend="ext.gpu_magic")
    from fastgpt.attention.ext_backend import ext_attention

    with pytest.raises(ValueError, match="is not one of ext's kernel paths"):
        ext_attention(q, q, q, path="sdpa")


def test_every_path_belongs_to_a_registered_backend():
    for name in kernel_path_names():
        assert any(p.name == name for p in get_backend(name).paths), name


def test_training_metrics_record_the_kernels_that_ran(tmp_path, small_corpus):
    from fastgpt.run.config import make_configs
    from fastgpt.run.data import CharDataset
    from fastgpt.run.trainer import Trainer

    mc, tc = make_configs("cpu", {"max_iters": 2, "eval_interval": 1, "eval_iters": 1, "batch_size": 2,
                                  "block_size": 16, "n_layer": 1, "dropout_p": 0.1, "backend": "naive",
                                  "out_dir": str(tmp_path / "run"), "progress": False})
    trainer = Trainer(mc, tc, CharDataset.load(small_corpus))
    assert trainer.attention_kernel() == "naive"
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]["kernels"]
    assert last["naive"] > 0 and last.get("dropout.ext", 0) + last.get("dropout.torch", 0) > 0, last
    assert set(last) <= {"naive", "dropout.ext", "dropout.torch", "linear.torch"}, last
