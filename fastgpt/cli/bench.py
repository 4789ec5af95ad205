"""`fastgpt bench attention | generate | train | packing | decode | cross-entropy`: the benchmarks of fastgpt/bench/,
as tables, CSV/JSON and plots.

Every flag is checked, and the out-dir made and proven writable, before the work: a sweep of
minutes is never run only to be refused or lost at the end.
"""

from __future__ import annotations

import argparse

from fastgpt.cli.args import at_least_one, positive, probability, usable_device
from fastgpt.cli.train import keep_freed_memory

NAME = "bench"
HELP = ("benchmark the backends against eager PyTorch (tables, CSV/JSON, plots); generate: sampling with and "
        "without the KV cache, batched; packing: documents padded vs packed; decode: long-context split-KV, "
        "or with --page-size a paged KV cache read in place; cross-entropy: the LM head and its loss, memory and time")

# The kinds of `fastgpt bench` that read each flag of one kind only: any other kind would ignore it.
BENCH_FLAG_KINDS = {
    "--smoke": ("attention", "generate"),
    "--seq-lens": ("attention",), "--tokens": ("attention", "cross-entropy"), "--kv-heads": ("attention", "decode"),
    "--dtypes": ("attention",), "--modes": ("attention",), "--dropouts": ("attention",), "--variants": ("attention",),
    "--validate-max-t": ("attention",),
    "--reps": ("attention", "generate", "train", "packing", "decode", "cross-entropy"),
    "--vocab-sizes": ("cross-entropy",), "--hidden": ("cross-entropy",),
    "--dtype": ("attention", "train", "train --profile", "packing"),
    "--preset": ("generate", "train", "train --profile", "packing"),
    "--linear": ("generate",),
    "--batched": ("generate",), "--num-prompts": ("generate",), "--page-size": ("generate", "decode"),
    "--steps": ("train", "train --profile", "packing"), "--data": ("train", "train --profile", "packing"),
    "--block-size": ("packing",), "--batch-size": ("packing", "decode"), "--write-speeches": ("packing",),
    "--kv-lens": ("decode",), "--heads": ("decode",), "--head-dim": ("decode",),
    "--peak-flops": ("train",),
    "--profile": ("train",),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    from fastgpt.run.config import DTYPES, PRESETS  # and with them torch, before `run`

    parser = subparsers.add_parser(NAME, help=HELP)
    parser.add_argument("what", choices=["attention", "train", "generate", "packing", "decode", "cross-entropy"])
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--out-dir", default="bench_results", help="where the JSON, CSV and PNGs go")
    parser.add_argument("--backends", nargs="+", default=None, help="default: every backend available")
    parser.add_argument("--reps", type=at_least_one, default=None, help="timed repetitions per cell")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="attention, generate: a tiny run, to check the harness")
    parser.add_argument("--seq-lens", type=at_least_one, nargs="+", default=None, help="attention: the T sweep")
    parser.add_argument("--tokens", type=at_least_one, default=None,
                        help="attention: B·T, held constant; cross-entropy: the rows N (default 1024)")
    parser.add_argument("--vocab-sizes", type=at_least_one, nargs="+", default=None,
                        help="cross-entropy: the vocabularies V (default 32768 131072)")
    parser.add_argument("--hidden", type=at_least_one, default=None, help="cross-entropy: the hidden width H "
                                                                            "(default 512)")
    parser.add_argument("--kv-heads", type=at_least_one, default=None,
                        help="attention: key/value heads (grouped-query; must divide the sweep's heads)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--modes", nargs="+", default=None, choices=["forward", "backward", "forward+backward"])
    parser.add_argument("--dropouts", type=probability, nargs="+", default=None)
    parser.add_argument("--validate-max-t", type=at_least_one, default=None,
                        help="attention: check each backend against the float64 reference at min(T, this) "
                             "(the float64 T×T matrices of a long T outgrow the memory); default: at T")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="attention: option sets to time, e.g. causal window:256 window:1024 softcap sinks "
                             "(forms: causal, bidirectional, window:W, softcap[:C], sinks, alibi)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="train: the preset to time (default cpu); generate: its model (default "
                             "shakespeare-char, random weights)")
    parser.add_argument("--linear", nargs="+", default=None, choices=["auto", "torch", "skinny"],
                        help="generate: kernels of the linear layers (default: torch skinny; fastgpt/model/linear.py)")
    _add_generate_batched_arguments(parser)
    _add_packing_and_decode_arguments(parser)
    parser.add_argument("--steps", type=at_least_one, default=None,
                        help="train: steps per timed repetition (default 5); with --profile, the run's iterations "
                             "(default: the preset's max_iters)")
    parser.add_argument("--profile", action="store_true",
                        help="train: profile one whole run (fastgpt train's loop) per phase: data, forward, "
                             "backward, optimizer, evaluate, checkpoint, finish, the rest of the loop; and the top ops")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="train: the autocast dtype of the steps, as `fastgpt train --dtype` (default fp32); "
                             "attention: the one dtype of the sweep (bf16 is --dtypes bfloat16)")
    parser.add_argument("--data", default=None, help="train: corpus path")
    parser.add_argument("--peak-flops", type=positive, default=None, help="train: the device's peak FLOP/s for MFU")
    return parser


