"""What this machine can run: `fastgpt info` (as `python -m xformers.info` is for xformers).

    versions        fastgpt, torch, triton, numpy, transformers, python
    machine         the CPU, its threads and instruction sets, CUDA's devices
    extension       the C++ extension: loaded or why not, its cache directory, build flags, and
                    which CPU instruction sets its kernels use (fastgpt.ext.cpu_isa)
    kernel paths    per device, each attention kernel path per dtype: "available" or the reason
                    it is not; auto's order per kind of call; the model's other kernels

Everything is asked of the registries (fastgpt.attention, fastgpt.model.kernels): nothing here
knows a backend by name.
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch

from fastgpt.attention import AttentionCall, get_path, kernel_path_names, refusal
from fastgpt.attention.call import CALL_KINDS, OPTIONS, dtype_name
from fastgpt.attention.registry import auto_order

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The call each path is asked about: training-sized, enough key/value heads for any thread count.
PROBE_SHAPE = (8, 8, 256, 64)  # (B, H, T, D)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    return {"fastgpt": _version("fastgpt"), "torch": torch.__version__, "triton": _version("triton"),
            "numpy": _version("numpy"), "transformers": _version("transformers"),
            "python": platform.python_version()}


def machine() -> dict[str, Any]:
    from fastgpt.machine.cpu_features import bf16_matrix_units, cpu_name

    info: dict[str, Any] = {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "bf16_matrix_units": bf16_matrix_units() or "none",
                            "cuda": torch.version.cuda or "not in this torch build", "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            info["gpus"].append(f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    return info


def extension() -> dict[str, Any]:
    """The C++ extension's state. Loads it (building it on first use, with a message) so that the
    kernel paths that depend on what it reports (AMX) are answered truly."""
    from fastgpt.ext import build as ext_build

    info: dict[str, Any] = {"cache_dir": str(ext_build.build_dir()),
                            "build_flags": ext_build.compile_flags(ext_build.cpu_capability()),
                            "builds_cuda": ext_build.builds_cuda()}
    if ext_build.builds_cuda():
        info["cuda_flags"] = ext_build.cuda_flags()
    reason = ext_build.unavailable_reason()
    if reason is None and not ext_build.is_loaded():
        try:
            ext_build.load()
        except ext_build.ExtensionUnavailable as e:
            reason = str(e)
    if reason is not None:
        info["status"] = f"unavailable: {reason}"
    elif ext_build.is_loaded():
        from fastgpt.ext import ops

        info["status"] = f"loaded ({ops.LIBRARY})"
        info["cpu_isa"] = ops.cpu_isa_settings()
    return info


def kernel_paths(device: torch.device) -> dict[str, dict[str, str]]:
    """{path: {dtype: "available" or the reason it is not}} on `device`, for a training-sized call
    (PROBE_SHAPE); asking loads what a backend needs, as backend="auto" does."""
    B, H, T, D = PROBE_SHAPE
    table = {}
    for name in kernel_path_names():
        row = {}
        for dtype in DTYPES:
            call = AttentionCall(batch=B, heads=H, kv_heads=H, q_len=T, kv_len=T, head_dim=D, dtype=dtype,
                                 device=device, dropout_p=0.0, scale=D**-0.5)
            reason = refusal(call, name)
            row[dtype_name(dtype)] = "available" if reason is None else reason
        table[name] = row
    return table


def model_kernels() -> dict[str, str]:
    """The model's other kernels (fastgpt.model.kernels) on CPU: "available" or why not."""
    from fastgpt.model import kernels

    reason = kernels.ext_dropout_unavailable_reason()
    ext = "available" if reason is None else reason
    return {"dropout.ext": ext, "dropout.torch": "available", "linear.skinny": ext, "linear.torch": "available"}


def report() -> dict[str, Any]:
    """Everything `fastgpt info` shows, as one JSON-ready dict."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return {"versions": versions(), "machine": machine(), "extension": extension(),
            "kernel_paths": {d.type: kernel_paths(d) for d in devices},
            "descriptions": {name: get_path(name).description for name in kernel_path_names()},
            "options": {name: [o for o in OPTIONS if o in get_path(name).options] for name in kernel_path_names()},
            "auto_order": {d.type: {kind: list(auto_order(d, kind)) for kind in CALL_KINDS} for d in devices},
            "model_kernels": model_kernels(), "ops": op_paths()}


def op_paths() -> dict[str, dict[str, dict[str, Any]]]:
    """{op: {kernel path: {"description", "options"}}} of the fused ops beside attention (fastgpt.ops)."""
    from fastgpt.ops import REGISTRIES

    return {r.op: {name: {"description": r.get_path(name).description,
                          "options": [o for o in r.options if o in r.get_path(name).options]}
                   for name in r.kernel_path_names()} for r in REGISTRIES}


def render(info: dict[str, Any]) -> str:
    """The report as text: a section per part, a line per kernel path and dtype."""
    v, m, ext = info["versions"], info["machine"], info["extension"]
    lines = ["versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"cpu: {m['cpu']}, {m['threads']} threads, torch dispatches {m['cpu_capability']}, "
             f"bfloat16 matrix units: {m['bf16_matrix_units']}",
             f"cuda: {m['cuda']}; gpus: {', '.join(m['gpus']) or 'none'}",
             f"C++ extension: {ext['status']}",
             f"  cache: {ext['cache_dir']}",
             f"  build flags: {' '.join(ext['build_flags'])}" + (f"; nvcc: {' '.join(ext['cuda_flags'])}" if ext.get("cuda_flags") else "")]
    for feature, state in (ext.get("cpu_isa") or {}).items():
        lines.append(f"  {feature}: " + ", ".join(f"{k} {'yes' if val else 'no'}" for k, val in state.items()))
    for device, table in info["kernel_paths"].items():
        lines.append(f"attention kernel paths on {device} (B, H, T, D = {', '.join(map(str, PROBE_SHAPE))}):")
        width = max(map(len, table))
        for name, row in table.items():
            lines.append(f"  {name:<{width}}  {info['descriptions'][name]}")
            lines.append(f"  {'':<{width}}    options: {', '.join(info['options'][name]) or 'none (plain causal only)'}")
            for dtype, state in row.items():
                lines.append(f"  {'':<{width}}    {dtype:<9} {state}")
        for kind, order in info["auto_order"][device].items():
            lines.append(f"  auto, {kind} calls: {' > '.join(order)}")
    lines.append("model kernels on cpu: " + "; ".join(f"{k}: {val}" for k, val in info["model_kernels"].items()))
    for op, paths in info["ops"].items():
        lines.append(f"{op} kernel paths:")
        for name, path in paths.items():
            lines.append(f"  {name}  {path['description']}; options: {', '.join(path['options']) or 'none'}")
    return "\n".join(lines)
