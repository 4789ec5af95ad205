"""`fastgpt bench train`: a full training step (forward, backward, AdamW) of a preset, per backend.

One model serves every backend: between timed runs it swaps the attention kernel with
`set_backend` (which changes no weight), so the backends see the same parameters and
batches, interleaved A B A B ...

On CPU the run opens with a GEMM probe of the autocast dtype (fastgpt/bench/gemm_probe.py): each
backend's training FLOP rate (fastgpt/run/flops.py's count) is reported as a fraction of it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from tqdm import tqdm

from fastgpt.attention import AttentionCall, available_backends, get_backend, kernels_ran, refusal
from fastgpt.bench.attention import NOT_TIMED
from fastgpt.bench.common import environment, memory_method, peak_memory_bytes
from fastgpt.bench.gemm_probe import GEMM_N, fraction_of_gemm, probe_gemm
from fastgpt.machine.timing import summarize, time_interleaved
from fastgpt.model import kernels as model_kernels
from fastgpt.run.config import DTYPES, make_configs
from fastgpt.run.data import CharDataset
from fastgpt.run.flops import device_peak_flops, training_flops_per_step
from fastgpt.model.gpt import num_parameters
from fastgpt.run.trainer import Trainer


def _attention_call(trainer: Trainer, dtype) -> AttentionCall:
    """The attention call the model's training steps make: autocast's dtype, the layers' options."""
    mc = trainer.model_config
    probe = torch.empty(1, mc.n_head, mc.block_size, mc.n_embd // mc.n_head, device=trainer.device, dtype=dtype)
    options = trainer.model.blocks[0].attn.attention_options() if hasattr(trainer.model, "blocks") else {}
    return AttentionCall.like(probe, kv_heads=mc.n_kv_head, dropout_p=mc.dropout_p, **options)


def run_train_benchmark(preset: str, device: str, steps: int = 5, reps: int = 3, warmup: int = 1,
                        backends: Optional[list[str]] = None, data: Optional[str] = None,
                        peak_flops: Optional[float] = None, progress: bool = True, dtype: str = "fp32",
                        overrides: Optional[dict[str, Any]] = None, gemm_n: int = GEMM_N) -> dict[str, Any]:
    """Training steps of `preset` (with `overrides` of its fields) per backend, interleaved; `dtype`
    is the autocast dtype, as `fastgpt train --dtype`; gemm_n the CPU GEMM probe's size."""
    model_config, train_config = make_configs(preset, {**(overrides or {}), "device": device, "data": data,
                                                       "progress": False, "dtype": dtype})
    trainer = Trainer(model_config, train_config, CharDataset.load(data))
    dev = trainer.device
    names = backends or available_backends(dev)
    env = environment(dev)
    dtype_name = str(DTYPES[dtype]).removeprefix("torch.")
    gemm = probe_gemm(dtype_name, dev, gemm_n) if dev.type == "cpu" else None
    records, calls = [], {}
    call = _attention_call(trainer, DTYPES[dtype])
    for name in names:
        reason = refusal(call, name)
        if reason is None and get_backend(name).emulated(dev):
            reason = NOT_TIMED
        if reason is not None:
            records.append({"backend": name, "preset": preset, "status": reason})
            continue

        def run_steps(name=name):
            trainer.set_backend(name)
            for _ in range(steps):
                trainer.step()

        calls[name] = run_steps

    with tqdm(total=1, desc=f"train steps ({preset})", disable=not progress) as bar:
        times = time_interleaved(calls, dev, reps, warmup) if calls else {}
        bar.update(1)

    tokens_per_step = trainer.tokens_per_step
    flops = training_flops_per_step(num_parameters(trainer.model), model_config.n_layer, model_config.n_embd,
                                    train_config.batch_size * trainer.micro_steps, model_config.block_size,
                                    model_config.window)
    peak = device_peak_flops(dev, peak_flops)
    for name, seconds in times.items():
        per_step = [s / steps for s in seconds]
        stats = summarize(per_step)
        kernels_ran(reset=True), model_kernels.kernels_ran(reset=True)
        memory = peak_memory_bytes(lambda: calls[name](), dev)
        ran = {**kernels_ran(reset=True), **model_kernels.kernels_ran(reset=True)}  # what those steps ran
        records.append({
            "backend": name, "preset": preset, "status": "ok", **stats, "kernels": ran,
            "tokens_per_s": tokens_per_step / stats["median_s"],
            "peak_memory_bytes": memory, "memory_method": memory_method(dev),
            "mfu": flops / stats["median_s"] / peak if peak else None,
            "gflops": flops / stats["median_s"] / 1e9,
            "fraction_of_gemm": fraction_of_gemm(flops / stats["median_s"], gemm) if gemm else None,
            "params": num_parameters(trainer.model),
        })
    return {"environment": env, "preset": preset, "dtype": dtype, "steps_per_rep": steps, "reps": reps,
            "gemm_probe": {dtype_name: gemm} if gemm else {}, "records": records}