def _add_generate_batched_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batched", action="store_true",
                        help="generate: N prompts in one batch over the paged KV cache against N single-prompt "
                             "generations, tokens/s and peak memory (instead of the KV-cache cases; linear kernel "
                             "torch unless --linear)")
    parser.add_argument("--num-prompts", type=at_least_one, default=None, help="generate --batched: N (default 16)")
    parser.add_argument("--page-size", type=at_least_one, default=None,
                        help="generate --batched: positions per page, a multiple of 16 from 16 to 4096 (default 16); "
                             "decode: time a step of --batch-size sequences over a paged cache of this page size "
                             "(in place, gathered, contiguous) instead of split-KV")


def _add_packing_and_decode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-size", type=at_least_one, default=None, help="packing: tokens per row (default 256)")
    parser.add_argument("--batch-size", type=at_least_one, default=None,
                        help="packing: rows per step (default: the preset's); decode --page-size: sequences (default 16)")
    parser.add_argument("--write-speeches", default=None, metavar="PATH",
                        help="packing: write tiny-shakespeare's speeches as documents (.jsonl, or a new folder) and stop")
    parser.add_argument("--kv-lens", type=at_least_one, nargs="+", default=None,
                        help="decode: the cache lengths T_k of one decode step (default 4096 16384 65536)")
    parser.add_argument("--heads", type=at_least_one, default=None, help="decode: query heads (default 8)")
    parser.add_argument("--head-dim", type=at_least_one, default=None, help="decode: head dim D (default 64)")


def run(args: argparse.Namespace) -> int:
    _refuse_ignored_flags(args)
    if args.device not in (None, "auto"):
        usable_device(args.device)
    if args.what == "attention":
        files, pngs = _bench_attention(args)
    elif args.what == "generate":
        files, pngs = _bench_generate(args)
    elif args.what == "packing":
        files, pngs = _bench_packing(args)
        if not files:  # --write-speeches: nothing timed
            return 0
    elif args.what == "decode":
        files, pngs = _bench_decode(args)
    elif args.what == "cross-entropy":
        files, pngs = _bench_cross_entropy(args)
    elif args.profile:
        files, pngs = _bench_train_profile(args)
    else:
        files, pngs = _bench_train(args)
    print("fastgpt bench: wrote " + ", ".join(str(p) for p in [*files.values(), *pngs]))
    return 0


def _refuse_ignored_flags(args: argparse.Namespace) -> None:
    kind = "train --profile" if args.what == "train" and args.profile else args.what
    for flag, kinds in BENCH_FLAG_KINDS.items():
        given = getattr(args, flag[2:].replace("-", "_")) not in (None, False)
        if given and kind not in kinds and not (flag == "--profile" and kind == "train --profile"):
            raise ValueError(f"{flag} applies to bench {', '.join(kinds)}; bench {kind} would ignore it: drop it")


def _torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _bench_attention(args: argparse.Namespace):
    """Runs the attention sweep; the results' files and plots."""
    from fastgpt.bench.attention import AttentionSweep, run_attention_benchmark
    from fastgpt.bench.plots import plot_attention
    from fastgpt.bench.report import attention_markdown, prepare_out_dir, write_results
    from fastgpt.run.config import DTYPES

    device = args.device if args.device not in (None, "auto") else ("cuda" if _torch_cuda_available() else "cpu")
    sweep = AttentionSweep.smoke(device) if args.smoke else AttentionSweep.default(device)
    for name in ("seq_lens", "dtypes", "modes", "dropouts", "backends", "reps", "tokens", "kv_heads", "variants"):
        if getattr(args, name) is not None:
            setattr(sweep, name, getattr(args, name))
    if args.validate_max_t is not None:
        sweep.validate_max_T = args.validate_max_t
    if args.dtype is not None:
        if args.dtypes is not None:
            raise ValueError(f"--dtype {args.dtype} and --dtypes {' '.join(args.dtypes)} both name the sweep's "
                             "dtypes: give one of them")
        sweep.dtypes = [str(DTYPES[args.dtype]).removeprefix("torch.")]
    sweep.check()
    out_dir = prepare_out_dir(args.out_dir)
    result = run_attention_benchmark(sweep, progress=not args.no_progress)
    print(attention_markdown(result))
    return write_results(result, out_dir, "attention"), plot_attention(result, out_dir)


