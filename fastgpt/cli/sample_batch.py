"""`fastgpt sample --prompts FILE`: every line of FILE continued, in one batch over the paged KV cache.

The prompts are FILE's lines (UTF-8, the line ending removed, other whitespace kept as it is: a
character model reads spaces too); empty lines are skipped, and the remaining prompts are numbered
from 0 in file order. Prompt i samples with its own generator seeded --seed + i
(fastgpt/model/batched.py), so it gives the tokens that `fastgpt sample --prompt LINE --seed
SEED+i` gives, whatever else is in the file and whatever --batch-size.

What a person reads: sixteen texts growing token by token at once would interleave into noise, so
each sequence is printed whole, with its index, as soon as it finishes (sequences finish at
different times; stdout holds only the texts):

    ==> [2] line 3, 57 new tokens, stop
    ROMEO: ... (the prompt and its continuation, the --stop string left out)

while stderr shows the progress (on a terminal, one line rewritten in place), then the speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastgpt.run.atomic_file import interrupts_deferred

DEFAULT_BATCH_SIZE = 16
DEFAULT_PAGE_SIZE = 16


def read_prompts(path: str) -> list[tuple[int, str]]:
    """[(line number from 1, prompt)] of the file's non-empty lines, or a one-line error."""
    file = Path(path)
    if not file.exists():
        raise ValueError(f"--prompts {path!r}: no such file")
    if not file.is_file():
        raise ValueError(f"--prompts {path!r} is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ValueError(f"--prompts {path!r} cannot be read: {e.strerror or e}") from None
    prompts = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line]
    if not prompts:
        raise ValueError(f"--prompts {path!r} holds no prompt: every line is empty (one prompt per line)")
    return prompts


def _encode_all(tokenizer, prompts: list[tuple[int, str]], block_size: int) -> list[list[int]]:
    encoded = []
    for i, (line, prompt) in enumerate(prompts):
        try:
            ids = tokenizer.encode(prompt)
        except ValueError as e:
            raise ValueError(f"prompt {i} (line {line}): {e}") from None
        if len(ids) > block_size - 1:
            raise ValueError(f"prompt {i} (line {line}) has {len(ids)} characters; the model's block_size {block_size} "
                             f"leaves room for prompts of at most {block_size - 1}")
        encoded.append(ids)
    return encoded


def _check_flags(args: argparse.Namespace) -> tuple[int, int]:
    """(batch size, page size), or a one-line error for a flag that --prompts cannot use."""
    from fastgpt.attention.paged import check_page_size

    if args.prompt is not None:
        raise ValueError("--prompt and --prompts both give prompts: put the prompt in the file, or drop --prompts")
    if not args.kv_cache:
        raise ValueError("--prompts generates over the paged KV cache; --no-kv-cache applies to one --prompt only")
    if args.cache_policy != "exact":
        raise ValueError(f"--cache-policy {args.cache_policy} applies to one --prompt only: with --prompts a "
                         "sequence stops when it fills block_size")
    batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    page_size = DEFAULT_PAGE_SIZE if args.page_size is None else args.page_size
    check_page_size(page_size, "--page-size")
    if args.stop == "":
        raise ValueError("--stop is empty: give the string that ends a sequence, or drop the flag")
    return batch_size, page_size


def run_prompts(args: argparse.Namespace, load_model) -> int:
    batch_size, page_size = _check_flags(args)
    prompts = read_prompts(args.prompts)
    with interrupts_deferred():
        import time

        from fastgpt.model.batched import generate_batched, page_pool_for
        from fastgpt.model.linear import linear_kernel_text
        from fastgpt.run.data import CharTokenizer

    model, device, vocab, linear, how_chosen = load_model(args)
    if not hasattr(model, "make_page_pool"):
        raise ValueError(f"--prompts needs a GPT checkpoint (attention over a paged KV cache); this one is "
                         f"{model.config.model}: use --prompt")
    tokenizer = CharTokenizer(vocab)
    encoded = _encode_all(tokenizer, prompts, model.config.block_size)
    stop = None if args.stop is None else _encode_stop(tokenizer, args.stop)
    pool = page_pool_for(model, encoded, args.max_new_tokens, batch_size, page_size)
    events = generate_batched(model, encoded, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              seed=args.seed, batch_size=batch_size, stop=stop, pool=pool)
    start = time.perf_counter()
    total, shared = _print_as_finished(events, prompts, tokenizer, len(stop or []), pool)
    elapsed = time.perf_counter() - start
    print(f"fastgpt: {len(prompts)} prompts, {total} new tokens in {elapsed:.2f} s ({total / elapsed:,.1f} tokens/s; "
          f"paged KV cache, page size {page_size}, batch size {batch_size}, {pool.num_pages} pages of which "
          f"{shared} held shared prompt prefixes at most; linear kernel {linear_kernel_text(linear)})",
          file=sys.stderr)
    if how_chosen is not None:
        print(f"fastgpt: --linear auto chose {linear}: {how_chosen}", file=sys.stderr)
    return 0


def _encode_stop(tokenizer, stop: str) -> list[int]:
    try:
        return tokenizer.encode(stop)
    except ValueError as e:
        raise ValueError(f"--stop: {e}") from None


def _print_as_finished(events, prompts: list[tuple[int, str]], tokenizer, stop_len: int, pool) -> tuple[int, int]:
    """Prints each sequence whole when it finishes, progress to a terminal's stderr -> (new tokens
    in all, the most pages shared at once)."""
    new: dict[int, list[int]] = {}
    finished = total = shared = 0
    progress = sys.stderr.isatty()
    for event in events:
        tokens = new.setdefault(event.index, [])
        if event.token is not None:
            tokens.append(event.token)
            total += 1
        shared = max(shared, pool.shared_pages())
        if event.finished is not None:
            finished += 1
            line, prompt = prompts[event.index]
            text = tokenizer.decode(tokens[:len(tokens) - stop_len] if event.finished == "stop" else tokens)
            if progress:
                print("\r\033[K", end="", file=sys.stderr, flush=True)
            print(f"==> [{event.index}] line {line}, {len(tokens)} new tokens, {event.finished}\n{prompt}{text}",
                  flush=True)
            del new[event.index]
        if progress:
            print(f"\rfastgpt: {finished}/{len(prompts)} finished, {len(new)} running, {total} new tokens",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return total, shared
