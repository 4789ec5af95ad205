"""What several commands' flags share: argparse types, the config fields as flags, the --device check.

Importing this module loads no torch: the config classes and torch load inside the functions that
need them, when a command's own parser is built or its flags are checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def at_least_one(text: str) -> int:
    """argparse type: an integer >= 1 (a count of repetitions, steps, tokens or a length)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {value}")
    return value


def probability(text: str) -> float:
    """argparse type: a dropout probability in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1); got {value}")
    return value


def positive(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {value}")
    return value


def _config_classes() -> tuple[type, type]:
    from fastgpt.model.gpt import ModelConfig
    from fastgpt.run.config import TrainConfig

    return ModelConfig, TrainConfig


def _flag_type(annotation) -> Any:
    if typing.get_origin(annotation) is typing.Union:  # Optional[X] -> X
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


# Flags whose config field was renamed: the former flag still sets the field, unlisted in --help,
# so command lines written before the rename still run.
FORMER_FLAGS = {"backend": "--attention", "dropout_p": "--dropout"}


# What a flag's name alone does not say: the forms of --data and the batching of documents.
FIELD_HELP = {
    "data": "the corpus: one UTF-8 text file; a folder of text files (each regular file not named '.*', "
            "sorted by name, one document); or a .jsonl file (one JSON object per line, its \"text\" field "
            "the document). Default: $FASTGPT_DATA, else tiny-shakespeare as shipped",
    "pack": "documents only: pack each batch row with whole documents back to back, filling block_size "
            "exactly, attention kept inside each document (one varlen call). Default (--no-pack): one "
            "document (or a block_size piece of a long one) per row, right-padded, the pads ignored by the loss",
    "text_field": "the field of each .jsonl line that holds its document (default: text)",
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ModelConfig and TrainConfig field (n_layer -> --n-layer), default None: not given."""
    for cls in _config_classes():
        group = parser.add_argument_group(f"{cls.__name__} fields (override the preset)")
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            flag = "--" + field.name.replace("_", "-")
            kind = _flag_type(hints[field.name])
            help_text = FIELD_HELP.get(field.name)
            if kind is bool:
                group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                   help=help_text)
                continue
            group.add_argument(flag, dest=field.name, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=help_text)
            if field.name in FORMER_FLAGS:
                group.add_argument(FORMER_FLAGS[field.name], dest=field.name, type=kind, default=None,
                                   help=argparse.SUPPRESS)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line, by field name."""
    names = {f.name for cls in _config_classes() for f in dataclasses.fields(cls)}
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def usable_device(name: str, flag: str = "--device"):
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
