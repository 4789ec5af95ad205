"""Training on documents: a folder of text files or a JSONL file, split by document, batched padded or packed.

Where the documents come from (`--data PATH`, or $FASTGPT_DATA):
    a folder      every regular file directly inside it whose name does not start with ".", sorted
                  by name (Python's str order), each one document, read as UTF-8; subfolders and
                  hidden files (.DS_Store, editor swap files) are not documents
    a .jsonl file one JSON object per line, its "text" field (another with --text-field NAME) the
                  document; blank lines are skipped
A document shorter than 2 characters holds no (input, target) pair: it is skipped, and counted.
The vocabulary is every character of every document. The split is by document, deterministic:
n_val = round(N / 10) (at least 1) of the N documents go to val, the last of each of n_val equal
runs of the load order (every tenth document when N is a multiple of 10), the rest to train.

A document of n characters gives n - 1 (input, target) pairs, cut into pieces of at most T =
block_size pairs: piece k holds inputs k·T ... and their targets, the next characters of the same
document. Batches draw pieces uniformly at random (a function of the generator alone):

    padded (default)   each row is one piece, right-padded to T; a pad's target is -100, which
                       F.cross_entropy ignores, so padding costs compute but never changes the loss

        row 0   a a a a . . . .        targets  a a a a - - - -     (- : -100)
        row 1   b b b b b b b .                 b b b b b b b -

    packed (--pack)    each row holds pieces back to back and fills T exactly; the piece that
                       overflows a row is cut, its rest opening the next row (as a long document's
                       pieces are, it sees no context from before the cut). Attention stays inside
                       each piece (fastgpt/model/packing.py: one varlen call, positions restart per piece)

        row 0   a a a a b b b b        targets  a a a a b b b b
        row 1   b b b c c c c c                 b b b c c c c c

A packed row has no -100 at all: every target is the next character of its own document, because
a document's last character is only ever a target, never an input. (A collator that flattens
whole token streams, transformers' DataCollatorWithFlattening, spends one position per document
on a -100 target that would cross into the next document; this layout has none to spend.)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from fastgpt.model.packing import Packing
from fastgpt.run.data import CharTokenizer, resolve_corpus_path

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: a target that trains nothing
PAD_INPUT = 0  # the input id under a pad; its output is never scored and causal attention hides it from real tokens
DEFAULT_TEXT_FIELD = "text"
MIN_DOCUMENT_CHARS = 2  # one input and its target
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Document:
    name: str  # the file's name in its folder, or "line N" of a JSONL file
    text: str


def is_document_source(path: Optional[Path]) -> bool:
    """Whether `path` (resolved; None is the shipped corpus) holds documents: a folder or a .jsonl file."""
    return path is not None and (path.is_dir() or path.suffix.lower() == ".jsonl")


def load_documents(path: Path, text_field: Optional[str] = None, source: str = "--data") -> list[Document]:
    """The documents of a folder or a .jsonl file (module docstring), in load order; `source` names
    where the path came from (--data, FASTGPT_DATA) in a refusal."""
    if path.is_dir():
        if text_field is not None:
            raise ValueError(f"--text-field {text_field}: it names the text's field in a .jsonl file, and "
                             f"--data {str(path)!r} is a folder of text files; drop --text-field")
        return read_folder(path, source)
    return read_jsonl(path, text_field or DEFAULT_TEXT_FIELD)


def read_folder(folder: Path, source: str = "--data") -> list[Document]:
    """Each regular file directly in `folder` not named ".*", sorted by name, one UTF-8 document."""
    try:
        names = sorted(entry.name for entry in os.scandir(folder)
                       if not entry.name.startswith(".") and entry.is_file())
    except OSError as e:
        raise ValueError(f"corpus {str(folder)!r} is a directory (from {source}) that cannot be listed "
                         f"({e.strerror})") from None
    if not names:
        raise ValueError(f"corpus {str(folder)!r} is a directory (from {source}) with no documents: no regular file "
                         "whose name does not start with '.'; put one UTF-8 text file per document in it, or pass "
                         "a text file")
    return [Document(name, _read_utf8(folder / name)) for name in names]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"document file {str(path)!r} is not UTF-8 text ({e}); every file in the folder is "
                         "read as a document") from None
    except OSError as e:
        raise ValueError(f"document file {str(path)!r} cannot be read ({e.strerror})") from None


def read_jsonl(path: Path, text_field: str = DEFAULT_TEXT_FIELD) -> list[Document]:
    """One document per non-blank line: a JSON object whose `text_field` is a string."""
    documents = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                text = _jsonl_text(path, number, raw, text_field)
                if text is not None:
                    documents.append(Document(f"line {number}", text))
    except OSError as e:
        raise ValueError(f"documents file {str(path)!r} cannot be read ({e.strerror})") from None
    if not documents:
        raise ValueError(f"documents file {str(path)!r} holds no documents: no line that is not blank")
    return documents


def _jsonl_text(path: Path, number: int, raw: bytes, field: str) -> Optional[str]:
    """The document of line `number` (None for a blank line), or a ValueError naming the line."""
    where = f"documents file {str(path)!r} line {number}"
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text ({e})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not JSON ({e.msg}, column {e.colno}): {line.strip()[:60]!r}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object with a {field!r} field")
    if field not in record:
        fields = ", ".join(map(repr, list(record)[:8])) or "none"
        raise ValueError(f"{where} has no {field!r} field (its fields: {fields}); name the text's field with "
                         "--text-field NAME")
    if not isinstance(record[field], str):
        raise ValueError(f"{where}: {field!r} is a JSON {type(record[field]).__name__}, not a string")
    return record[field]


def split_by_document(count: int) -> tuple[list[int], list[int]]:
    """(train, val) document indices: val the last of each of n_val = round(count / 10) (at least
    1) equal runs of the load order; deterministic, no seed. count >= 2."""
    if count < 2:
        raise ValueError(f"the split by document needs at least 2 documents (one train, one val); got {count}")
    n_val = max(1, round(count * VAL_FRACTION))
    val = [(k + 1) * count // n_val - 1 for k in range(n_val)]
    chosen = set(val)
    return [i for i in range(count) if i not in chosen], val


class DocumentBatch(NamedTuple):
    x: torch.Tensor  # (B, T) int64 inputs
    y: torch.Tensor  # (B, T) int64 targets, IGNORE_INDEX where a position trains nothing (a pad)
    packing: Optional[Packing]  # packed rows: the pieces' edges and positions; None for padded rows
    real_tokens: int  # targets that train: (y != IGNORE_INDEX).sum()


class DocumentSplit:
    """One split's documents as one token stream, and their pieces for a block size."""

    def __init__(self, encoded: list[list[int]]):
        self.lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)  # (N,)
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)[:-1]])  # (N,)
        self.tokens = torch.tensor([t for ids in encoded for t in ids], dtype=torch.long)  # (sum of lengths,)
        self._pieces: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def documents(self) -> int:
        return self.lengths.numel()

    def pieces(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, length) (P,) each: piece p's inputs are tokens[start : start + length], its
        targets the tokens one further; length <= T, and the targets never leave the document."""
        if T not in self._pieces:
            pairs = self.lengths - 1  # (N,) pairs per document
            per_doc = (pairs + T - 1) // T  # pieces per document
            doc = torch.repeat_interleave(torch.arange(self.documents), per_doc)  # (P,)
            first = torch.cumsum(per_doc, 0) - per_doc  # each document's first piece
            k = torch.arange(doc.numel()) - first[doc]  # the piece's rank within its document
            offset = k * T
            self._pieces[T] = (self.starts[doc] + offset, torch.clamp(pairs[doc] - offset, max=T))
        return self._pieces[T]

    def padded_batch(self, B: int, T: int, generator: torch.Generator) -> DocumentBatch:
        """B random pieces, one per row, right-padded to T."""
        starts, lengths = self.pieces(T)
        chosen = torch.randint(starts.numel(), (B,), generator=generator)
        start, length = starts[chosen], lengths[chosen]  # (B,)
        offsets = torch.arange(T)
        real = offsets < length[:, None]  # (B, T)
        index = torch.where(real, start[:, None] + offsets, 0)  # a pad reads token 0, then is overwritten
        x = torch.where(real, self.tokens[index], PAD_INPUT)
        y = torch.where(real, self.tokens[index + 1], IGNORE_INDEX)
        return DocumentBatch(x, y, None, int(length.sum()))

    def packed_batch(self, B: int, T: int, generator: torch.Generator) -> DocumentBatch:
        """Rows of T positions filled with random pieces back to back (module docstring)."""
        segment_start, row_lengths = self._pack(B, T, generator)
        segment_length = torch.tensor([n for row in row_lengths for n in row], dtype=torch.long)  # (S,)
        destination = torch.cumsum(segment_length, 0) - segment_length  # where each segment begins in the B·T
        shift = torch.repeat_interleave(segment_start - destination, segment_length)  # (B·T,)
        index = torch.arange(B * T) + shift  # the stream position of each packed position
        x, y = self.tokens[index].view(B, T), self.tokens[index + 1].view(B, T)
        return DocumentBatch(x, y, Packing.from_lengths(row_lengths, T), B * T)

    def _pack(self, B: int, T: int, generator: torch.Generator) -> tuple[torch.Tensor, list[list[int]]]:
        """Segments' stream starts (S,) and each row's segment lengths: pieces drawn B at a time
        until the B rows are full, the one that overflows a row cut and continued in the next."""
        starts, lengths = self.pieces(T)
        segment_start, row_lengths = [], [[] for _ in range(B)]
        row, room = 0, T
        while row < B:
            drawn = torch.randint(starts.numel(), (B,), generator=generator)
            for start, length in zip(starts[drawn].tolist(), lengths[drawn].tolist()):
                while length > 0 and row < B:
                    take = min(length, room)
                    segment_start.append(start)
                    row_lengths[row].append(take)
                    start, length, room = start + take, length - take, room - take
                    if room == 0:
                        row, room = row + 1, T
                if row == B:
                    break
        return torch.tensor(segment_start, dtype=torch.long), row_lengths


class DocumentDataset:
    """Documents split 90/10 by document, and batches of them, padded or packed (module docstring).
    Takes the place of CharDataset in the trainer: tokenizer, fingerprint, check_block_size, get_batch."""

    def __init__(self, documents: list[Document], pack: bool = False, source: str = "documents"):
        usable = [d for d in documents if len(d.text) >= MIN_DOCUMENT_CHARS]
        self.skipped = len(documents) - len(usable)
        if len(usable) < 2:
            raise ValueError(f"{source}: {len(usable)} document(s) of at least {MIN_DOCUMENT_CHARS} characters "
                             f"(of {len(documents)}); the split by document needs at least 2")
        self.tokenizer = CharTokenizer("".join(d.text for d in usable))
        train, val = split_by_document(len(usable))
        self.train = DocumentSplit([self.tokenizer.encode(usable[i].text) for i in train])
        self.val = DocumentSplit([self.tokenizer.encode(usable[i].text) for i in val])
        self.pack = pack
        self.source = source

    @classmethod
    def load(cls, path: Path, pack: bool = False, text_field: Optional[str] = None,
             source: str = "--data") -> "DocumentDataset":
        kind = "folder" if path.is_dir() else "JSONL file"
        return cls(load_documents(path, text_field, source), pack, f"{kind} {str(path)!r}")

    def fingerprint(self) -> str:
        """A hash of the vocabulary and each split's tokens and document lengths."""
        digest = hashlib.sha256(b"documents\0" + self.tokenizer.chars.encode("utf-8"))
        for split in (self.train, self.val):
            digest.update(split.documents.to_bytes(8, "little"))
            digest.update(split.lengths.numpy().tobytes())
            digest.update(split.tokens.numpy().tobytes())
        return digest.hexdigest()

    def check_block_size(self, block_size: int) -> None:
        """Any block size fits: a document longer than it is cut into pieces."""

    @property
    def mode(self) -> str:
        return "packed" if self.pack else "padded"

    def describe(self) -> str:
        skipped = f", {self.skipped} shorter than {MIN_DOCUMENT_CHARS} characters skipped" if self.skipped else ""
        how = ("packed (--pack): each row whole documents back to back, attention within each"
               if self.pack else "padded: one document (or piece of a long one) per row, pads ignored by the loss")
        return (f"fastgpt: documents from {self.source}: {self.train.documents:,} train, {self.val.documents:,} val"
                f"{skipped}; batches {how}")

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                  device: torch.device | str = "cpu") -> DocumentBatch:
        """A batch of `split` (B = batch_size rows of T = block_size), padded or packed, on `device`."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
        data = self.train if split == "train" else self.val
        make = data.packed_batch if self.pack else data.padded_batch
        return batch_to(make(batch_size, block_size, generator), device)


def batch_to(batch: DocumentBatch, device: torch.device | str) -> DocumentBatch:
    device = torch.device(device)
    if device.type == "cpu":
        return batch
    packing = batch.packing
    if packing is not None:
        packing = Packing(packing.cu_seqlens.to(device), packing.positions.to(device), packing.max_len)
    # pinned memory + non_blocking lets the copy overlap with the previous step's compute
    x, y = (t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
            for t in (batch.x, batch.y))
    return DocumentBatch(x, y, packing, batch.real_tokens)


def batch_loss(model, batch) -> torch.Tensor:
    """The loss of a batch: an (x, y) pair of windows of one text, or a DocumentBatch, whose packed
    rows pass their Packing to the model."""
    if isinstance(batch, DocumentBatch) and batch.packing is not None:
        return model(batch.x, batch.y, packing=batch.packing)[1]
    return model(batch[0], batch[1])[1]


def load_training_data(data: Optional[str], pack: bool = False, text_field: Optional[str] = None):
    """The trainer's dataset: a DocumentDataset for a folder or a .jsonl file, else the CharDataset
    of one text (`data`, $FASTGPT_DATA, or the shipped corpus), which --pack and --text-field refuse."""
    from fastgpt.run.data import CharDataset

    path = resolve_corpus_path(data, folders=True)
    if is_document_source(path):
        return DocumentDataset.load(path, pack, text_field, "--data" if data is not None else "FASTGPT_DATA")
    what = f"--data {str(path)!r} is one text file" if path is not None else "the shipped corpus (no --data) is one text"
    if pack:
        raise ValueError(f"--pack packs documents into rows, and {what}, one document: pass a folder of text files "
                         "or a .jsonl file of documents, or drop --pack")
    if text_field is not None:
        raise ValueError(f"--text-field {text_field}: it names the text's field in a .jsonl file of documents, and "
                         f"{what}; drop --text-field")
    return CharDataset.load(path)


def packed_attention_call(T: int, n_head: int, n_kv_head: Optional[int], head_dim: int, device: torch.device,
                          dtype: torch.dtype, dropout_p: float, options: dict):
    """The varlen AttentionCall that packed rows of T tokens make (one probe row of one document):
    the call the registry chooses a kernel path for, and a backend without varlen refuses."""
    from fastgpt.attention.varlen import varlen_call

    q = torch.empty(T, n_head, head_dim, device=device, dtype=dtype)  # (total, H, D)
    kv = torch.empty(T, n_kv_head or n_head, head_dim, device=device, dtype=dtype)  # (total, H_kv, D)
    cu_seqlens = torch.tensor([0, T], dtype=torch.int32, device=device)
    return varlen_call(q, kv, kv, cu_seqlens, cu_seqlens, dropout_p=dropout_p, **options)


def check_model_takes_packing(dataset, model_name: str) -> None:
    """--pack needs attention to keep inside each document: the bigram model has none to take it."""
    if isinstance(dataset, DocumentDataset) and dataset.pack and model_name != "gpt":
        raise ValueError(f"--pack keeps each document's attention inside it, and model {model_name!r} has no "
                         "attention to take the packing; drop --pack (padded documents train any model)")
