"""The backend registry: the one place that knows which attention implementations exist.

A backend is a function `fn(q, k, v, dropout_p, scale) -> out`, q and out (B, H, T_q, D), k and v
(B, H_kv, T_k, D) with T_k >= T_q, H_kv dividing H (H_kv < H only where the backend says it takes
grouped-query calls) and the causal diagonal aligned bottom-right (see api.py), over tensors that
the API has already validated, plus two questions it answers about itself: can it run on this
device in this process, and can it run this particular call. Both answers are a reason string (or
None), so that an error can say exactly why a backend was refused. A backend with something to load
(a library to build) says a third reason when that fails, which `backend="auto"` asks last.

Backends live in their own modules and register themselves on import (fastgpt/attention/__init__.py
imports the built-in ones); the registry imports none of them. Each backend module is cheap to
import: heavy dependencies (triton, the C++ extension) load on its first call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

log = logging.getLogger("fastgpt.attention")

# (q, k, v, dropout_p, scale) -> out; q, out (B, H, T_q, D), k, v (B, H_kv, T_k, D), T_k >= T_q
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def _always_available(device: torch.device) -> Optional[str]:
    return None


def _supports_everything(q: torch.Tensor, dropout_p: float) -> Optional[str]:
    return None


def _nothing_to_prepare(device: torch.device) -> None:
    return None


def _nothing_to_load(device: torch.device) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    fn: AttentionFn
    description: str
    # Why the backend cannot run on `device` in this process (missing package, no GPU), or None.
    unavailable_reason: Callable[[torch.device], Optional[str]] = _always_available
    # Why the backend cannot run this call (dtype, head dim, sequence length), or None. It sees q
    # only: every backend runs every T_k >= T_q (nothing so far refuses on k's length).
    unsupported_reason: Callable[[torch.Tensor, float], Optional[str]] = _supports_everything
    # Returns memory the backend keeps cached between calls (buffer pools) to the system, so that
    # a memory measurement sees what one call needs; None for backends that cache nothing.
    empty_cache: Optional[Callable[[], None]] = None
    # True where the backend runs as an emulation rather than as a kernel (Triton's interpreter on
    # CPU): correct, but its speed means nothing, so benchmarks do not time it.
    emulated: Callable[[torch.device], bool] = lambda device: False
    # Whether the backend takes grouped-query calls, k and v with H_kv < H heads (reading the shared
    # head, never a copy per query head); one that does not is refused such calls by name.
    grouped_query: bool = False
    # Loads what the backend's calls need on `device` (a library to build, ops to register) before
    # torch.compile traces them: that loading is Python dynamo should not trace. Called by the
    # trainer before torch.compile; a backend that loads nothing keeps the no-op.
    prepare: Callable[[torch.device], None] = _nothing_to_prepare
    # Loads what the backend's calls need on `device`, as `prepare` does, but returns why that
    # failed (or None) instead of raising: what `refusal` asks last, so that backend="auto" passes
    # over a backend whose library fails to build (a compiler error, found only by building) with
    # the reason, where a call that names the backend raises it.
    load_refusal: Callable[[torch.device], Optional[str]] = _nothing_to_load

    def call_refusal(self, q: torch.Tensor, dropout_p: float, kv_heads: Optional[int] = None) -> Optional[str]:
        """Why this backend does not support this call (q, dropout, H_kv key/value heads; None:
        as many as q has), or None."""
        H = q.shape[1]
        if kv_heads is not None and kv_heads != H and not self.grouped_query:
            return f"grouped-query attention (H={H} query heads over H_kv={kv_heads}) is not supported"
        return self.unsupported_reason(q, dropout_p)

    def refusal(self, q: torch.Tensor, dropout_p: float, kv_heads: Optional[int] = None) -> Optional[str]:
        """Why this backend cannot run this call here (unavailable, unsupported, or what it needs
        failing to load), or None, and then it has loaded what the call needs: what backend="auto"
        asks of each candidate. Refused by this process (not by the call), it says why once, in the log."""
        reason = self.unavailable_reason(q.device)
        if reason is None:
            reason = self.call_refusal(q, dropout_p, kv_heads)
            if reason is not None:
                return reason  # this call's dtype or shape: no news about the environment
            reason = self.load_refusal(q.device)
        if reason is not None:
            _say_unavailable_once(self.name, q.device, reason)
        return reason


_said: set[tuple[str, str, str]] = set()


def _say_unavailable_once(name: str, device: torch.device, reason: str) -> None:
    key = (name, device.type, reason)
    if key not in _said:
        _said.add(key)
        log.info("attention backend %r cannot run on %s here: %s", name, device.type, reason)


# The kinds of call that `backend="auto"` orders separately (call_kind picks one).
CALL_KINDS = ("plain", "dropout", "cached")

# The order in which `backend="auto"` tries backends, per device type and per kind of call:
# fastest first, as measured by the benchmarks. The first backend that is available and supports
# the call runs. Device types not listed use "default". The CPU figures behind the orders come
# from `python benchmarks/ext_cpu.py` (benchmarks/results/ext_cpu.json; README, "The ext backend
# on CPU").
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {
        # Training shapes, forward + backward: ext skips the tiles above the diagonal and fuses the
        # softmax with its dropout, so it leads, by most with dropout (sdpa's CPU dropout runs the
        # unfused math). Where ext cannot be built (no compiler/ninja, an unusable cache directory,
        # a compile that failed) or the dtype is fp16/fp64, auto moves on.
        "plain": ("ext", "sdpa", "naive"),
        "dropout": ("ext", "sdpa", "naive"),
        # A KV-cache step (fewer queries than keys; a decode step has one query): the work is tiny,
        # so the number of calls decides, and ext's three op calls cost more than sdpa's one (the
        # decode rows of the same benchmark).
        "cached": ("sdpa", "ext", "naive"),
    },
    "default": {kind: ("sdpa", "naive") for kind in CALL_KINDS},
    # "triton" is in no list: on CPU it runs interpreted (orders of magnitude slower than sdpa);
    # on CUDA it has not been benchmarked against sdpa yet, so it is chosen only by name.
}


def call_kind(T_q: int, T_k: int, dropout_p: float) -> str:
    """The kind of an attention call, for `backend="auto"`: "dropout" (dropout_p > 0), "cached"
    (T_q < T_k: the new queries of a KV-cache step) or "plain"."""
    if dropout_p > 0:
        return "dropout"
    return "cached" if T_q < T_k else "plain"


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Adds `backend` to the registry; a second backend of the same name is an error."""
    if backend.name == "auto":
        raise ValueError("backend name 'auto' is reserved for automatic selection")
    existing = _BACKENDS.get(backend.name)
    if existing is not None and existing.fn is not backend.fn:
        raise ValueError(f"an attention backend named {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend


def backend_names() -> list[str]:
    """Every registered backend, available here or not."""
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend called `name`; an unknown name is an error that lists the known ones."""
    try:
        return _BACKENDS[name]
    except KeyError:
        known = ", ".join(["auto", *_BACKENDS])
        raise ValueError(f"backend={name!r} is not a known attention backend; choose one of: {known}") from None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on `device` in this process (each may still refuse some calls)."""
    device = torch.device(device)
    return [name for name, b in _BACKENDS.items() if b.unavailable_reason(device) is None]


def auto_order(device: torch.device, kind: str) -> tuple[str, ...]:
    """The backends `backend="auto"` tries, in order, for a call of `kind` (CALL_KINDS) on `device`."""
    if kind not in CALL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(CALL_KINDS)}; got {kind!r}")
    return AUTO_ORDER.get(device.type, AUTO_ORDER["default"])[kind]
