"""`fastgpt bench attention`: every backend against eager PyTorch over a sweep of sequence lengths.

For each cell (T, mode, dropout, dtype) the backends available on the device run interleaved
(A B A B ...) on the same inputs, after each was checked against the float64 reference at that
T, D and dtype (the parity rule of fastgpt/parity.py). B·T is held constant across the sweep so
every cell processes the same number of tokens. On CPU a GEMM probe of each dtype opens the run
(benchmarks/gemm_probe.py) and every timed cell carries its rate as a fraction of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from fastgpt.attention import available_backends, causal_attention, get_backend
from fastgpt.benchmarks.common import (attention_flops, check_backend_names, environment, memory_method,
                                       peak_memory_bytes)
from fastgpt.benchmarks.gemm_probe import GEMM_N, fraction_of_gemm, probe_gemms
from fastgpt.timing import summarize, time_interleaved
from fastgpt.parity import check_parity

MODES = ("forward", "backward", "forward+backward")
NOT_TIMED = "emulated here (e.g. Triton's interpreter on CPU): correct but not a kernel, so not timed"


@dataclass
class AttentionSweep:
    device: str
    seq_lens: list[int]
    tokens: int  # B·T, constant across the sweep
    n_head: int
    head_dim: int
    dtypes: list[str]
    modes: list[str] = field(default_factory=lambda: list(MODES))
    dropouts: list[float] = field(default_factory=lambda: [0.0, 0.2])
    backends: Optional[list[str]] = None  # None: every backend available on the device
    reps: int = 5
    warmup: int = 2
    # Each (backend, T, dtype) is checked against the float64 reference before it is timed, at
    # min(T, validate_max_T): the float64 T×T matrices of a long T outgrow the device's memory.
    validate_max_T: Optional[int] = None
    kv_heads: Optional[int] = None  # grouped-query: key/value heads, dividing n_head; None: n_head
    gemm_n: int = GEMM_N  # the CPU GEMM probe's matrix size (benchmarks/gemm_probe.py)

    @classmethod
    def default(cls, device: str) -> "AttentionSweep":
        if torch.device(device).type == "cuda":
            # FlashAttention's standard sweep: 16k tokens, hidden 2048 = 16 heads of 128
            return cls(device, [128, 256, 512, 1024, 2048, 4096, 8192, 16384], 16384, 16, 128, ["bfloat16", "float16"])
        return cls(device, [64, 128, 256, 512, 1024, 2048], 4096, 6, 64, ["float32"])

    @classmethod
    def smoke(cls, device: str) -> "AttentionSweep":
        """A few seconds' worth: for CI, checking the harness end to end, not the speed."""
        return cls(device, [16, 48], 96, 2, 16, ["float32"], reps=2, warmup=1, gemm_n=128)

    def check(self) -> None:
        """Refuses, before any work, a sweep that cannot run as asked; the messages name the flags
        of `fastgpt bench attention` that set each field."""
        if self.kv_heads is not None and self.n_head % self.kv_heads != 0:
            raise ValueError(f"--kv-heads {self.kv_heads} must divide the sweep's {self.n_head} heads (query heads "
                             "share each key/value head in equal groups)")
        if self.tokens < max(self.seq_lens):
            # B = tokens // T would round to zero: the long cells would not process --tokens tokens
            raise ValueError(f"--tokens {self.tokens} is less than the longest --seq-lens {max(self.seq_lens)}: "
                             "every cell processes B·T = --tokens tokens; raise --tokens or drop the longer lengths")
        check_backend_names(self.backends, allow_auto=False)


def _make_call(name: str, mode: str, q, k, v, dout, dropout_p: float) -> Callable[[], Any]:
    def forward():
        with torch.no_grad():
            return causal_attention(q, k, v, dropout_p=dropout_p, backend=name)

    def forward_backward():
        out = causal_attention(q, k, v, dropout_p=dropout_p, backend=name)
        return torch.autograd.grad(out, (q, k, v), dout)

    if mode == "forward":
        return forward
    if mode == "forward+backward":
        return forward_backward
    # backward alone: one forward builds the graph, each timed call replays only the backward
    out = causal_attention(q, k, v, dropout_p=dropout_p, backend=name)
    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)


