"""`fastgpt parity`: each attention backend against the float64 reference, one table row per shape."""

from __future__ import annotations

import argparse

from fastgpt.cli.args import usable_device
from fastgpt.run.atomic_file import interrupts_deferred

NAME = "parity"
HELP = "check attention backends against the float64 reference"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(NAME, help=HELP)
    parser.add_argument("--backends", nargs="+", default=None,
                        help="backends or kernel paths (fastgpt info lists them); default: every backend available "
                             "on the device, each on its best path per call")
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float16", "bfloat16", "float32", "float64"])
    parser.add_argument("--variants", nargs="+", default=["causal"],
                        help="option sets to check, as `fastgpt bench attention --variants` names them: causal, "
                             "bidirectional, window:W, softcap[:C], sinks, alibi, varlen (packed sequences of "
                             "different lengths), paged[:P] (their keys in a paged KV cache of P positions a "
                             "page, default 16; the output only); default: causal")
    return parser


def run(args: argparse.Namespace) -> int:
    with interrupts_deferred():  # a Ctrl-C during the imports waits for them (fastgpt/cli/__init__.py says why)
        import torch

        from fastgpt.attention import available_backends, backend_names, kernel_path_names

    from fastgpt.bench.variants import parse_variants

    device = usable_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = parse_variants(args.variants, packed=True)
    known = list(dict.fromkeys([*backend_names(), *kernel_path_names()]))
    for name in args.backends or []:
        if name not in known:
            what = "chooses among the backends per call" if name == "auto" else "is not a backend"
            raise ValueError(f"--backends {name}: {name!r} {what}; parity checks named backends and kernel paths: "
                             f"{', '.join(known)}")
    names = args.backends or available_backends(device)
    default_dtypes = ["float16", "bfloat16", "float32"] if device.type == "cuda" else ["float32", "bfloat16"]
    dtype_names = args.dtypes or default_dtypes
    failures = checks = 0
    print(f"parity against the float64 reference on {device}: max |error| / tolerance, per output")
    print(f"{'backend':<8} {'dtype':<9} {'shape':<24} {'out':>19} {'dq':>19} {'dk':>19} {'dv':>19}  result")
    for variant in variants:
        if len(variants) > 1 or variant.name != "causal":
            print(f"-- {variant.name} (dsinks, where there are sinks, after the result)")
        for name in names:
            backend_checks, backend_failures = _check_backend(name, dtype_names, device, variant)
            checks += backend_checks
            failures += backend_failures
    if checks == 0:
        # nothing was compared (every backend/dtype refused): that proves nothing, so it is no pass
        print(f"fastgpt parity: FAILED: no check ran ({', '.join(names)} in {', '.join(dtype_names)} on {device}); "
              "choose backends and dtypes that run here")
        return 1
    print(f"fastgpt parity: {checks} checks, {'all passed' if failures == 0 else f'{failures} failure(s)'}")
    return 1 if failures else 0


def _check_backend(name: str, dtype_names: list[str], device, variant) -> tuple[int, int]:
    """Prints one row per dtype and shape the backend takes with the variant's options; the checks
    that ran and those that failed (a backend unavailable on the device is one failure)."""
    from fastgpt.attention import AttentionCall, backend_names, get_backend, get_path
    from fastgpt.attention.registry import path_refusal
    from fastgpt.verify.parity import ALL_SHAPES, DTYPE_NAMES, make_qkv, shape_id

    backend = get_backend(name)
    reason = backend.unavailable_reason(device)
    if reason is not None:
        print(f"{name:<8} unavailable on {device}: {reason}")
        return 0, 1
    checks = failures = 0
    for dtype_name in dtype_names:
        dtype = DTYPE_NAMES[dtype_name]
        for shape in ALL_SHAPES:
            q, k, v = make_qkv(shape, dtype, device)
            options = variant.options(q.shape[0], q.shape[1], device)
            call = _variant_call(variant, shape, dtype, device, q, k, v, options)
            reason = backend.backend_refusal(call)
            if reason is None and name not in backend_names():  # a kernel path: its own refusal too
                reason = path_refusal(get_path(name), call, named=True)
            elif reason is None:  # a backend: refused only if every path refuses (the options, say)
                reasons = [path_refusal(path, call) for path in backend.paths]
                reason = None if None in reasons else "; ".join(dict.fromkeys(reasons))
            if reason is not None:
                print(f"{name:<8} {dtype_name:<9} {shape_id(shape):<24} not supported: {reason}")
                continue
            result = _variant_check(variant)(name, shape, dtype, device, **options)
            cells = " ".join(f"{result.errors[k]:>9.2e}/{result.limits[k]:<9.2e}" if k in result.errors
                             else f"{'-':>9} {'':<9}" for k in ("out", "dq", "dk", "dv"))
            status = "ok" if result.ok else f"FAIL ({result.worst})"
            if "dsinks" in result.errors:
                status += f"  dsinks {result.errors['dsinks']:.2e}/{result.limits['dsinks']:.2e}"
            checks += 1
            failures += not result.ok
            print(f"{name:<8} {dtype_name:<9} {shape_id(shape):<24} {cells}  {status}")
    return checks, failures


def _variant_call(variant, shape, dtype, device, q, k, v, options):
    """The AttentionCall the variant makes at `shape`: regular (q, k, v), packed or paged."""
    from fastgpt.attention import AttentionCall
    from fastgpt.attention.paged import paged_call, paged_layout
    from fastgpt.attention.varlen import varlen_call
    from fastgpt.verify.parity import make_packed, make_paged

    if variant.paged:
        q, k_pages, v_pages, table, seq_lens, cu_q = make_paged(shape, dtype, device, variant.paged)
        layout = paged_layout(table, seq_lens, variant.paged, k_pages.shape[0], cu_q, device)
        return paged_call(q, k_pages, v_pages, layout, **options)
    if variant.varlen:
        return varlen_call(*make_packed(shape, dtype, device), **options)
    return AttentionCall.of(q, k, v, **options)


def _variant_check(variant):
    """The parity check of the variant's layout, as a function (backend, shape, dtype, device, **options)."""
    import functools

    from fastgpt.verify.parity import check_paged_parity, check_parity, check_varlen_parity

    if variant.paged:
        return functools.partial(check_paged_parity, page_size=variant.paged)
    return check_varlen_parity if variant.varlen else check_parity
