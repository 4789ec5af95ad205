"""`fastgpt sample`: text from a checkpoint, streamed to stdout; the speed goes to stderr.

With `--prompts FILE` (one prompt per line), every prompt is generated in one batch over the paged
KV cache: fastgpt/cli/sample_batch.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastgpt.run.atomic_file import interrupts_deferred

NAME = "sample"
HELP = "generate text from a checkpoint"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(NAME, help=HELP)
    parser.add_argument("--out-dir", default="out", help="directory holding ckpt.pt (default: out)")
    parser.add_argument("--prompt", default=None, help="text to continue (default: a newline)")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="generate for every line of FILE (UTF-8, one prompt per line; empty lines are skipped) "
                             "in one batch over the paged KV cache; each sequence is printed whole, with its index, "
                             "as soon as it finishes")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="--prompts: the most sequences generated at once (default 16); a finished one's place "
                             "and pages go to the next waiting prompt")
    parser.add_argument("--page-size", type=int, default=None,
                        help="--prompts: positions per page of the KV cache, a multiple of 16 from 16 to 4096 "
                             "(default 16)")
    parser.add_argument("--stop", default=None,
                        help="--prompts: a sequence ends when its new text ends with this string (not printed)")
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default=None,
                        help="attention backend or kernel path (default: the checkpoint's)")
    # the flag's former name, so command lines written before the rename still run
    parser.add_argument("--attention", dest="backend", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="keep each layer's keys and values between tokens (default: on; --no-kv-cache "
                             "re-runs the whole context for every token)")
    parser.add_argument("--linear", choices=["auto", "torch", "skinny"], default="auto",
                        help="kernel of the linear layers: 'skinny' runs the ext kernel on inputs of few rows "
                             "(the decode steps; fastgpt/model/linear.py), 'torch' F.linear; 'auto' (default) times "
                             "both on the model's layers at one row and takes skinny where it is clearly faster "
                             "(CPU, where the C++ extension builds), torch otherwise")
    parser.add_argument("--cache-policy", choices=["exact", "window"], default="exact",
                        help="past block_size: 'exact' re-prefills the cropped window every token (the same "
                             "text as --no-kv-cache); 'window' rebuilds from the last block_size/2 tokens "
                             "only when the cache is full (faster, approximate; see fastgpt/model/kv_cache.py)")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.prompts is not None:
        from fastgpt.cli.sample_batch import run_prompts

        return run_prompts(args, _load_model)
    for flag in ("batch_size", "page_size", "stop"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} applies to --prompts FILE only; one --prompt would ignore it")
    if args.prompt is None:
        args.prompt = "\n"
    with interrupts_deferred():  # a Ctrl-C during the imports waits for them (fastgpt/cli/__init__.py says why)
        import time

        import torch

        from fastgpt.model.linear import linear_kernel_text
        from fastgpt.run.data import CharTokenizer

    model, device, vocab, linear, how_chosen = _load_model(args)
    tokenizer = CharTokenizer(vocab)
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


def _load_model(args: argparse.Namespace):
    """The checkpoint's model with --backend and --linear applied; the device it is on, its
    vocabulary, the linear kernel and why --linear auto chose it (None when it was not auto)."""
    with interrupts_deferred():
        from fastgpt.model.gpt import ModelConfig, build_model
        from fastgpt.model.linear import resolve_linear_kernel
        from fastgpt.run.checkpoint import CHECKPOINT_NAME, load_checkpoint
        from fastgpt.run.trainer import resolve_device

    device = resolve_device(args.device)
    state = load_checkpoint(Path(args.out_dir) / CHECKPOINT_NAME, map_location=device)
    config = ModelConfig(**state["model_config"])
    if args.backend is not None:
        config.backend = args.backend
    model = build_model(config).to(device)
    model.load_state_dict(state["model"])
    linear, how_chosen = resolve_linear_kernel(args.linear, model)
    model.set_linear_kernel(linear)
    return model, device, state["vocab"], linear, how_chosen
