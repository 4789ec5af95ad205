"""Model FLOPs utilisation (MFU): the FLOPs a training step needs, and the device's peak.

    flops = training_flops_per_step(n_params, n_layer, n_embd, batch_size, block_size, window)
    peak = device_peak_flops(device, override)        # FLOP/s, or None where unknown
    mfu = flops / seconds_per_step / peak             # an estimate, in [0, 1]

The one table of peaks in the project: `fastgpt train` and `fastgpt bench train` both read it.
"""

from __future__ import annotations

from typing import Optional

import torch

# Dense bf16/fp16 tensor-core peaks in FLOP/s, from the vendors' data sheets, matched against
# torch.cuda.get_device_name(). MFU is an estimate against them: an fp32 run, or a part clocked
# lower than the data sheet, is measured against the same bf16 figure. None known for CPUs.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
}


def device_peak_flops(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    """The peak FLOP/s of `device`: `override` if given, else the table's entry for this GPU, else None."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"the peak FLOP/s override must be > 0; got {override!r}")
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def training_flops_per_step(n_params: int, n_layer: int, n_embd: int, batch_size: int, block_size: int,
                            window: Optional[int] = None) -> float:
    """6 FLOPs per parameter per token (forward 2, backward 4), plus the attention matmuls
    (12·L·C·T per token counted over the full T×T, as in the PaLM appendix and nanoGPT; with a
    sliding window of W keys, over T×min(W, T))."""
    tokens = batch_size * block_size
    keys = block_size if window is None else min(window, block_size)
    return 6 * n_params * tokens + 12 * n_layer * n_embd * keys * tokens
