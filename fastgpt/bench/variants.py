"""The attention variants `fastgpt bench attention --variants` times: one option set each, named
as on the command line.

    causal          the plain causal call (the baseline every variant's "× causal" divides)
    bidirectional   causal=False
    window:W        a causal sliding window of W keys (transformers' W: query i sees i - W < j <= i)
    softcap[:C]     soft-capping at C (default 50, Gemma-2's attention cap)
    sinks           one learnable sink logit per query head
    alibi           ALiBi with the original paper's geometric slopes
    varlen          the batch as packed sequences of different lengths (fastgpt/attention/varlen.py);
                    `fastgpt parity` checks it, the attention timings do not take it
    paged[:P]       those packed sequences' keys in a paged KV cache of P positions a page (default 16),
                    pages in random order (fastgpt/attention/paged.py); forward only; `fastgpt parity`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from fastgpt.attention.paged import PAGE_SIZES

FORMS = "causal, bidirectional, window:W, softcap[:C], sinks, alibi, varlen, paged[:P]"
DEFAULT_PAGE_SIZE = 16
DEFAULT_SOFTCAP = 50.0


@dataclass(frozen=True)
class Variant:
    name: str
    causal: bool = True
    window: Optional[int] = None  # W keys, transformers' convention
    softcap: float = 0.0
    sinks: bool = False
    alibi: bool = False
    varlen: bool = False  # a layout, not an option of the call: options() leaves it out
    paged: int = 0  # the page size of a paged KV cache (a layout too), 0: none

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """One --variants entry; a ValueError naming it and the forms there are."""
        kind, _, value = text.partition(":")
        try:
            if kind in ("causal", "bidirectional", "sinks", "alibi", "varlen") and not value:
                return cls(text, causal=kind != "bidirectional", sinks=kind == "sinks", alibi=kind == "alibi",
                           varlen=kind == "varlen")
            if kind == "window" and int(value) >= 1:
                return cls(text, window=int(value))
            if kind == "softcap" and (not value or float(value) > 0):
                return cls(text, softcap=float(value) if value else DEFAULT_SOFTCAP)
            if kind == "paged" and (not value or int(value) in PAGE_SIZES):
                return cls(text, paged=int(value) if value else DEFAULT_PAGE_SIZE)
        except ValueError:
            pass
        raise ValueError(f"--variants {text!r} is not a variant; the forms are: {FORMS} (W an int >= 1, C > 0, "
                         f"P a multiple of {PAGE_SIZES.step} from {PAGE_SIZES.start} to {PAGE_SIZES.stop - 1})")

    def options(self, B: int, H: int, device: torch.device) -> dict[str, Any]:
        """The keyword arguments of fastgpt.attention.attention for this variant."""
        options: dict[str, Any] = {}
        if not self.causal:
            options["causal"] = False
        if self.window is not None:
            options["window"] = (self.window - 1, 0)
        if self.softcap:
            options["softcap"] = self.softcap
        if self.sinks:
            options["sinks"] = torch.zeros(H, device=device)
        if self.alibi:
            slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device=device)
            options["alibi_slopes"] = slopes
        return options

    def work_vs_causal(self, T: int) -> float:
        """The (query, key) pairs this variant computes at T_q = T_k = T, as a fraction of the causal
        mask's T(T+1)/2: what its FLOPs are scaled by."""
        causal_pairs = T * (T + 1) / 2
        if not self.causal:
            return T * T / causal_pairs
        if self.window is None or self.window >= T:
            return 1.0
        W = self.window
        return (W * (W + 1) / 2 + (T - W) * W) / causal_pairs  # rows < W see i + 1 keys, the rest W


def parse_variants(texts: list[str], packed: bool = False) -> list[Variant]:
    """The --variants entries; "varlen" and "paged" only where `packed` (fastgpt parity), else a ValueError."""
    variants = [Variant.parse(t) for t in texts]
    if not packed and any(v.varlen or v.paged for v in variants):
        raise ValueError("--variants varlen/paged: the attention timings take the (B, H, T, D) layout; packed "
                         "sequences and paged caches are checked by `fastgpt parity --variants varlen paged` and "
                         "timed by `fastgpt bench packing` and `fastgpt bench decode --page-size`")
    seen = [v.name for v in variants]
    if len(set(seen)) != len(seen):
        raise ValueError(f"--variants {' '.join(texts)} names a variant twice")
    return variants