def run_attention_benchmark(sweep: AttentionSweep, progress: bool = True) -> dict[str, Any]:
    """Runs the sweep; returns {"environment", "sweep", "gemm_probe", "records"} with one record per
    (backend, cell), a `status` of "ok" or the reason it has no figures. gemm_probe holds, on CPU,
    the torch.mm rate of each dtype of the sweep, measured before the first cell ({} on CUDA)."""
    sweep.check()
    device = torch.device(sweep.device)
    names = sweep.backends or available_backends(device)
    if "naive" not in names:
        names = ["naive", *names]  # the baseline every speed-up is quoted against
    env = environment(device)
    # before the cells, while the machine is in the state the cells will find it
    gemm = probe_gemms(sweep.dtypes, device, sweep.gemm_n) if device.type == "cpu" else {}
    cells = [(dtype, T, mode, p) for dtype in sweep.dtypes for T in sweep.seq_lens for mode in sweep.modes for p in sweep.dropouts]
    validated: dict[tuple, Optional[str]] = {}  # (backend, T, dtype) -> None if it passed, else why not
    records = []
    bar = tqdm(cells, desc="attention cells", disable=not progress, dynamic_ncols=True)
    for dtype_name, T, mode, dropout_p in bar:
        bar.set_postfix(T=T, mode=mode, dropout=dropout_p, refresh=False)
        dtype = getattr(torch, dtype_name)
        B, H, D = max(1, sweep.tokens // T), sweep.n_head, sweep.head_dim
        H_kv = sweep.kv_heads or H
        base = dict(T=T, B=B, H=H, H_kv=H_kv, D=D, dtype=dtype_name, mode=mode, dropout=dropout_p,
                    device=env["device"])
        g = torch.Generator().manual_seed(T)
        q, dout = (torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype) for _ in range(2))
        k, v = (torch.randn(B, H_kv, T, D, generator=g).to(device=device, dtype=dtype) for _ in range(2))
        q, k, v = (t.requires_grad_(mode != "forward") for t in (q, k, v))

        calls, statuses = {}, {}
        for name in names:
            backend = get_backend(name)
            reason = backend.refusal(q, dropout_p, H_kv)
            if reason is None and backend.emulated(device):
                reason = NOT_TIMED
            if reason is None:
                key = (name, T, dtype_name)
                if key not in validated:
                    T_check = T if sweep.validate_max_T is None else min(T, sweep.validate_max_T)
                    result = check_parity(name, (1, H, H_kv, T_check, T_check, D), dtype, device)
                    validated[key] = None if result.ok else f"failed validation: {result.errors} over {result.limits}"
                reason = validated[key]
            if reason is None:
                try:
                    calls[name] = _make_call(name, mode, q, k, v, dout, dropout_p)
                except torch.OutOfMemoryError as e:
                    reason = f"out of memory: {str(e).splitlines()[0]}"
            statuses[name] = reason or "ok"

        try:
            times = time_interleaved(calls, device, sweep.reps, sweep.warmup) if calls else {}
        except torch.OutOfMemoryError as e:
            times = {}
            statuses.update({name: f"out of memory: {str(e).splitlines()[0]}" for name in calls})

        flops = attention_flops(B, H, T, D, mode)
        naive_median = summarize(times["naive"])["median_s"] if "naive" in times else None
        for name in names:
            record = {"backend": name, **base, "status": statuses[name], "memory_method": memory_method(device)}
            if name in times:
                stats = summarize(times[name])
                record.update(stats)
                record["tflops"] = flops / stats["median_s"] / 1e12
                if dtype_name in gemm:
                    record["gemm_tflops"] = gemm[dtype_name]["gflops"] / 1e3
                    record["fraction_of_gemm"] = fraction_of_gemm(flops / stats["median_s"], gemm[dtype_name])
                record["tokens_per_s"] = B * T / stats["median_s"]
                record["speedup_vs_naive"] = naive_median / stats["median_s"] if naive_median else None
                record["peak_memory_bytes"] = peak_memory_bytes(calls[name], device)
                if name == "ext" and device.type == "cpu":
                    from fastgpt.ext import cpu_attention_kernels, cpu_bf16_products  # loaded: ext just ran

                    record["ext_cpu_kernels"] = cpu_attention_kernels(dtype, B * H_kv, D)
                    if dtype == torch.bfloat16:
                        record["ext_bf16_products"] = cpu_bf16_products(D)
            records.append(record)
        del q, k, v, dout, calls
    bar.close()
    return {"environment": env, "sweep": asdict(sweep), "gemm_probe": gemm, "records": records}
