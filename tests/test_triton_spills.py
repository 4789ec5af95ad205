"""Configs that spill where they run are dropped before the autotuner times them.

Spills move with the ptxas that each triton bundles, so no fixed list of configs holds on every
version: on a GPU the autotuner's early_config_prune (flash_attention_ops._spill_pruner) compiles
each candidate with the call's arguments and loads it, the driver reports its local memory
before any launch, and the spilling ones are dropped. No GPU here: a stand-in compiled kernel
reports the spills. `fastgpt check` tells such configs (dropped at run time) from a failure: a
(kernel, arch, dtype, head dim, dropout) left with no spill-free config.
"""

import logging

import pytest
import torch

from fastgpt.kernels import flash_attention_configs as cfg
from fastgpt.verify import triton_compile as tcc

C = cfg.KernelConfig


def test_the_spill_free_configs_are_kept_in_order():
    spills = {C(128, 64, 8, 3): 48, C(64, 64, 4, 3): 0, C(64, 32, 4, 3): 0}
    kept, measured = cfg.drop_spilling(list(spills), spills.get)
    assert kept == [C(64, 64, 4, 3), C(64, 32, 4, 3)]
    assert measured == list(spills.items())


def test_when_every_config_spills_the_least_spilling_is_kept():
    spills = {C(128, 64, 8, 3): 48, C(64, 64, 4, 3): 8, C(32, 64, 4, 3): None}  # None: does not fit at all
    kept, _ = cfg.drop_spilling(list(spills), spills.get)
    assert kept == [C(64, 64, 4, 3)]
    kept, _ = cfg.drop_spilling([C(32, 64, 4, 3)], spills.get)
    assert kept == [C(32, 64, 4, 3)]  # nothing fits: the launch says why


# --- the autotuner's pruning, with a stand-in for the compiled kernel -------------------------------

flash_ops = pytest.importorskip("fastgpt.kernels.flash_attention_ops", reason="triton is not installed")


class FakeCompiled:
    """What JITFunction.warmup returns: the driver's numbers once _init_handles loaded the binary."""

    def __init__(self, n_spills):
        self.n_spills, self.n_regs, self.loaded = None, None, False
        self._spills = n_spills

    def _init_handles(self):
        if self._spills is None:
            from triton.runtime.errors import OutOfResources

            raise OutOfResources(300_000, 232_448, "shared memory")
        self.n_spills, self.n_regs, self.loaded = self._spills, 255, True


