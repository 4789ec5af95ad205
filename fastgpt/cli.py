"""The `fastgpt` command: train, sample, parity, check, bench.

Every ModelConfig/TrainConfig field is a flag of `fastgpt train` (n_layer -> --n-layer); a flag
given on the command line overrides the preset's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from fastgpt.atomic_file import interrupts_deferred, sigterm_raises, stop_status, stop_text

# Nothing here imports torch: main() loads the library (_load_library), so that a Ctrl-C during
# that import of a second or more is answered in one line like any other.
if TYPE_CHECKING:
    from fastgpt.config import DTYPES, PRESETS, TrainConfig
    from fastgpt.model import ModelConfig


def _at_least_one(text: str) -> int:
    """argparse type: an integer >= 1 (a count of repetitions, steps, tokens or a length)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {value}")
    return value


def _probability(text: str) -> float:
    """argparse type: a dropout probability in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1); got {value}")
    return value


def _positive(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {value}")
    return value


def _flag_type(annotation) -> Any:
    if typing.get_origin(annotation) is typing.Union:  # Optional[X] -> X
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for cls in (ModelConfig, TrainConfig):
        group = parser.add_argument_group(f"{cls.__name__} fields (override the preset)")
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            flag = "--" + field.name.replace("_", "-")
            kind = _flag_type(hints[field.name])
            if kind is bool:
                group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
            else:
                group.add_argument(flag, dest=field.name, type=kind, default=None, metavar=kind.__name__.upper())


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)}
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def cmd_train(args: argparse.Namespace) -> int:
    from fastgpt import distributed
    from fastgpt.config import make_configs
    from fastgpt.train import Trainer, resolve_device

    overrides = _overrides(args)
    resume = overrides.pop("resume", False)
    if resume and args.preset is not None:
        raise ValueError("--preset applies to a new run: a resumed run keeps its checkpoint's settings (change one "
                         "with its own flag, e.g. --max-iters)")
    if resume and args.overwrite:
        raise ValueError("--resume continues the run in --out-dir and --overwrite starts it over: choose one")
    if args.allow_corpus_change and not resume:
        raise ValueError("--allow-corpus-change applies only with --resume")
    trainer = None
    try:  # under torchrun the Trainer joins the process group; leave it on every way out
        if resume:
            trainer = Trainer.resume(overrides.pop("out_dir", "out"), overrides,
                                     allow_corpus_change=args.allow_corpus_change)
            _refuse_nothing_to_train(trainer, "max_iters" in overrides)
            if trainer.is_main:
                print(f"fastgpt: resuming at iteration {trainer.iter} of {trainer.train_config.max_iters}")
        else:
            preset = args.preset
            if preset is None:
                # The lecture's preset needs a GPU; on a CPU the nanoGPT CPU run is the sensible default.
                preset = "shakespeare-char" if resolve_device(overrides.get("device", "auto")).type == "cuda" else "cpu"
                if distributed.is_main():
                    print(f"fastgpt: preset {preset!r} (the default on this device; choose with --preset)")
            trainer = Trainer(*make_configs(preset, overrides))
        if trainer.device.type == "cpu":
            _keep_freed_memory(trainer.is_main)
        trainer.run(overwrite=args.overwrite)
    except KeyboardInterrupt as stop:
        # Ctrl-C (or SIGTERM) is how a run is stopped, not a failure to explain: one line, and where to pick up.
        if distributed.is_main():
            where = trainer.resume_hint() if trainer is not None else "stopped before training began"
            print(f"fastgpt train: {stop_text(stop)}; {where}", file=sys.stderr)
        return stop_status(stop)  # 130 or 143: 128 + the signal's number, the shell's convention
    finally:
        distributed.teardown()
    return 0


def _refuse_nothing_to_train(trainer, flag_given: bool) -> None:
    """A resumed run must have steps left: one whose max_iters is not above its checkpoint's
    iteration would print its start, train nothing and exit 0, as if it had done the work."""
    it, max_iters, out_dir = trainer.iter, trainer.train_config.max_iters, trainer.out_dir
    if max_iters > it:
        return
    setting = f"--max-iters {max_iters}" if flag_given else f"its max_iters {max_iters}"
    if max_iters < it:
        why = f"{setting} is below iteration {it}, which the checkpoint in {str(out_dir)!r} holds"
    else:
        why = f"the run in {str(out_dir)!r} already reached {setting} (its checkpoint holds iteration {it})"
    raise ValueError(f"nothing to train: {why}; to train further, resume with a --max-iters above {it}")


def _keep_freed_memory(say: bool) -> bool:
    """A CPU training run's process keeps freed memory for reuse (fastgpt/host_memory.py); whether it does."""
    from fastgpt.host_memory import keep_freed_memory

    note = keep_freed_memory()
    if note and say:
        print(note)
    return note is not None


