"""The corpus, the character tokenizer and batches of training windows.

Where the text comes from, first match wins:
    1. an explicit path (`--data PATH`),
    2. the FASTGPT_DATA environment variable,
    3. tiny-shakespeare as shipped inside the package (bz2-compressed, public domain), so that
       `fastgpt train` needs no file and no network.
Any UTF-8 text file works as a corpus; its vocabulary is the set of characters it contains. A
folder of text files or a .jsonl file is a corpus of documents instead (fastgpt/run/documents.py).
"""

from __future__ import annotations

import bz2
import hashlib
import os
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import torch

# Karpathy's char-rnn copy of tiny-shakespeare (1,115,394 characters), compressed into the package.
PACKAGED_CORPUS = "corpus/tinyshakespeare.txt.bz2"
TRAIN_FRACTION = 0.9  # the lecture's split: first 90% train, last 10% val


def resolve_corpus_path(path: Optional[str | os.PathLike] = None, folders: bool = False) -> Optional[Path]:
    """The corpus file to read (`path`, else $FASTGPT_DATA), or None for the packaged tiny-shakespeare.
    With `folders`, a folder is returned too (a folder of documents: fastgpt/run/documents.py)."""
    source = "--data" if path is not None else "FASTGPT_DATA"
    if path is None:
        path = os.environ.get("FASTGPT_DATA") or None
    if path is None:
        return None
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"corpus file {str(path)!r} does not exist (from {source})") from None
    except OSError as e:  # a folder on the way that cannot be entered, a symlink loop, a file used as a folder
        raise ValueError(f"corpus {str(path)!r} cannot be reached ({e.strerror}) (from {source})") from None
    if stat.S_ISDIR(mode) and folders:
        return path
    if stat.S_ISDIR(mode):
        raise ValueError(f"corpus {str(path)!r} is a directory (from {source}); pass a UTF-8 text file")
    if not stat.S_ISREG(mode):
        # /dev/null reads as empty, a FIFO blocks until a writer comes: neither is a corpus
        raise ValueError(f"corpus {str(path)!r} is {_file_kind(mode)}, not a regular file (from {source}); "
                         "pass a UTF-8 text file")
    return path


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "a special file")


def packaged_corpus() -> str:
    """tiny-shakespeare, from the compressed copy inside the package."""
    return bz2.decompress(resources.files("fastgpt.run").joinpath(PACKAGED_CORPUS).read_bytes()).decode("utf-8")


def read_corpus(path: Optional[str | os.PathLike] = None, min_chars: int = 2) -> str:
    """The corpus text; refuses files that are missing, not UTF-8, or shorter than `min_chars`."""
    path = resolve_corpus_path(path)
    if path is None:
        return packaged_corpus()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text ({e})") from None
    except OSError as e:  # EACCES for a user the file's mode shuts out, EIO from a failing disk
        raise ValueError(f"corpus file {str(path)!r} cannot be read ({e.strerror}); pass a file you can read") from None
    if not text:
        raise ValueError(f"corpus file {str(path)!r} is empty: it has 0 characters; at least {min_chars} are needed")
    if len(text) < min_chars:
        raise ValueError(f"corpus file {str(path)!r} has {len(text)} characters; at least {min_chars} are needed")
    return text


class CharTokenizer:
    """Maps each character of the vocabulary to an integer id (stoi) and back (itos)."""

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.itos = {i: ch for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> list[int]:
        unknown = sorted(set(s) - self.stoi.keys())
        if unknown:
            shown = "".join(unknown[:20])
            raise ValueError(
                f"text contains {len(unknown)} character(s) not in the model's vocabulary: {shown!r}; "
                f"use only these {self.vocab_size} characters: {self.chars!r}"
            )
        return [self.stoi[c] for c in s]

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)


@dataclass
class CharDataset:
    """The encoded corpus split 90/10 into train and val, and random windows drawn from it."""

    tokenizer: CharTokenizer
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64

    @classmethod
    def from_text(cls, text: str) -> "CharDataset":
        tokenizer = CharTokenizer.from_text(text)
        data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        n = int(TRAIN_FRACTION * len(data))
        return cls(tokenizer, data[:n], data[n:])

    @classmethod
    def load(cls, path: Optional[str | os.PathLike] = None) -> "CharDataset":
        return cls.from_text(read_corpus(path))

    def fingerprint(self) -> str:
        """A hash of the encoded corpus, its split and its vocabulary: two corpora that share a
        vocabulary still differ here. Independent of the dtype the token ids are stored in."""
        digest = hashlib.sha256(self.tokenizer.chars.encode("utf-8"))
        for split in (self.train, self.val):
            digest.update(len(split).to_bytes(8, "little"))
            digest.update(split.to(torch.int64).numpy().tobytes())
        return digest.hexdigest()

    def check_block_size(self, block_size: int) -> None:
        """Both splits must hold at least one window of block_size + 1 tokens (input + target)."""
        for name, split in (("train", self.train), ("val", self.val)):
            if len(split) < block_size + 1:
                raise ValueError(
                    f"the corpus's {name} split has {len(split)} characters, fewer than block_size + 1 = "
                    f"{block_size + 1}: use a longer corpus or a smaller --block-size"
                )

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` random windows: x (B, T) and the targets y (B, T), y shifted by one."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
        data = self.train if split == "train" else self.val
        if len(data) < block_size + 1:
            self.check_block_size(block_size)
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        offsets = torch.arange(block_size + 1)
        windows = data[starts[:, None] + offsets]  # (B, T + 1): one gather, no Python loop
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        if torch.device(device).type == "cuda":
            # pinned memory + non_blocking lets the copy overlap with the previous step's compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)
