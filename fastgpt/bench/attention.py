"""`fastgpt bench attention`: every backend against eager PyTorch over a sweep of sequence lengths.

For each cell (T, mode, dropout, dtype) the backends, each with every variant of the sweep, available on the device run interleaved
(A B A B ...) on the same inputs, after each was checked against the float64 reference at that
T, D and dtype (the parity rule of fastgpt/verify/parity.py). B·T is held constant across the sweep so
every cell processes the same number of tokens. A variant is one set of the API's options
(fastgpt/bench/variants.py: a sliding window, soft-capping, sinks, ...); with the plain "causal"
variant in the sweep, every other variant's record carries its time as a multiple of causal's
("vs_causal", same backend and cell). On CPU a GEMM probe of each dtype opens the run
(fastgpt/bench/gemm_probe.py) and every timed cell carries its rate as a fraction of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from fastgpt.attention import AttentionCall, attention, available_backends, get_backend, get_path, kernels_ran, refusal
from fastgpt.attention.registry import choose
from fastgpt.bench.common import (attention_flops, check_backend_names, environment, memory_method,
                                       peak_memory_bytes)
from fastgpt.bench.gemm_probe import GEMM_N, fraction_of_gemm, probe_gemms
from fastgpt.bench.variants import Variant, parse_variants
from fastgpt.machine.timing import summarize, time_interleaved
from fastgpt.verify.parity import check_parity

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
    gemm_n: int = GEMM_N  # the CPU GEMM probe's matrix size (fastgpt/bench/gemm_probe.py)
    variants: list[str] = field(default_factory=lambda: ["causal"])  # fastgpt/bench/variants.py

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
        parse_variants(self.variants)


def _make_call(name: str, mode: str, q, k, v, dout, dropout_p: float, options: dict) -> Callable[[], Any]:
    def forward():
        with torch.no_grad():
            return attention(q, k, v, dropout_p=dropout_p, backend=name, **options)

    def forward_backward():
        out = attention(q, k, v, dropout_p=dropout_p, backend=name, **options)
        return torch.autograd.grad(out, (q, k, v), dout)

    if mode == "forward":
        return forward
    if mode == "forward+backward":
        return forward_backward
    # backward alone: one forward builds the graph, each timed call replays only the backward
    out = attention(q, k, v, dropout_p=dropout_p, backend=name, **options)
    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)


def kernel_record(fn: Callable[[], Any], call: AttentionCall, device: torch.device, backend: str) -> dict[str, str]:
    """What one more call of `fn` ran, from the registry's record: {"kernel_path"}, and where the
    path says more, its "kernel_detail" (the products a bfloat16 path ran on) and, on CUDA, its
    "inner_kernel" (the kernel PyTorch picked inside sdpa)."""
    kernels_ran(reset=True)
    fn()
    # a backward-only cell replays the graph of one earlier forward, which ran the path the
    # registry chooses for this call: no attention call is made, so none is counted here
    ran = list(kernels_ran(reset=True)) or [choose(call, backend).name]
    out = {"kernel_path": ", ".join(ran)}
    if len(ran) == 1:
        path = get_path(ran[0])
        if path.detail is not None and path.detail(call):
            out["kernel_detail"] = path.detail(call)
        if path.inner_kernel is not None and device.type == "cuda":
            out["inner_kernel"] = path.inner_kernel(fn)
    return out


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
    cells = [(dtype, T, mode, p) for dtype in sweep.dtypes for T in sweep.seq_lens for mode in sweep.modes
             for p in sweep.dropouts]
    variants = parse_variants(sweep.variants)
    validated: dict[tuple, Optional[str]] = {}  # (backend, T, dtype, variant) -> None if it passed, else why not
    records = []
    bar = tqdm(cells, desc="attention cells", disable=not progress, dynamic_ncols=True)
    for dtype_name, T, mode, dropout_p in bar:
        bar.set_postfix(T=T, mode=mode, dropout=dropout_p, refresh=False)
        records += _run_cell(sweep, device, (dtype_name, T, mode, dropout_p), variants, names, validated, gemm,
                             env["device"])
    bar.close()
    _add_vs_causal(records)
    return {"environment": env, "sweep": asdict(sweep), "gemm_probe": gemm, "records": records}


def _run_cell(sweep: AttentionSweep, device: torch.device, where: tuple, variants: list[Variant], names: list[str],
              validated: dict[tuple, Optional[str]], gemm: dict[str, Any], device_name: str) -> list[dict[str, Any]]:
    """One cell (dtype, T, mode, dropout): every (backend, variant) timed interleaved in one run,
    so that a variant's multiple of causal is measured as the backends' ratios are."""
    cells = [_Cell(sweep, device, *where, variant) for variant in variants]
    calls, statuses = {}, {}
    for cell in cells:
        cell_calls, cell_statuses = _prepare_calls(cell, names, validated)
        calls.update({(name, cell.variant.name): fn for name, fn in cell_calls.items()})
        statuses.update({(name, cell.variant.name): status for name, status in cell_statuses.items()})
    times = _time_calls(calls, statuses, cells[0])
    records = []
    for cell in cells:
        def mine(table, v=cell.variant.name):
            return {name: value for (name, variant), value in table.items() if variant == v}

        records += _cell_records(cell, names, mine(calls), mine(statuses), mine(times), gemm, device_name)
    return records  # the inputs and graphs go with `cells` before the next cell allocates its own


def _add_vs_causal(records: list[dict[str, Any]]) -> None:
    """Each timed record of a variant other than "causal" gets `vs_causal`: its median over the
    same backend's in the same cell's causal variant, where that one was timed."""
    causal = {_cell_key(r): r["median_s"] for r in records if r["variant"] == "causal" and "median_s" in r}
    for r in records:
        base = causal.get(_cell_key(r))
        if r["variant"] != "causal" and "median_s" in r and base:
            r["vs_causal"] = r["median_s"] / base


def _cell_key(r: dict[str, Any]) -> tuple:
    return (r["backend"], r["T"], r["dtype"], r["mode"], r["dropout"])


class _Cell:
    """One cell of the sweep and its inputs: q, dout (B, H, T, D) and k, v (B, H_kv, T, D), drawn
    from a generator seeded by T, with B = tokens // T."""

    def __init__(self, sweep: AttentionSweep, device: torch.device, dtype_name: str, T: int, mode: str,
                 dropout_p: float, variant: Variant = Variant("causal")):
        self.sweep, self.device, self.dtype_name, self.mode, self.dropout_p = sweep, device, dtype_name, mode, dropout_p
        self.variant = variant
        self.dtype = getattr(torch, dtype_name)
        self.B, self.H, self.T, self.D = max(1, sweep.tokens // T), sweep.n_head, T, sweep.head_dim
        self.H_kv = sweep.kv_heads or self.H
        g = torch.Generator().manual_seed(T)
        q, dout = (torch.randn(self.B, self.H, T, self.D, generator=g).to(device=device, dtype=self.dtype) for _ in range(2))
        k, v = (torch.randn(self.B, self.H_kv, T, self.D, generator=g).to(device=device, dtype=self.dtype) for _ in range(2))
        self.q, self.k, self.v = (t.requires_grad_(mode != "forward") for t in (q, k, v))
        self.dout = dout
        self.options = variant.options(self.B, self.H, device)
        self.call = AttentionCall.of(self.q, self.k, self.v, dropout_p, **self.options)

    def fields(self, device_name: str) -> dict[str, Any]:
        """The cell's columns of every record."""
        return dict(T=self.T, B=self.B, H=self.H, H_kv=self.H_kv, D=self.D, dtype=self.dtype_name, mode=self.mode,
                    dropout=self.dropout_p, variant=self.variant.name, device=device_name)


def _refusal_here(cell: _Cell, name: str, validated: dict[tuple, Optional[str]]) -> Optional[str]:
    """Why backend `name` has no figures in this cell (it refuses the call, is emulated here, or
    failed validation against the float64 reference at this T, D and dtype), or None."""
    reason = refusal(cell.call, name)
    if reason is None and get_backend(name).emulated(cell.device):
        reason = NOT_TIMED
    if reason is not None:
        return reason
    key = (name, cell.T, cell.dtype_name, cell.variant.name)
    if key not in validated:
        max_T = cell.sweep.validate_max_T
        T_check = cell.T if max_T is None else min(cell.T, max_T)
        result = check_parity(name, (1, cell.H, cell.H_kv, T_check, T_check, cell.D), cell.dtype, cell.device,
                              **cell.variant.options(1, cell.H, cell.device))
        validated[key] = None if result.ok else f"failed validation: {result.errors} over {result.limits}"
    return validated[key]


def _prepare_calls(cell: _Cell, names: list[str], validated: dict[tuple, Optional[str]]
                   ) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """({backend: the call to time}, {backend: "ok" or why it has no figures}) for this cell."""
    calls, statuses = {}, {}
    for name in names:
        reason = _refusal_here(cell, name, validated)
        if reason is None:
            try:
                calls[name] = _make_call(name, cell.mode, cell.q, cell.k, cell.v, cell.dout, cell.dropout_p,
                                         cell.options)
            except torch.OutOfMemoryError as e:
                reason = f"out of memory: {str(e).splitlines()[0]}"
        statuses[name] = reason or "ok"
    return calls, statuses


def _time_calls(calls: dict[Any, Callable[[], Any]], statuses: dict[Any, str], cell: _Cell) -> dict[Any, list[float]]:
    """The calls' times, interleaved; none, with each status saying so, when they run out of memory."""
    try:
        return time_interleaved(calls, cell.device, cell.sweep.reps, cell.sweep.warmup) if calls else {}
    except torch.OutOfMemoryError as e:
        statuses.update({name: f"out of memory: {str(e).splitlines()[0]}" for name in calls})
        return {}


def _cell_records(cell: _Cell, names: list[str], calls: dict[str, Callable[[], Any]], statuses: dict[str, str],
                  times: dict[str, list[float]], gemm: dict[str, Any], device_name: str) -> list[dict[str, Any]]:
    """One record per backend of this cell: its status, and its figures where it was timed."""
    flops = attention_flops(cell.B, cell.H, cell.T, cell.D, cell.mode) * cell.variant.work_vs_causal(cell.T)
    naive_median = summarize(times["naive"])["median_s"] if "naive" in times else None
    records = []
    for name in names:
        record = {"backend": name, **cell.fields(device_name), "status": statuses[name],
                  "memory_method": memory_method(cell.device)}
        if name in times:
            stats = summarize(times[name])
            record.update(stats)
            record["tflops"] = flops / stats["median_s"] / 1e12
            if cell.dtype_name in gemm:
                record["gemm_tflops"] = gemm[cell.dtype_name]["gflops"] / 1e3
                record["fraction_of_gemm"] = fraction_of_gemm(flops / stats["median_s"], gemm[cell.dtype_name])
            record["tokens_per_s"] = cell.B * cell.T / stats["median_s"]
            record["speedup_vs_naive"] = naive_median / stats["median_s"] if naive_median else None
            record["peak_memory_bytes"] = peak_memory_bytes(calls[name], cell.device)
            record.update(kernel_record(calls[name], cell.call, cell.device, name))
        records.append(record)
    return records