def cmd_sample(args: argparse.Namespace) -> int:
    import time

    import torch

    from fastgpt.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from fastgpt.data import CharTokenizer
    from fastgpt.linear import linear_kernel_text, resolve_linear_kernel
    from fastgpt.model import build_model
    from fastgpt.train import resolve_device

    device = resolve_device(args.device)
    state = load_checkpoint(Path(args.out_dir) / CHECKPOINT_NAME, map_location=device)
    config = ModelConfig(**state["model_config"])
    if args.attention is not None:
        config.attention = args.attention
    model = build_model(config).to(device)
    model.load_state_dict(state["model"])
    linear, how_chosen = resolve_linear_kernel(args.linear, model)
    model.set_linear_kernel(linear)
    tokenizer = CharTokenizer(state["vocab"])
    if not args.prompt:
        raise ValueError("--prompt must hold at least one character to start from")
    idx = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long, device=device)
    generator = None if args.seed is None else torch.Generator(device=device).manual_seed(args.seed)
    tokens = model.generate_stream(idx, args.max_new_tokens, args.temperature, args.top_k, generator,
                                   kv_cache=args.kv_cache, cache_policy=args.cache_policy)  # checks its arguments
    # The text streams to stdout as it is sampled; the speed goes to stderr, so stdout is the text.
    print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    for next_id in tokens:
        print(tokenizer.decode(next_id[0].tolist()), end="", flush=True)
    elapsed = time.perf_counter() - start
    print()
    cache = f"KV cache, {args.cache_policy} policy" if args.kv_cache else "no KV cache"
    print(f"fastgpt: {args.max_new_tokens} tokens in {elapsed:.2f} s ({args.max_new_tokens / elapsed:,.1f} tokens/s, "
          f"{cache}, linear kernel {linear_kernel_text(linear)})", file=sys.stderr)
    if how_chosen is not None:
        print(f"fastgpt: --linear auto chose {linear}: {how_chosen}", file=sys.stderr)
    return 0


