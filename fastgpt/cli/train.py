"""`fastgpt train`: a preset, overridden by one flag per ModelConfig/TrainConfig field.

Building this command's parser imports the configs (and with them torch) for the presets and the
fields it lists; `run` imports the trainer. Nothing here loads the benchmarks or the GPU report.
"""

from __future__ import annotations

import argparse
import sys

from fastgpt.cli.args import add_config_flags, config_overrides
from fastgpt.run.atomic_file import interrupts_deferred, stop_status, stop_text

NAME = "train"
HELP = "train a model (a preset, overridden by flags)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    from fastgpt.run.config import PRESETS

    parser = subparsers.add_parser(NAME, help=HELP)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="starting configuration (default: cpu on a CPU, shakespeare-char on a GPU)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --out-dir that holds one, deleting its checkpoint and metrics")
    parser.add_argument("--allow-corpus-change", action="store_true",
                        help="with --resume: continue on a corpus other than the checkpoint's (same vocabulary)")
    add_config_flags(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    with interrupts_deferred():  # a Ctrl-C during the imports waits for them (fastgpt/cli/__init__.py says why)
        from fastgpt.run import distributed
        from fastgpt.run.config import make_configs
        from fastgpt.run.trainer import Trainer

    overrides = config_overrides(args)
    resume = overrides.pop("resume", False)
    _refuse_conflicting_flags(args, resume)
    trainer = None
    try:  # under torchrun the Trainer joins the process group; leave it on every way out
        if resume:
            trainer = Trainer.resume(overrides.pop("out_dir", "out"), overrides,
                                     allow_corpus_change=args.allow_corpus_change)
            _refuse_nothing_to_train(trainer, "max_iters" in overrides)
            if trainer.is_main:
                print(f"fastgpt: resuming at iteration {trainer.iter} of {trainer.train_config.max_iters}")
        else:
            trainer = Trainer(*make_configs(args.preset or _default_preset(overrides), overrides))
        if trainer.device.type == "cpu":
            keep_freed_memory(trainer.is_main)
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


def _refuse_conflicting_flags(args: argparse.Namespace, resume: bool) -> None:
    if resume and args.preset is not None:
        raise ValueError("--preset applies to a new run: a resumed run keeps its checkpoint's settings (change one "
                         "with its own flag, e.g. --max-iters)")
    if resume and args.overwrite:
        raise ValueError("--resume continues the run in --out-dir and --overwrite starts it over: choose one")
    if args.allow_corpus_change and not resume:
        raise ValueError("--allow-corpus-change applies only with --resume")


def _default_preset(overrides: dict) -> str:
    from fastgpt.run import distributed
    from fastgpt.run.trainer import resolve_device

    # The lecture's preset needs a GPU; on a CPU the nanoGPT CPU run is the sensible default.
    preset = "shakespeare-char" if resolve_device(overrides.get("device", "auto")).type == "cuda" else "cpu"
    if distributed.is_main():
        print(f"fastgpt: preset {preset!r} (the default on this device; choose with --preset)")
    return preset


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


def keep_freed_memory(say: bool) -> bool:
    """A CPU training run's process keeps freed memory for reuse (fastgpt/run/host_memory.py); whether it does."""
    from fastgpt.run import host_memory

    note = host_memory.keep_freed_memory()
    if note and say:
        print(note)
    return note is not None
