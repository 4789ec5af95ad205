"""Documents as a corpus (fastgpt/run/documents.py): loading a folder or a JSONL file, refusing bad
input in one line, the split by document, and padded and packed batches."""

import json

import pytest
import torch

from fastgpt.run.data import CharDataset
from fastgpt.run.documents import (IGNORE_INDEX, Document, DocumentDataset, DocumentSplit, load_documents,
                                   load_training_data, split_by_document)

TEXTS = ["To be, or not to be", "ay", "that is the question:\nWhether 'tis nobler", "x", "", "in the mind"]


def write_folder(folder, texts):
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


# -- loading -----------------------------------------------------------------------------------

def test_a_folder_is_its_regular_files_sorted_by_name_hidden_files_and_subfolders_left_out(tmp_path):
    folder = write_folder(tmp_path / "docs", ["first", "second"])
    (folder / "a_last_but_sorted_first.txt").write_text("zero")
    (folder / ".DS_Store").write_bytes(b"\x00\x01\xff")  # not UTF-8: it would be refused if it were read
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.txt").write_text("not a document")
    docs = load_documents(folder)
    assert [(d.name, d.text) for d in docs] == [("a_last_but_sorted_first.txt", "zero"), ("doc00.txt", "first"),
                                                ("doc01.txt", "second")]


def test_a_jsonl_file_is_one_document_per_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two\\nlines", "source": "x"}\n', encoding="utf-8")
    assert [(d.name, d.text) for d in load_documents(path)] == [("line 1", "one"), ("line 3", "two\nlines")]


def test_another_field_is_named_with_text_field(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["alpha", "beta"], field="content")
    assert [d.text for d in load_documents(path, "content")] == ["alpha", "beta"]
    with pytest.raises(ValueError, match=r"line 1 has no 'text' field \(its fields: 'id', 'content'\); name the "
                                         r"text's field with --text-field NAME"):
        load_documents(path)


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": "cut'], r"line 2 is not JSON \(Unterminated string"),
    (['{"text": "ok"}', '["a list"]'], r"line 2 is a JSON list, not an object with a 'text' field"),
    (['{"text": 7}'], r"line 1: 'text' is a JSON int, not a string"),
    (['', '  '], r"holds no documents: no line that is not blank"),
])
def test_a_bad_jsonl_line_is_refused_in_one_line_naming_it(tmp_path, lines, message):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as refused:
        load_documents(path)
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)


def test_a_jsonl_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"line 2 is not UTF-8 text"):
        load_documents(path)