def _usable_device(name: str, flag: str = "--device"):
    """The torch.device `name` names, if this torch can compute there; else one line saying why not."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{flag} {name}: not a device this torch knows ({str(e).splitlines()[0][:200]}); "
                         "use --device cpu") from None
    if device.type == "meta":
        raise ValueError(f"{flag} {name}: the meta device holds shapes but no values, so nothing can be computed, "
                         "compared or timed there; use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    try:
        torch.empty(1, device=device)
    except Exception as e:  # AssertionError, NotImplementedError, RuntimeError: a backend this build lacks
        raise ValueError(f"{flag} {name}: this torch cannot compute there ({str(e).splitlines()[0][:200]}); "
                         "use --device cpu") from None
    return device


def cmd_parity(args: argparse.Namespace) -> int:
    import torch

    from fastgpt.attention import available_backends, backend_names, get_backend
    from fastgpt.parity import ALL_SHAPES, DTYPE_NAMES, check_parity, make_qkv, shape_id

    device = _usable_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    known = backend_names()
    for name in args.backends or []:
        if name not in known:
            what = "chooses among the backends per call" if name == "auto" else "is not a backend"
            raise ValueError(f"--backends {name}: {name!r} {what}; parity checks named backends: {', '.join(known)}")
    names = args.backends or available_backends(device)
    dtype_names = args.dtypes or (["float16", "bfloat16", "float32"] if device.type == "cuda" else ["float32", "bfloat16"])
    failures = checks = 0
    print(f"parity against the float64 reference on {device}: max |error| / tolerance, per output")
    print(f"{'backend':<8} {'dtype':<9} {'shape':<24} {'out':>19} {'dq':>19} {'dk':>19} {'dv':>19}  result")
    for name in names:
        backend = get_backend(name)
        reason = backend.unavailable_reason(device)
        if reason is not None:
            print(f"{name:<8} unavailable on {device}: {reason}")
            failures += 1
            continue
        for dtype_name in dtype_names:
            dtype = DTYPE_NAMES[dtype_name]
            for shape in ALL_SHAPES:
                q, k, _ = make_qkv(shape, dtype, device)
                reason = backend.call_refusal(q, 0.0, k.shape[1])
                if reason is not None:
                    print(f"{name:<8} {dtype_name:<9} {shape_id(shape):<24} not supported: {reason}")
                    continue
                result = check_parity(name, shape, dtype, device)
                cells = " ".join(f"{result.errors[k]:>9.2e}/{result.limits[k]:<9.2e}" for k in ("out", "dq", "dk", "dv"))
                status = "ok" if result.ok else f"FAIL ({result.worst})"
                checks += 1
                failures += not result.ok
                print(f"{name:<8} {dtype_name:<9} {shape_id(shape):<24} {cells}  {status}")
    if checks == 0:
        # nothing was compared (every backend/dtype refused): that proves nothing, so it is no pass
        print(f"fastgpt parity: FAILED: no check ran ({', '.join(names)} in {', '.join(dtype_names)} on {device}); "
              "choose backends and dtypes that run here")
        return 1
    print(f"fastgpt parity: {checks} checks, {'all passed' if failures == 0 else f'{failures} failure(s)'}")
    return 1 if failures else 0


def cmd_check(args: argparse.Namespace) -> int:
    from fastgpt import compile_check
    from fastgpt.ext import cuda_compile_check
    from fastgpt.kernels import triton_compile_check

    parser = argparse.ArgumentParser(
        prog="fastgpt check",
        description="Offline compile checks (no GPU needed): every shipped Triton config "
                    "(fastgpt.kernels.triton_compile_check), then every CUDA kernel of csrc/cuda/ with nvcc "
                    "(fastgpt.ext.cuda_compile_check), for sm_80 and sm_90: registers, spills, shared memory. "
                    "A Triton config that spills is reported as dropped at run time (on a GPU the autotuner "
                    "drops a config that spills there); exit status 1 if a Triton call has no spill-free config "
                    "left, a CUDA kernel spills, or anything overflows shared memory or fails to compile.")
    compile_check.add_arch_option(parser)
    triton_compile_check.add_options(parser)  # --dtype, --head-dim, --jobs, --full: the Triton check's only
    options = parser.parse_args(args.passthrough)
    triton_status = triton_compile_check.run(options)
    print(flush=True)
    cuda_status = cuda_compile_check.run(options.arch)
    return max(triton_status, cuda_status)


# The kinds of `fastgpt bench` that read each flag of one kind only: any other kind would ignore it.
BENCH_FLAG_KINDS = {
    "--smoke": ("attention", "generate"),
    "--seq-lens": ("attention",), "--tokens": ("attention",), "--kv-heads": ("attention",),
    "--dtypes": ("attention",), "--modes": ("attention",), "--dropouts": ("attention",),
    "--reps": ("attention", "generate", "train"),
    "--dtype": ("attention", "train", "train --profile"),
    "--preset": ("generate", "train", "train --profile"),
    "--linear": ("generate",),
    "--steps": ("train", "train --profile"), "--data": ("train", "train --profile"),
    "--peak-flops": ("train",),
    "--profile": ("train",),
}


def _refuse_ignored_bench_flags(args: argparse.Namespace) -> None:
    kind = "train --profile" if args.what == "train" and args.profile else args.what
    for flag, kinds in BENCH_FLAG_KINDS.items():
        given = getattr(args, flag[2:].replace("-", "_")) not in (None, False)
        if given and kind not in kinds and not (flag == "--profile" and kind == "train --profile"):
            raise ValueError(f"{flag} applies to bench {', '.join(kinds)}; bench {kind} would ignore it: drop it")


def cmd_bench(args: argparse.Namespace) -> int:
    from fastgpt.benchmarks.common import check_backend_names
    from fastgpt.benchmarks.report import attention_markdown, prepare_out_dir, train_markdown, write_results

    # Every flag is checked, and the out-dir made and proven writable, before the work: a sweep of
    # minutes is never run only to be refused or lost at the end.
    _refuse_ignored_bench_flags(args)
    if args.device not in (None, "auto"):
        _usable_device(args.device)
    if args.what == "attention":
        from fastgpt.benchmarks.attention import AttentionSweep, run_attention_benchmark
        from fastgpt.benchmarks.plots import plot_attention

        device = args.device if args.device not in (None, "auto") else ("cuda" if torch_cuda_available() else "cpu")
        sweep = AttentionSweep.smoke(device) if args.smoke else AttentionSweep.default(device)
        for name in ("seq_lens", "dtypes", "modes", "dropouts", "backends", "reps", "tokens", "kv_heads"):
            if getattr(args, name) is not None:
                setattr(sweep, name, getattr(args, name))
        if args.dtype is not None:
            if args.dtypes is not None:
                raise ValueError(f"--dtype {args.dtype} and --dtypes {' '.join(args.dtypes)} both name the sweep's "
                                 "dtypes: give one of them")
            sweep.dtypes = [str(DTYPES[args.dtype]).removeprefix("torch.")]
        sweep.check()
        out_dir = prepare_out_dir(args.out_dir)
        result = run_attention_benchmark(sweep, progress=not args.no_progress)
        print(attention_markdown(result))
        files = write_results(result, out_dir, "attention")
        pngs = plot_attention(result, out_dir)
    elif args.what == "generate":
        from fastgpt.benchmarks.generate import generate_markdown, run_generate_benchmark
        from fastgpt.benchmarks.plots import plot_generate

        check_backend_names(args.backends, allow_auto=True)
        out_dir = prepare_out_dir(args.out_dir)
        device = {None: "cpu", "auto": "cuda" if torch_cuda_available() else "cpu"}.get(args.device, args.device)
        result = run_generate_benchmark(args.preset or "shakespeare-char", args.backends, args.reps or 3,
                                        device, args.smoke, progress=not args.no_progress,
                                        linear=args.linear)
        print(generate_markdown(result))
        files = write_results(result, out_dir, "generate")
        pngs = plot_generate(result, out_dir)
    elif args.profile:
        from fastgpt.benchmarks.train_profile import profile_markdown, run_train_profile
        from fastgpt.train import resolve_device

        if args.backends is not None and len(args.backends) != 1:
            raise ValueError(f"--profile runs one attention backend; --backends names {len(args.backends)}: "
                             f"{' '.join(args.backends)}")
        check_backend_names(args.backends, allow_auto=True)
        out_dir = prepare_out_dir(args.out_dir)
        kept = resolve_device(args.device or "auto").type == "cpu" and _keep_freed_memory(True)
        preset = args.preset or "cpu"
        result = run_train_profile(preset, args.device or "auto", max_iters=args.steps, data=args.data,
                                   dtype=args.dtype or "fp32", backend=args.backends[0] if args.backends else None)
        result["environment"]["keep_freed_memory"] = kept
        print(profile_markdown(result))
        files = write_results(result, out_dir, f"train_profile_{preset}")
        pngs = []
    else:
        from fastgpt.benchmarks.train import run_train_benchmark
        from fastgpt.train import resolve_device

        check_backend_names(args.backends, allow_auto=False)
        out_dir = prepare_out_dir(args.out_dir)
        kept = resolve_device(args.device or "auto").type == "cpu" and _keep_freed_memory(True)
        preset = args.preset or "cpu"
        result = run_train_benchmark(preset, args.device or "auto", steps=args.steps or 5, reps=args.reps or 3,
                                     backends=args.backends, data=args.data, peak_flops=args.peak_flops,
                                     progress=not args.no_progress, dtype=args.dtype or "fp32")
        result["environment"]["keep_freed_memory"] = kept
        print(train_markdown(result))
        files = write_results(result, out_dir, f"train_{preset}")
        pngs = []
    print("fastgpt bench: wrote " + ", ".join(str(p) for p in [*files.values(), *pngs]))
    return 0


def cmd_gpu_report(args: argparse.Namespace) -> int:
    from fastgpt.benchmarks.gpu_report import main as gpu_report_main

    return gpu_report_main(args)


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    _load_library()  # the presets and config fields that the flags list: torch is imported here
    parser = argparse.ArgumentParser(prog="fastgpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (a preset, overridden by flags)")
    train.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="starting configuration (default: cpu on a CPU, shakespeare-char on a GPU)")
    train.add_argument("--overwrite", action="store_true",
                       help="start a new run in an --out-dir that holds one, deleting its checkpoint and metrics")
    train.add_argument("--allow-corpus-change", action="store_true",
                       help="with --resume: continue on a corpus other than the checkpoint's (same vocabulary)")
    _add_config_flags(train)
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser("sample", help="generate text from a checkpoint")
    sample.add_argument("--out-dir", default="out", help="directory holding ckpt.pt (default: out)")
    sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sample.add_argument("--max-new-tokens", type=int, default=500)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-k", type=int, default=None)
    sample.add_argument("--seed", type=int, default=None)
    sample.add_argument("--device", default="auto")
    sample.add_argument("--attention", default=None, help="attention backend (default: the checkpoint's)")
    sample.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="keep each layer's keys and values between tokens (default: on; --no-kv-cache "
                             "re-runs the whole context for every token)")
    sample.add_argument("--linear", choices=["auto", "torch", "skinny"], default="auto",
                        help="kernel of the linear layers: 'skinny' runs the ext kernel on inputs of few rows "
                             "(the decode steps; fastgpt/linear.py), 'torch' F.linear; 'auto' (default) times "
                             "both on the model's layers at one row and takes skinny where it is clearly faster "
                             "(CPU, where the C++ extension builds), torch otherwise")
    sample.add_argument("--cache-policy", choices=["exact", "window"], default="exact",
                        help="past block_size: 'exact' re-prefills the cropped window every token (the same "
                             "text as --no-kv-cache); 'window' rebuilds from the last block_size/2 tokens "
                             "only when the cache is full (faster, approximate; see fastgpt/kv_cache.py)")
    sample.set_defaults(func=cmd_sample)

    parity = sub.add_parser("parity", help="check attention backends against the float64 reference")
    parity.add_argument("--backends", nargs="+", default=None, help="default: every backend available on the device")
    parity.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parity.add_argument("--dtypes", nargs="+", default=None, choices=["float16", "bfloat16", "float32", "float64"])
    parity.set_defaults(func=cmd_parity)

    check = sub.add_parser("check", add_help=False,
                           help="compile every shipped Triton config and every CUDA kernel for sm_80/sm_90 offline: "
                                "registers, spills, shared memory (no GPU needed; `fastgpt check --help` for its "
                                "options)")
    check.set_defaults(func=cmd_check)  # its flags, --help included, pass through to cmd_check's own parser

    bench = sub.add_parser("bench", help="benchmark the backends against eager PyTorch (tables, CSV/JSON, plots); "
                                         "generate: sampling with and without the KV cache")
    bench.add_argument("what", choices=["attention", "train", "generate"])
    bench.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    bench.add_argument("--out-dir", default="bench_results", help="where the JSON, CSV and PNGs go")
    bench.add_argument("--backends", nargs="+", default=None, help="default: every backend available")
    bench.add_argument("--reps", type=_at_least_one, default=None, help="timed repetitions per cell")
    bench.add_argument("--no-progress", action="store_true")
    bench.add_argument("--smoke", action="store_true", help="attention, generate: a tiny run, to check the harness")
    bench.add_argument("--seq-lens", type=_at_least_one, nargs="+", default=None, help="attention: the T sweep")
    bench.add_argument("--tokens", type=_at_least_one, default=None, help="attention: B·T, held constant")
    bench.add_argument("--kv-heads", type=_at_least_one, default=None,
                       help="attention: key/value heads (grouped-query; must divide the sweep's heads)")
    bench.add_argument("--dtypes", nargs="+", default=None, choices=["float16", "bfloat16", "float32"])
    bench.add_argument("--modes", nargs="+", default=None, choices=["forward", "backward", "forward+backward"])
    bench.add_argument("--dropouts", type=_probability, nargs="+", default=None)
    bench.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="train: the preset to time (default cpu); generate: its model (default shakespeare-char, "
                            "random weights)")
    bench.add_argument("--linear", nargs="+", default=None, choices=["auto", "torch", "skinny"],
                       help="generate: kernels of the linear layers (default: torch skinny; fastgpt/linear.py)")
    bench.add_argument("--steps", type=_at_least_one, default=None,
                       help="train: steps per timed repetition (default 5); with --profile, the run's iterations "
                            "(default: the preset's max_iters)")
    bench.add_argument("--profile", action="store_true",
                       help="train: profile one whole run (fastgpt train's loop) per phase: data, forward, backward, "
                            "optimizer, evaluate, checkpoint, finish, the rest of the loop; and the top ops")
    bench.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="train: the autocast dtype of the steps, as `fastgpt train --dtype` (default fp32); "
                            "attention: the one dtype of the sweep (bf16 is --dtypes bfloat16)")
    bench.add_argument("--data", default=None, help="train: corpus path")
    bench.add_argument("--peak-flops", type=_positive, default=None, help="train: the device's peak FLOP/s for MFU")
    bench.set_defaults(func=cmd_bench)

    from fastgpt.benchmarks.gpu_report import add_arguments as add_gpu_report_arguments

    gpu_report = sub.add_parser("gpu-report", help="the GPU half proven in one call: build, parity, sanitizer, "
                                                   "attention speed, training, generation, each stage within a "
                                                   "time budget; report.json/.md and plots")
    add_gpu_report_arguments(gpu_report)
    gpu_report.set_defaults(func=cmd_gpu_report)
    return parser


def _load_library() -> None:
    """The configs, and with them torch: what the parser's choices and the commands need. Bound as
    this module's globals here rather than at its top, so that main() can catch a Ctrl-C that
    arrives during the import."""
    global DTYPES, PRESETS, TrainConfig, ModelConfig
    from fastgpt.config import DTYPES, PRESETS, TrainConfig
    from fastgpt.model import ModelConfig


# Errors of the user's files and disks that one line explains (a full or read-only disk, a missing
# permission, a folder where a file belongs), wherever a command meets them.
_ONE_LINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
                              errno.ENOTDIR, errno.ENAMETOOLONG})


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    with sigterm_raises():  # SIGTERM stops a command as Ctrl-C does: its cleanups run, its writes finish
        try:
            return _main(argv)
        except KeyboardInterrupt as stop:
            # A stop before the command could say where it stood (while the library imports): one line.
            print(f"fastgpt{f' {command}' if command else ''}: {stop_text(stop)}", file=sys.stderr)
            return stop_status(stop)


def _main(argv: list[str]) -> int:
    # Our own messages (which backend 'auto' picked) at INFO; other libraries' loggers untouched.
    log = logging.getLogger("fastgpt")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fastgpt: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    # A stop during these imports waits for them to end (a second or two): raised inside them, some
    # third-party import code takes it for a failed optional import and goes on half-initialised.
    with interrupts_deferred():
        parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    if passthrough and args.command != "check":
        parser.error(f"unrecognized arguments: {' '.join(passthrough)}")
    args.passthrough = passthrough
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Bad input from the user: one clear line, not a traceback.
        print(f"fastgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _ONE_LINE_ERRNOS:
            raise  # not the user's to fix: the traceback is what a bug report needs
        where = f"{e.filename!r}: " if e.filename else ""
        print(f"fastgpt {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
