"""The registry: the one place that knows every kernel path of an op, chooses one per call, and
records which ran. Attention's is ATTENTION (this module's functions are its methods); each fused
op of fastgpt/ops/ has a Registry of its own, with its own options, kinds of call and `auto`
order, and the same rules below.

A *backend* is a family of kernels behind one name ("naive", "sdpa", "triton", "ext"); a *kernel
path* is one concrete way a backend runs a call, named "<backend>" where the backend has one and
"<backend>.<variant>" where it has several (ext: "ext.cpu_flash", "ext.cpu_flash_amx",
"ext.cpu_packed", "ext.cuda"). `backend=` takes either:

    "auto"          the device's order for the kind of call (AUTO_ORDER), each backend standing
                    for its paths in the backend's own order; the first that can run the call runs
    "ext"           the best path of that backend for this call (the first of its paths that can
                    run it and does not decline it: a path declines a call it can run where the
                    backend has a faster one for it)
    "ext.cpu_packed"  that path, and nothing else

A refusal is a reason string, asked in this order: the backend cannot run on the device here; the
call is grouped-query and the backend takes none; the backend does not take the call (dtype, head
dim); for "auto" only, what the backend loads (a library to build) fails; then each path's own
device, the options it does not take (a window, soft-capping, ...: named), the call and (unless
named) decline. Every choice is logged once per kind of call, and every
call counts in `kernels_ran()`, which benchmarks, training metrics and the GPU report record.

Backends live in their own modules and register themselves on import (fastgpt/attention/__init__.py
imports the built-in ones); the registry imports none of them. Backend modules are cheap to import:
heavy dependencies (triton, the C++ extension) load on a path's first call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fastgpt.attention.call import CALL_KINDS, OPTIONS, AttentionCall, dtype_name

log = logging.getLogger("fastgpt.attention")

# (q, k, v, call) -> out: q, out (B, H, T_q, D), k, v (B, H_kv, T_k, D), already validated
PathFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionCall], torch.Tensor]
# the older, single-kernel form a backend may still register: (q, k, v, dropout_p, scale) -> out
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def _no_device_reason(device: torch.device) -> Optional[str]:
    return None


def _no_call_reason(call: AttentionCall) -> Optional[str]:
    return None


def _nothing_to_prepare(device: torch.device) -> None:
    return None


def _never_emulated(device: torch.device) -> bool:
    return False


@dataclass(frozen=True)
class KernelPath:
    name: str
    fn: PathFn
    description: str
    # Why the path cannot run on `device` in this process (another device type, a CPU feature), or None.
    unavailable_reason: Callable[[torch.device], Optional[str]] = _no_device_reason
    # Why the path cannot run this call (dtype, head dim, a traced call), or None.
    unsupported_reason: Callable[[AttentionCall], Optional[str]] = _no_call_reason
    # Why a choice by backend name or by "auto" passes over a call this path could run (the backend
    # has a faster path for it); a call that names this path runs it all the same.
    declines: Callable[[AttentionCall], Optional[str]] = _no_call_reason
    # More about what the path runs for this call where that varies (the products of a bfloat16
    # path: AMX tiles or float32), for benchmark rows; None where there is nothing more to say.
    detail: Optional[Callable[[AttentionCall], Optional[str]]] = None
    # Runs a call (a no-argument function) and names the kernel that ran inside the path, where the
    # path hands the choice to a library (sdpa: PyTorch's flash, efficient, cudnn or math kernel).
    inner_kernel: Optional[Callable[[Callable[[], object]], str]] = None
    # The options beyond plain causal attention the path takes (call.OPTIONS' names); a call using
    # any other is refused by name, with `option_notes[name]` saying why where there is more to say.
    options: frozenset[str] = frozenset()
    option_notes: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def options_refusal(self, call: AttentionCall, order: tuple[str, ...] = OPTIONS) -> Optional[str]:
        """Why the path takes none of the call's options it lacks (named, in the op's `order`), or None."""
        missing = [name for name in order if name in call.options - self.options]
        if not missing:
            return None
        notes = "; ".join(f"{name}: {self.option_notes[name]}" for name in missing if name in self.option_notes)
        return f"{self.name} does not take {', '.join(missing)}" + (f" ({notes})" if notes else "")

    @property
    def backend(self) -> str:
        return self.name.partition(".")[0]


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    # The backend's kernel paths, best first; a backend given `fn` instead has one, named after it.
    paths: tuple[KernelPath, ...] = ()
    fn: Optional[AttentionFn] = None
    # Why the backend cannot run on `device` in this process (missing package, no GPU), or None.
    unavailable_reason: Callable[[torch.device], Optional[str]] = _no_device_reason
    # Why the backend takes no call like this one (dtype, head dim), asked before anything loads.
    unsupported_reason: Callable[[AttentionCall], Optional[str]] = _no_call_reason
    # Returns memory the backend keeps cached between calls (buffer pools) to the system, so that
    # a memory measurement sees what one call needs; None for backends that cache nothing.
    empty_cache: Optional[Callable[[], None]] = None
    # True where the backend runs as an emulation rather than as a kernel (Triton's interpreter on
    # CPU): correct, but its speed means nothing, so benchmarks do not time it.
    emulated: Callable[[torch.device], bool] = _never_emulated
    # Whether the backend takes grouped-query calls, k and v with H_kv < H heads (reading the shared
    # head, never a copy per query head); one that does not is refused such calls by name.
    grouped_query: bool = False
    # Loads what the backend's calls need on `device` before torch.compile traces them: that
    # loading is Python dynamo should not trace. A backend that loads nothing keeps the no-op.
    prepare: Callable[[torch.device], None] = _nothing_to_prepare
    # `prepare`, returning why it failed (or None) instead of raising: asked last by "auto", so that
    # it passes over a backend whose library fails to build, where a call naming the backend raises.
    load_refusal: Callable[[torch.device], Optional[str]] = lambda device: None
    # Runs a call on one of the backend's paths and gives back the dropout mask it drew:
    # (q, k, v, call, path) -> (out, keep (B, H, T_q, T_k) bool); None where the mask cannot be
    # rebuilt (sdpa draws it inside PyTorch; naive's is F.dropout's).
    with_dropout_mask: Optional[Callable] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.fn is not None and not self.paths:
            fn = self.fn
            only = KernelPath(self.name, lambda q, k, v, call: fn(q, k, v, call.dropout_p, call.scale), self.description)
            object.__setattr__(self, "paths", (only,))
        if not self.paths:
            raise ValueError(f"backend {self.name!r} has no kernel path: give it paths or fn")
        for path in self.paths:
            if path.backend != self.name:
                raise ValueError(f"kernel path {path.name!r} must be named {self.name!r} or {self.name!r}.<variant>")

    def backend_refusal(self, call: AttentionCall) -> Optional[str]:
        """Why this backend takes no path for this call (device, grouped heads, dtype), or None."""
        reason = self.unavailable_reason(call.device)
        if reason is not None:
            return reason
        if getattr(call, "grouped", False) and not self.grouped_query:
            return f"grouped-query attention (H={call.heads} query heads over H_kv={call.kv_heads}) is not supported"
        return self.unsupported_reason(call)


_said: set[tuple[str, str, str]] = set()


def _say_unavailable_once(op: str, name: str, device: torch.device, reason: str) -> None:
    key = (f"{op} {name}", device.type, reason)
    if key not in _said:
        _said.add(key)
        log.info("%s backend %r cannot run on %s here: %s", op, name, device.type, reason)


# The order in which `backend="auto"` tries backends, per device type and per kind of call
# (AttentionCall.kind), fastest first as the benchmarks measure it (docs/benchmarks.md); each
# backend stands for its paths, in its own order. Device types not listed use "default".
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {
        # Training shapes: ext skips the tiles above the diagonal and fuses the softmax with its
        # dropout (sdpa's CPU dropout runs the unfused math). Where ext cannot be built or takes
        # no such dtype, auto moves on.
        "plain": ("ext", "sdpa", "naive"),
        "dropout": ("ext", "sdpa", "naive"),
        # A KV-cache step: the work is tiny, so the number of calls decides, and sdpa makes one.
        "cached": ("sdpa", "ext", "naive"),
    },
    "default": {kind: ("sdpa", "naive") for kind in CALL_KINDS},
    # "triton" is in no list: on CPU it runs interpreted; on CUDA it has not been measured against
    # sdpa, so it runs only by name. ext's CUDA kernels likewise.
}


class Registry:
    """The backends and kernel paths of one op ("attention", "layer_norm", ...), its `auto` order
    (per device type and kind of call), and the choice of a path per call. A call is any value with
    `device`, `dtype`, `kind` (one of `kinds`), `options` (a frozenset of `options`' names),
    `compiling` and `describe()`; AttentionCall is attention's. Every op's paths count in the one
    record of what ran (`kernels_ran`), so their names are unique across ops."""

    def __init__(self, op: str, options: tuple[str, ...], kinds: tuple[str, ...],
                 order: dict[str, dict[str, tuple[str, ...]]], record_prefix: str = ""):
        self.op, self.options, self.kinds, self.order = op, options, kinds, order
        self.record_prefix = record_prefix  # what kernels_ran() puts before a path's name: "layer_norm:"
        self.backends: dict[str, Backend] = {}
        self.paths: dict[str, tuple[Backend, KernelPath]] = {}
        self._announced: set[tuple] = set()

    def register_backend(self, backend: Backend) -> None:
        """Adds `backend` and its paths; a second backend of the same name is an error."""
        if backend.name == "auto":
            raise ValueError("backend name 'auto' is reserved for automatic selection")
        existing = self.backends.get(backend.name)
        if existing is not None and existing.paths != backend.paths:
            raise ValueError(f"an {self.op} backend named {backend.name!r} is already registered")
        self.backends[backend.name] = backend
        for path in backend.paths:
            self.paths[path.name] = (backend, path)

    def backend_names(self) -> list[str]:
        """Every registered backend, available here or not."""
        return list(self.backends)

    def kernel_path_names(self) -> list[str]:
        """Every registered kernel path, backend by backend, each backend's best first."""
        return list(self.paths)

    def get_backend(self, name: str) -> Backend:
        """The backend called `name` (or owning the path `name`); an unknown name lists the known ones."""
        if name in self.backends:
            return self.backends[name]
        if name in self.paths:
            return self.paths[name][0]
        known = ", ".join(["auto", *self.backends, *(p for p in self.paths if p not in self.backends)])
        raise ValueError(f"backend={name!r} is not a known {self.op} backend or kernel path; choose one of: {known}")

    def get_path(self, name: str) -> KernelPath:
        self.get_backend(name)  # an unknown name: the error that lists the known ones
        if name not in self.paths:
            paths = ", ".join(p.name for p in self.backends[name].paths)
            raise ValueError(f"{name!r} is a backend with several kernel paths ({paths}), not one path")
        return self.paths[name][1]

    def available_backends(self, device: torch.device | str = "cpu") -> list[str]:
        """The backends that can run on `device` in this process (each may still refuse some calls)."""
        device = torch.device(device)
        return [name for name, b in self.backends.items() if b.unavailable_reason(device) is None]

    def auto_order(self, device: torch.device, kind: str) -> tuple[str, ...]:
        """The backends `backend="auto"` tries, in order, for a call of `kind` on `device`."""
        if kind not in self.kinds:
            raise ValueError(f"kind must be one of {', '.join(self.kinds)}; got {kind!r}")
        return self.order.get(device.type, self.order["default"])[kind]

    def path_refusal(self, path: KernelPath, call, named: bool = False) -> Optional[str]:
        """Why `path` does not run `call` (its device, the call, or unless `named`, a decline), or
        None. The backend's own refusal (Backend.backend_refusal) is asked first, separately."""
        return (path.unavailable_reason(call.device) or path.options_refusal(call, self.options)
                or path.unsupported_reason(call) or (None if named else path.declines(call)))

    def first_path(self, backend: Backend, call) -> tuple[Optional[KernelPath], list[str]]:
        """The backend's best path for the call, or None and each path's reason."""
        reasons = []
        for path in backend.paths:
            reason = self.path_refusal(path, call)
            if reason is None:
                return path, reasons
            reasons.append(f"{path.name}: {reason}" if len(backend.paths) > 1 else reason)
        return None, reasons

    def choose(self, call, backend: str = "auto") -> KernelPath:
        """The kernel path that runs `call`; never a silent substitute.

        A named backend or path that cannot run raises (RuntimeError when it is unavailable here,
        ValueError when it does not take the call). "auto" takes the first path of the device's
        order for the kind of call that can run it.
        """
        if backend == "auto":
            return self._choose_auto(call)
        owner = self.get_backend(backend)
        reason = owner.unavailable_reason(call.device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} is not available on device {call.device}: {reason}")
        reason = owner.backend_refusal(call)
        if reason is not None:
            raise ValueError(f"backend={backend!r} does not support this call: {reason}")
        if backend not in self.backends:  # a path's name: that path, declines or not
            path = self.paths[backend][1]
            reason = self.path_refusal(path, call, named=True)
            if reason is not None:
                kind = RuntimeError if path.unavailable_reason(call.device) else ValueError
                raise kind(f"kernel path {backend!r} cannot run this call ({call.describe()}): {reason}")
            return self._chosen(path, call, backend)
        path, reasons = self.first_path(owner, call)  # a backend's name: its best path for the call
        if path is None:
            raise ValueError(f"backend={backend!r} does not support this call ({call.describe()}): "
                             + "; ".join(reasons))
        return self._chosen(path, call, backend)

    def _choose_auto(self, call) -> KernelPath:
        refusals = []
        for name in self.auto_order(call.device, call.kind):
            backend = self.backends[name]
            reason = backend.backend_refusal(call)
            if reason is None:
                reason = backend.load_refusal(call.device)
                if reason is not None:
                    _say_unavailable_once(self.op, name, call.device, reason)
            elif backend.unavailable_reason(call.device) is not None:
                _say_unavailable_once(self.op, name, call.device, reason)
            if reason is not None:
                refusals.append(f"{name}: {reason}")
                continue
            path, reasons = self.first_path(backend, call)
            if path is not None:
                return self._chosen(path, call, "auto")
            refusals.append(f"{name}: " + "; ".join(reasons))
        raise RuntimeError(f"no {self.op} kernel can run this call ({call.describe()}): " + "; ".join(refusals))

    def refusal(self, call, backend: str = "auto") -> Optional[str]:
        """Why `backend` (a backend, a kernel path or "auto") would not run `call` here, or None,
        and then what it needs is loaded: what benchmarks and tests ask before timing or comparing
        it. Unlike a call, a named backend whose library fails to build is a reason here, not an error."""
        if backend == "auto":
            try:
                self._choose_auto(call)
            except RuntimeError as e:
                return str(e)
            return None
        owner = self.get_backend(backend)
        reason = owner.backend_refusal(call) or owner.load_refusal(call.device)
        if reason is not None:
            return reason
        if backend not in self.backends:
            return self.path_refusal(self.paths[backend][1], call, named=True)
        path, reasons = self.first_path(owner, call)
        return None if path is not None else "; ".join(reasons)

    def record(self, path: KernelPath) -> None:
        """Counts one call of `path` in kernels_ran(), under this op's prefix."""
        _ran[self.record_prefix + path.name] = _ran.get(self.record_prefix + path.name, 0) + 1

    def _chosen(self, path: KernelPath, call, asked: str) -> KernelPath:
        key = (call.device.type, call.dtype, call.kind, asked, path.name, call.options)
        if key not in self._announced and not call.compiling:  # a trace logs nothing: its eager calls did
            self._announced.add(key)
            options = ", ".join(name for name in self.options if name in call.options)
            log.info("%s: backend=%r runs kernel path %r for %s %s calls (%s call%s)%s", self.op, asked, path.name,
                     call.device.type, dtype_name(call.dtype), call.kind, f"; {options}" if options else "",
                     f", dropout {call.dropout_p}" if hasattr(call, "dropout_p") else "")
        return path


# Attention's registry, and its methods as the module's functions (what the rest of fastgpt calls).
ATTENTION = Registry("attention", OPTIONS, CALL_KINDS, AUTO_ORDER)
register_backend = ATTENTION.register_backend
backend_names = ATTENTION.backend_names
kernel_path_names = ATTENTION.kernel_path_names
get_backend = ATTENTION.get_backend
get_path = ATTENTION.get_path
available_backends = ATTENTION.available_backends
auto_order = ATTENTION.auto_order
path_refusal = ATTENTION.path_refusal
choose = ATTENTION.choose
refusal = ATTENTION.refusal


# ---- the record of what ran ---------------------------------------------------------------------
# Every call counts here, under torch.compile too (dynamo replays the count with the graph).
_ran: dict[str, int] = {}


def record(path: KernelPath) -> None:
    ATTENTION.record(path)


def kernels_ran(reset: bool = False) -> dict[str, int]:
    """{kernel path: calls} since the process started or the last reset=True: attention's paths by
    name, another op's as "<op>:<path>" ("linear_cross_entropy:torch")."""
    counts = dict(_ran)
    if reset:
        _ran.clear()
    return counts