def test_an_empty_folder_and_an_undecodable_file_are_refused_naming_them(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".hidden").write_text("not counted")
    with pytest.raises(ValueError, match=f"corpus '{empty}' is a directory \\(from --data\\) with no documents: no "
                                         "regular file whose name does not start with '.'"):
        load_documents(empty)
    folder = write_folder(tmp_path / "docs", ["fine"])
    (folder / "doc01.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=f"document file '{folder / 'doc01.txt'}' is not UTF-8 text"):
        load_documents(folder)


def test_text_field_with_a_folder_or_a_text_file_and_pack_with_one_text_are_refused(tmp_path, small_corpus):
    folder = write_folder(tmp_path / "docs", ["one", "two"])
    with pytest.raises(ValueError, match="--text-field body: .* is a folder of text files; drop --text-field"):
        load_training_data(str(folder), text_field="body")
    with pytest.raises(ValueError, match="--text-field body: .* is one text file; drop --text-field"):
        load_training_data(str(small_corpus), text_field="body")
    with pytest.raises(ValueError, match=r"--pack packs documents into rows, and --data '.*small.txt' is one text "
                                         "file, one document: pass a folder"):
        load_training_data(str(small_corpus), pack=True)
    with pytest.raises(ValueError, match=r"the shipped corpus \(no --data\) is one text"):
        load_training_data(None, pack=True)


def test_load_training_data_picks_the_dataset_by_what_data_is(tmp_path, small_corpus, monkeypatch):
    monkeypatch.delenv("FASTGPT_DATA", raising=False)
    assert isinstance(load_training_data(str(small_corpus)), CharDataset)
    folder = write_folder(tmp_path / "docs", TEXTS)
    jsonl = write_jsonl(tmp_path / "docs.JSONL", TEXTS)  # the suffix in any case
    for source in (folder, jsonl):
        ds = load_training_data(str(source), pack=True)
        assert isinstance(ds, DocumentDataset) and ds.pack and ds.mode == "packed"
    monkeypatch.setenv("FASTGPT_DATA", str(folder))  # the environment variable takes folders too
    assert isinstance(load_training_data(None), DocumentDataset)


# -- the vocabulary and the split ------------------------------------------------------------

@pytest.mark.parametrize("count, val", [(2, [1]), (9, [8]), (10, [9]), (15, [6, 14]), (30, [9, 19, 29])])
def test_the_split_is_a_tenth_of_the_documents_evenly_spread_and_deterministic(count, val):
    train, chosen = split_by_document(count)
    assert chosen == val and sorted(train + chosen) == list(range(count))


def test_the_split_needs_two_documents():
    with pytest.raises(ValueError, match="needs at least 2 documents"):
        split_by_document(1)


def test_the_vocabulary_is_every_documents_and_short_documents_are_skipped_and_counted():
    ds = DocumentDataset([Document(str(i), t) for i, t in enumerate(TEXTS)])
    usable = [t for t in TEXTS if len(t) >= 2]  # "x" and "" hold no (input, target) pair
    assert ds.skipped == 2 and ds.tokenizer.chars == "".join(sorted(set("".join(usable))))
    assert (ds.train.documents, ds.val.documents) == (3, 1)
    assert ds.tokenizer.decode(ds.val.tokens.tolist()) == usable[-1]  # the last of the one run of four
    assert "3 train, 1 val, 2 shorter than 2 characters skipped; batches padded" in ds.describe()
    with pytest.raises(ValueError, match="1 document\\(s\\) of at least 2 characters \\(of 3\\)"):
        DocumentDataset([Document("a", "ab"), Document("b", "c"), Document("c", "")])


def test_the_fingerprint_sees_the_documents_edges():
    one = DocumentDataset([Document("a", "abcd"), Document("b", "ef"), Document("c", "gh")])
    moved = DocumentDataset([Document("a", "abc"), Document("b", "def"), Document("c", "gh")])
    assert one.fingerprint() != moved.fingerprint()
    assert one.fingerprint() == DocumentDataset([Document("x", "abcd"), Document("y", "ef"),
                                                 Document("z", "gh")]).fingerprint()


# -- pieces and batches ----------------------------------------------------------------------

def documents_split(lengths):
    """A split whose document d is the ids 100·d + 0, 1, 2, ...: every token names its document and place."""
    return DocumentSplit([[100 * d + i for i in range(n)] for d, n in enumerate(lengths)])


def test_pieces_cover_every_pair_once_and_never_leave_their_document():
    split = documents_split([2, 5, 9, 10, 1])
    starts, lengths = split.pieces(4)
    pairs = [(int(split.tokens[s + i]), int(split.tokens[s + i + 1])) for s, n in zip(starts, lengths)
             for i in range(n)]
    expected = [(100 * d + i, 100 * d + i + 1) for d, n in enumerate([2, 5, 9, 10, 1]) for i in range(n - 1)]
    assert sorted(pairs) == sorted(expected) and len(pairs) == len(expected)
    assert lengths.tolist() == [1, 4, 4, 4, 4, 4, 1]  # 9 tokens: 8 pairs in two; 10 tokens: 9 pairs in 4, 4, 1


def test_a_padded_batch_holds_one_piece_per_row_its_pads_ignored():
    split = documents_split([3, 7, 12, 30])
    T = 8
    batch = split.padded_batch(16, T, torch.Generator().manual_seed(0))
    assert batch.x.shape == batch.y.shape == (16, T) and batch.packing is None
    real = batch.y != IGNORE_INDEX
    assert batch.real_tokens == int(real.sum())
    for x, y, keep in zip(batch.x.tolist(), batch.y.tolist(), real.tolist()):
        n = sum(keep)
        assert keep == [True] * n + [False] * (T - n) and n >= 1  # real targets first, then pads
        assert all(b == a + 1 for a, b in zip(x[:n], y[:n]))  # each target is the next token of the same document
        assert len({t // 100 for t in x[:n]}) == 1  # one document per row
        assert x[n:] == [0] * (T - n)


@pytest.mark.parametrize("lengths", [[3, 7, 12, 30], [2, 2, 2, 2, 40], [50]])
def test_a_packed_batch_fills_every_row_exactly_and_no_target_crosses_a_document(lengths):
    split = documents_split(lengths)
    B, T = 5, 8
    batch = split.packed_batch(B, T, torch.Generator().manual_seed(1))
    assert batch.x.shape == batch.y.shape == (B, T) and batch.real_tokens == B * T
    assert not (batch.y == IGNORE_INDEX).any()  # every position trains
    packing = batch.packing
    edges = packing.cu_seqlens.tolist()
    assert edges[0] == 0 and edges[-1] == B * T and packing.max_len == max(b - a for a, b in zip(edges, edges[1:]))
    x, y, positions = batch.x.view(-1).tolist(), batch.y.view(-1).tolist(), packing.positions.view(-1).tolist()
    for a, b in zip(edges, edges[1:]):
        assert a // T == (b - 1) // T  # a segment stays in its row
        assert positions[a:b] == list(range(b - a))  # positions restart at each segment
        assert len({t // 100 for t in x[a:b]}) == 1  # one document
        assert x[a:b] == list(range(x[a], x[a] + b - a))  # consecutive characters of it
        assert y[a:b] == [t + 1 for t in x[a:b]]  # targets: the next characters of the same document
    assert set(range(0, B * T, T)) <= set(edges)  # every row starts a segment


def test_batches_are_a_function_of_the_generator():
    ds = DocumentDataset([Document(str(i), "abcdefghij"[: 2 + i % 8]) for i in range(40)], pack=True)
    a = ds.get_batch("train", 4, 8, torch.Generator().manual_seed(3))
    b = ds.get_batch("train", 4, 8, torch.Generator().manual_seed(3))
    c = ds.get_batch("train", 4, 8, torch.Generator().manual_seed(4))
    assert torch.equal(a.x, b.x) and torch.equal(a.packing.cu_seqlens, b.packing.cu_seqlens)
    assert not torch.equal(a.x, c.x)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        ds.get_batch("test", 4, 8, torch.Generator())