def _bench_generate(args: argparse.Namespace):
    """Times sampling with and without the KV cache; the results' files and plots."""
    from fastgpt.bench.common import check_backend_names
    from fastgpt.bench.generate import generate_markdown, run_generate_benchmark
    from fastgpt.bench.plots import plot_generate
    from fastgpt.bench.report import prepare_out_dir, write_results

    check_backend_names(args.backends, allow_auto=True)
    if args.batched:
        return _bench_generate_batched(args)
    for flag in ("num_prompts", "page_size"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} applies to bench generate --batched; without --batched "
                             "it would be ignored: drop it")
    out_dir = prepare_out_dir(args.out_dir)
    device = {None: "cpu", "auto": "cuda" if _torch_cuda_available() else "cpu"}.get(args.device, args.device)
    result = run_generate_benchmark(args.preset or "shakespeare-char", args.backends, args.reps or 3,
                                    device, args.smoke, progress=not args.no_progress,
                                    linear=args.linear)
    print(generate_markdown(result))
    return write_results(result, out_dir, "generate"), plot_generate(result, out_dir)


def _bench_generate_batched(args: argparse.Namespace):
    """Times batched against sequential generation; the results' files and plot."""
    from fastgpt.attention.paged import check_page_size
    from fastgpt.bench.generate import BATCHED_PROMPTS, batched_markdown, plot_batched, run_batched_benchmark
    from fastgpt.bench.report import prepare_out_dir, write_results

    page_size = check_page_size(args.page_size or 16, "--page-size")
    out_dir = prepare_out_dir(args.out_dir)
    device = {None: "cpu", "auto": "cuda" if _torch_cuda_available() else "cpu"}.get(args.device, args.device)
    result = run_batched_benchmark(args.preset or "shakespeare-char", args.backends, args.reps or 3, device,
                                   args.smoke, args.num_prompts or BATCHED_PROMPTS, page_size, args.linear,
                                   progress=not args.no_progress)
    print(batched_markdown(result))
    return write_results(result, out_dir, "generate_batched"), plot_batched(result, out_dir)


def _bench_packing(args: argparse.Namespace):
    """Trains on documents padded and packed, interleaved; the results' files and plot."""
    from fastgpt.bench.packing import (packing_markdown, plot_packing, run_packing_benchmark, shakespeare_speeches,
                                       write_documents)
    from fastgpt.bench.report import prepare_out_dir, write_results
    from fastgpt.run.trainer import resolve_device

    if args.write_speeches:
        speeches = shakespeare_speeches()
        print(f"wrote {len(speeches):,} speeches to {write_documents(speeches, args.write_speeches)}")
        return {}, []
    _one_backend(args, "--backends: packing runs one attention backend in both modes; got")
    out_dir = prepare_out_dir(args.out_dir)
    kept = resolve_device(args.device or "auto").type == "cpu" and keep_freed_memory(True)
    preset = args.preset or "cpu"
    overrides = {"block_size": args.block_size or 256, **({"batch_size": args.batch_size} if args.batch_size else {})}
    result = run_packing_benchmark(preset, args.device or "auto", steps=args.steps or 3, reps=args.reps or 5,
                                   backend=args.backends[0] if args.backends else "auto", data=args.data,
                                   dtype=args.dtype or "fp32", overrides=overrides, progress=not args.no_progress)
    result["environment"]["keep_freed_memory"] = kept
    print(packing_markdown(result))
    return write_results(result, out_dir, f"packing_{preset}"), [plot_packing(result, out_dir / f"packing_{preset}.png")]


def _one_backend(args: argparse.Namespace, refusal: str) -> None:
    """--backends names at most one backend ("auto" allowed), else a ValueError: `refusal`, the count, the names."""
    from fastgpt.bench.common import check_backend_names

    if args.backends is not None and len(args.backends) != 1:
        raise ValueError(f"{refusal} {len(args.backends)}: {' '.join(args.backends)}")
    check_backend_names(args.backends, allow_auto=True)