class FakeKernel:
    """Stands in for a jit kernel: warmup 'compiles' a config; its spills (local memory in 4-byte
    words, as the driver reports) by (BLOCK_M, BLOCK_N, num_warps)."""

    def __init__(self, spills):
        self.spills, self.warmups = spills, []

    def warmup(self, *, grid, **kwargs):
        assert "warmup" not in kwargs and grid
        self.warmups.append(kwargs)
        return FakeCompiled(self.spills.get((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"]), 0))


def _prune(monkeypatch, kernel, spills, capability=(9, 0), head_dim=96, dropout=True):
    """Runs the pruning of the autotuner `_tuned` makes, as Triton's Autotuner.run calls it."""
    monkeypatch.setattr(flash_ops, "_TUNERS", {})
    tuner = flash_ops._tuned(kernel, capability, cfg.padded_head_dim(head_dim), False, False, 256)
    fake = FakeKernel(spills)
    monkeypatch.setitem(flash_ops._KERNELS, kernel, fake)
    monkeypatch.setattr(flash_ops, "_compilable", lambda named_args: True)
    monkeypatch.setattr(flash_ops, "_SPILLING", [])
    q = torch.zeros(1, 2, 8, head_dim, dtype=torch.float16)
    tuner.nargs = {name: q if name[0].isupper() else 1 for name in tuner.arg_names
                   if name not in ("HEAD_DIM", "HEAD_DIM_PAD", "BLOCK_M", "BLOCK_N", "DROPOUT", "DOT_PRECISION")}
    kwargs = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=cfg.padded_head_dim(head_dim), DROPOUT=dropout,
                  DOT_PRECISION="tf32", grid=lambda meta: (1, 1, 1), warmup=False)
    return tuner, tuner.prune_configs(kwargs), fake


def _shipped(kernel, capability=(9, 0), head_dim=96):
    return cfg.configs(kernel, capability, cfg.padded_head_dim(head_dim))


@pytest.fixture()
def logged():
    """The pruning's log records (its own handler: the CLI may have stopped `fastgpt` propagating)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    level = flash_ops.log.level
    flash_ops.log.setLevel(logging.INFO)
    flash_ops.log.addHandler(handler)
    yield records
    flash_ops.log.removeHandler(handler)
    flash_ops.log.setLevel(level)


def test_the_autotuner_drops_a_spilling_config_before_timing_it(monkeypatch, logged):
    spilling, fine = _shipped("fwd")  # sm_90 16-bit fwd at D=96: M128/N64/w8, M64/N64/w4
    tuner, kept, fake = _prune(monkeypatch, "fwd", {(spilling.block_m, spilling.block_n, spilling.num_warps): 12})
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in kept] == [
        (fine.block_m, fine.block_n, fine.num_warps)]
    # each candidate was compiled with the call's own arguments and constexprs, and its config
    assert len(fake.warmups) == 2 and all(w["DROPOUT"] is True and w["HEAD_DIM"] == 96 for w in fake.warmups)
    assert {w["num_stages"] for w in fake.warmups} == {spilling.num_stages}
    (record,) = flash_ops.spilling_configs()
    assert record == {"kernel": "fwd", "call": "D=96 dropout=True float16 sm_90", "config": str(spilling),
                      "local_bytes": 48, "dropped": True}
    (info,) = logged
    assert info.levelno == logging.INFO
    assert "fwd D=96 dropout=True float16 sm_90: dropped M128/N64/w8/s3 (48 bytes of local memory)" in info.getMessage()


def test_when_every_config_spills_the_least_spilling_one_runs_and_a_warning_says_so(monkeypatch, logged):
    a, b = _shipped("bwd_dkdv")
    _, kept, _ = _prune(monkeypatch, "bwd_dkdv", {(a.block_m, a.block_n, a.num_warps): 30,
                                                  (b.block_m, b.block_n, b.num_warps): 2})
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in kept] == [(b.block_m, b.block_n, b.num_warps)]
    assert [(r["config"], r["dropped"]) for r in flash_ops.spilling_configs()] == [(str(a), True), (str(b), False)]
    (warning,) = logged
    assert warning.levelno == logging.WARNING
    assert "every config spills" in warning.getMessage() and f"running the least-spilling, {b}" in warning.getMessage()


def test_a_warmup_that_fails_keeps_every_config_and_says_so(monkeypatch, logged):
    # On a triton whose warmup API differs, the attention call must still run: every config is timed.
    def no_warmup(**kwargs):
        raise TypeError("warmup() got an unexpected keyword argument 'grid'")

    configs = _shipped("fwd")
    monkeypatch.setattr(FakeKernel, "warmup", lambda self, **kwargs: no_warmup(**kwargs))
    _, kept, _ = _prune(monkeypatch, "fwd", {})
    assert len(kept) == len(configs) and not flash_ops.spilling_configs()
    (warning,) = logged
    assert warning.levelno == logging.WARNING and "could not measure" in warning.getMessage()
    assert "TypeError" in warning.getMessage()


def test_a_config_over_the_shared_memory_is_dropped_too(monkeypatch):
    a, b = _shipped("bwd_dq")
    _, kept, _ = _prune(monkeypatch, "bwd_dq", {(a.block_m, a.block_n, a.num_warps): None})
    assert len(kept) == 1 and kept[0].kwargs["BLOCK_M"] == b.block_m and kept[0].num_warps == b.num_warps
    assert flash_ops.spilling_configs()[0]["local_bytes"] is None


def test_spill_free_configs_are_all_kept_and_nothing_is_recorded(monkeypatch):
    tuner, kept, _ = _prune(monkeypatch, "fwd_decode", {})
    assert kept == tuner.configs and flash_ops.spilling_configs() == []


def test_traced_or_cpu_calls_are_not_compiled(monkeypatch):
    # torch.compile traces the kernels with fake tensors, and the interpreter runs CPU tensors:
    # there is nothing to load, and the configs pass as they are
    q = torch.zeros(1, 2, 8, 64)
    assert not flash_ops._compilable({"Q": q, "K": q, "H": 2})
    monkeypatch.setattr(flash_ops, "_KERNELS", {})  # would raise if the pruning compiled anything
    prune = flash_ops._spill_pruner("fwd", (9, 0))
    configs = [object(), object()]
    assert prune(configs, {"Q": q}, HEAD_DIM=64, grid=None, warmup=False) is configs


# --- `fastgpt check`: a spilling config is dropped at run time; a failure is a call with none left ----

def _result(config, spill, dropout=False, kernel="fwd", error=None, shared=1024):
    return tcc.Result(tcc.Job(kernel, 90, "fp16", 96, dropout, config), 200, spill, shared, error=error)


def test_a_spilling_config_with_a_spill_free_sibling_is_dropped_not_failed():
    results = [_result(C(128, 64, 8, 3), 48, dropout=True), _result(C(64, 64, 4, 3), 0, dropout=True),
               _result(C(128, 64, 8, 3), 0), _result(C(64, 64, 4, 3), 0)]
    dropped, failed = tcc.assess(results)
    assert [r.job.config for r in dropped] == [C(128, 64, 8, 3)] and failed == []
    rows = [line.split() for line in tcc.table(results, full=False).splitlines()]
    assert rows[1][3] == "M128/N64/w8/s3" and rows[1][-1] == "DROPPED" and rows[2][-1] == "ok"


def test_a_call_whose_every_config_spills_fails_the_check():
    results = [_result(C(128, 64, 8, 3), 48, dropout=True), _result(C(64, 64, 4, 3), 8, dropout=True),
               _result(C(128, 64, 8, 3), 0), _result(C(64, 64, 4, 3), 0)]
    dropped, failed = tcc.assess(results)
    assert dropped == []  # the call fails: at run time the least-spilling one would run
    assert failed == ["fwd sm_90 fp16 D=96 dropout=on: every config spills (M128/N64/w8/s3 48 B, M64/N64/w4/s3 8 B); "
                      "no spill-free config is left to run"]


def test_errors_and_shared_memory_overflows_still_fail():
    results = [_result(C(64, 64, 4, 3), 0, error="CompilationError: x"), _result(C(64, 32, 4, 3), 0),
               _result(C(128, 64, 8, 3), 0, kernel="bwd_dq", shared=400 * 1024), _result(C(64, 64, 8, 2), 0, kernel="bwd_dq")]
    dropped, failed = tcc.assess(results)
    assert dropped == [] and len(failed) == 2
    assert "CompilationError: x" in failed[0] and "SMEM" in failed[1]
