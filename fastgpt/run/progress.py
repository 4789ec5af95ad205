"""The progress display of a run: a tqdm bar with the training loss, tokens/s and an MFU estimate.

Throughput is measured over a window of steps, the ones since the last evaluation (which it
leaves out); the same window gives the tokens_per_s and mfu_estimate of the metrics records.
"""

from __future__ import annotations

from typing import Optional

from tqdm import tqdm


class Progress:
    # Steps between reads of the loss: each read waits for the device to finish its queued work.
    SYNC_EVERY = 10

    def __init__(self, start: int, total: int, tokens_per_step: int, flops_per_step: float,
                 peak_flops: Optional[float], show: bool):
        """flops_per_step and peak_flops are one device's: its share of a step, its peak (None: unknown)."""
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops
        self.bar = tqdm(total=total, initial=start, disable=not show, unit="it", dynamic_ncols=True)
        self.window_steps, self.window_s = 0, 0.0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def sync_due(self, it: int) -> bool:
        """Whether the loss of the step that brought the run to iteration `it` is read now."""
        return it % self.SYNC_EVERY == 0 or it == self.bar.total

    def step_done(self, it: int, seconds: float, loss: Optional[float] = None) -> None:
        """Counts one step that took `seconds`; with its loss (read at a sync) the bar moves."""
        self.window_steps += 1
        self.window_s += seconds
        if loss is None:
            return
        postfix = {"loss": f"{loss:.4f}", "tok_s": f"{self.tokens_per_s():,.0f}"}
        mfu = self.mfu()
        if mfu is not None:
            postfix["mfu_est"] = f"{mfu:.1%}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(it - self.bar.n)

    def seconds_per_step(self) -> Optional[float]:
        return self.window_s / self.window_steps if self.window_steps and self.window_s > 0 else None

    def tokens_per_s(self) -> Optional[float]:
        seconds = self.seconds_per_step()
        return self.tokens_per_step / seconds if seconds else None

    def mfu(self) -> Optional[float]:
        """Model FLOPs utilisation, an estimate: the FLOPs the model needs, not the ones it ran."""
        seconds = self.seconds_per_step()
        return self.flops_per_step / seconds / self.peak_flops if seconds and self.peak_flops else None

    def new_window(self) -> None:
        self.window_steps, self.window_s = 0, 0.0

    def write(self, line: str) -> None:
        """Prints `line` above the bar."""
        self.bar.write(line)