def _bench_decode(args: argparse.Namespace):
    """Times one long-context decode step per kernel path (split-KV or not), or with --page-size one step
    over a paged cache; the results' files and plot."""
    from fastgpt.attention.paged import check_page_size
    from fastgpt.bench.common import check_backend_names
    from fastgpt.bench.decode import DEFAULT_KV_LENS, DEFAULT_PATHS, print_table, run_decode_benchmark, save
    from fastgpt.bench.report import prepare_out_dir

    check_backend_names(args.backends, allow_auto=False)
    if args.batch_size is not None and args.page_size is None:
        raise ValueError("--batch-size times the paged decode step: give --page-size too (split-KV decodes B = 1)")
    if args.page_size is not None:
        check_page_size(args.page_size, "--page-size")
    out_dir = prepare_out_dir(args.out_dir)
    heads, kv_heads = args.heads or 8, args.kv_heads or (2 if args.page_size else 1)
    if heads % kv_heads != 0:
        raise ValueError(f"--kv-heads {kv_heads} must divide --heads {heads}")
    if args.page_size is not None:
        return _bench_paged_decode(args, out_dir, heads, kv_heads)
    result = run_decode_benchmark(args.kv_lens or DEFAULT_KV_LENS, heads, kv_heads, args.head_dim or 64,
                                  args.backends or DEFAULT_PATHS, args.reps or 20, args.device or "cpu")
    print_table(result)
    paths = save(result, out_dir)
    return {"json": paths[0]}, paths[1:]


def _bench_paged_decode(args: argparse.Namespace, out_dir, heads: int, kv_heads: int):
    """Times one decode step over a paged KV cache per kernel path and way; the results' files and plot."""
    from fastgpt.bench import paged_decode

    result = paged_decode.run_paged_decode_benchmark(args.kv_lens or paged_decode.DEFAULT_KV_LENS, args.page_size,
                                                     args.batch_size or 16, heads, kv_heads, args.head_dim or 64,
                                                     args.backends or paged_decode.DEFAULT_PATHS, args.reps or 20,
                                                     args.device or "cpu")
    paged_decode.print_table(result)
    paths = paged_decode.save(result, out_dir, f"decode_paged_P{args.page_size}")
    return {"json": paths[0]}, paths[1:]


def _bench_cross_entropy(args: argparse.Namespace):
    """Times the LM head and its loss per kernel path, with its peak memory; the results' files and plot."""
    from fastgpt.bench import cross_entropy
    from fastgpt.bench.report import prepare_out_dir

    paths = args.backends or cross_entropy.DEFAULT_PATHS
    cross_entropy.check_paths(paths)
    out_dir = prepare_out_dir(args.out_dir)
    result = cross_entropy.run_cross_entropy_benchmark(args.vocab_sizes or cross_entropy.DEFAULT_VOCAB_SIZES,
                                                       args.tokens or 1024, args.hidden or 512, paths,
                                                       args.reps or 3, args.device or "cpu")
    cross_entropy.print_table(result)
    files = cross_entropy.save(result, out_dir)
    return {"json": files[0]}, files[1:]


def _bench_train_profile(args: argparse.Namespace):
    """Profiles one whole training run per phase; the results' files (no plots)."""
    from fastgpt.bench.report import prepare_out_dir, write_results
    from fastgpt.bench.train_profile import profile_markdown, run_train_profile
    from fastgpt.run.trainer import resolve_device

    _one_backend(args, "--profile runs one attention backend; --backends names")
    out_dir = prepare_out_dir(args.out_dir)
    kept = resolve_device(args.device or "auto").type == "cpu" and keep_freed_memory(True)
    preset = args.preset or "cpu"
    result = run_train_profile(preset, args.device or "auto", max_iters=args.steps, data=args.data,
                               dtype=args.dtype or "fp32", backend=args.backends[0] if args.backends else None)
    result["environment"]["keep_freed_memory"] = kept
    print(profile_markdown(result))
    return write_results(result, out_dir, f"train_profile_{preset}"), []


def _bench_train(args: argparse.Namespace):
    """Times training steps per backend; the results' files (no plots)."""
    from fastgpt.bench.common import check_backend_names
    from fastgpt.bench.report import prepare_out_dir, train_markdown, write_results
    from fastgpt.bench.train import run_train_benchmark
    from fastgpt.run.trainer import resolve_device

    check_backend_names(args.backends, allow_auto=False)
    out_dir = prepare_out_dir(args.out_dir)
    kept = resolve_device(args.device or "auto").type == "cpu" and keep_freed_memory(True)
    preset = args.preset or "cpu"
    result = run_train_benchmark(preset, args.device or "auto", steps=args.steps or 5, reps=args.reps or 3,
                                 backends=args.backends, data=args.data, peak_flops=args.peak_flops,
                                 progress=not args.no_progress, dtype=args.dtype or "fp32")
    result["environment"]["keep_freed_memory"] = kept
    print(train_markdown(result))
    return write_results(result, out_dir, f"train_{preset}"), []
