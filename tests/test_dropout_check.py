"""fastgpt.verify.dropout_check, the checks `fastgpt gpu-report` runs on the fused kernels' dropout: they
pass for the kernels, and each fails when what it guards is broken."""

import pytest
import torch

from fastgpt.verify import dropout_check
from fastgpt.attention import available_backends

SHAPE = (2, 2, 37, 100, 32)  # fewer queries than keys: the bottom-right diagonal too


@pytest.mark.parametrize("shape", [SHAPE, (2, 6, 2, 21, 30, 16)], ids=["mha", "gqa"])  # 3 heads per k/v head
@pytest.mark.parametrize("backend", [b for b in dropout_check.masked_backends() if b in available_backends("cpu")])
def test_the_fused_backends_pass(backend, shape):
    result = dropout_check.check_dropout(backend, shape, torch.float32)
    assert result.ok, result.as_dict()
    assert abs(result.kept_fraction - 0.8) <= result.kept_limit


def test_a_backward_that_draws_another_mask_fails_mask_parity(monkeypatch):
    if "ext" not in available_backends("cpu"):
        pytest.skip("the C++ extension cannot be built here")
    real = dropout_check._masked_call

    def forward_and_mask_from_different_seeds(backend, dropout_p):
        fn, state = real(backend, dropout_p)

        def fn_with_wrong_mask(q, k, v):
            out = fn(q, k, v)
            state["mask"] = state["mask"].roll(1, dims=-1)  # the reference now uses another mask
            return out

        return fn_with_wrong_mask, state

    monkeypatch.setattr(dropout_check, "_masked_call", forward_and_mask_from_different_seeds)
    result = dropout_check.check_dropout("ext", SHAPE, torch.float32)
    assert not result.ok and result.as_dict()["mask_parity"] != "ok"


def test_a_backend_whose_mask_cannot_be_read_is_refused_by_name():
    with pytest.raises(ValueError, match="backend='sdpa' cannot give back its dropout mask; these can: ext"):
        dropout_check.check_dropout("sdpa", SHAPE, torch.float32)
