import socket

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastgpt.run.data import CharDataset, CharTokenizer, read_corpus, resolve_corpus_path

ALPHABET = "abc XYZ\n!é—"


@given(st.text(alphabet=ALPHABET, min_size=0, max_size=200))
def test_tokenizer_round_trip(s):
    tok = CharTokenizer(ALPHABET)
    ids = tok.encode(s)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s


def test_tokenizer_ids_follow_sorted_vocabulary():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw"
    assert tok.stoi["d"] == 1 and tok.itos[1] == "d"


def test_unknown_characters_name_them_and_the_vocabulary():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"not in the model's vocabulary: 'xz'.*'abc'"):
        tok.encode("axbz")


def test_tiny_shakespeare_vocabulary_and_split(shakespeare_path):
    ds = CharDataset.load(shakespeare_path)
    assert ds.tokenizer.vocab_size == 65
    assert len(ds.train) + len(ds.val) == 1_115_394
    assert len(ds.train) == int(0.9 * 1_115_394)


def test_get_batch_shapes_and_shifted_targets(small_corpus):
    ds = CharDataset.load(small_corpus)
    g = torch.Generator().manual_seed(0)
    x, y = ds.get_batch("train", batch_size=5, block_size=16, generator=g)
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted left by one
    # each row is a real window of the split, with its next character as the last target
    train = ds.train.tolist()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = next(i for i in range(len(train) - 16) if train[i:i + 16] == row_x)
        assert train[start + 16] == row_y[-1]


def test_get_batch_is_seedable(small_corpus):
    ds = CharDataset.load(small_corpus)
    a = ds.get_batch("val", 4, 8, torch.Generator().manual_seed(3))
    b = ds.get_batch("val", 4, 8, torch.Generator().manual_seed(3))
    c = ds.get_batch("val", 4, 8, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_explicit_path_beats_env_var(small_corpus, tmp_path, monkeypatch):
    other = tmp_path / "other.txt"
    other.write_text("zzzz")
    monkeypatch.setenv("FASTGPT_DATA", str(other))
    assert resolve_corpus_path(small_corpus) == small_corpus
    assert resolve_corpus_path() == other


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt.*does not exist"):
        read_corpus(tmp_path / "nope.txt")


def test_empty_file_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="has 0 characters; at least 2"):
        read_corpus(empty)


def test_non_utf8_file_is_refused(tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="is not UTF-8"):
        read_corpus(binary)


def test_corpus_too_short_for_block_size(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 3)  # 30 chars: val split has 3
    ds = CharDataset.load(short)
    with pytest.raises(ValueError, match=r"val split has 3 characters, fewer than block_size \+ 1 = 9"):
        ds.check_block_size(8)


def test_packaged_corpus_is_tiny_shakespeare_and_needs_no_network(monkeypatch):
    monkeypatch.delenv("FASTGPT_DATA", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("the default corpus must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    assert resolve_corpus_path() is None  # nothing given: the packaged copy
    text = read_corpus()
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:\n")
    ds = CharDataset.from_text(text)
    assert ds.tokenizer.vocab_size == 65
    assert (len(ds.train), len(ds.val)) == (1_003_854, 111_540)  # the lecture's 90/10 split


def test_packaged_corpus_is_the_shared_file_byte_for_byte(shakespeare_path, monkeypatch):
    monkeypatch.delenv("FASTGPT_DATA", raising=False)
    assert read_corpus() == shakespeare_path.read_text(encoding="utf-8")


def test_a_directory_as_corpus_is_named_as_one(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"corpus .* is a directory \(from --data\); pass a UTF-8 text file"):
        read_corpus(tmp_path)
    monkeypatch.setenv("FASTGPT_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=r"is a directory \(from FASTGPT_DATA\)"):
        read_corpus()


@pytest.mark.parametrize("special, kind", [("/dev/null", "a character device")])
def test_a_special_file_is_named_for_what_it_is(special, kind):
    with pytest.raises(ValueError, match=f"corpus '{special}' is {kind}, not a regular file \\(from --data\\); "
                                         "pass a UTF-8 text file"):
        read_corpus(special)


def test_a_fifo_is_refused_without_reading_it(tmp_path):
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # reading it would block until a writer came
    with pytest.raises(ValueError, match="is a FIFO"):
        read_corpus(fifo)


def test_an_empty_corpus_says_it_is_empty(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"corpus file '{empty}' is empty"):
        read_corpus(empty)


def test_an_unreadable_corpus_says_so(tmp_path):
    import os
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("made unreadable through a non-root effective user, which needs root to set back")
    # in a folder anyone may enter, so only the file's own mode stops the read
    folder = tempfile.mkdtemp()
    try:
        os.chmod(folder, 0o755)
        corpus = os.path.join(folder, "secret.txt")
        with open(corpus, "w") as f:
            f.write("To be, or not to be")
        os.chmod(corpus, 0o600)
        os.seteuid(65534)  # nobody: root reads any file whatever its mode
        try:
            with pytest.raises(ValueError, match=f"corpus file '{corpus}' cannot be read \\(Permission denied\\)"):
                read_corpus(corpus)
            # a folder that cannot be entered: the path cannot even be looked at
            os.seteuid(0)
            os.chmod(folder, 0o700)
            os.seteuid(65534)
            with pytest.raises(ValueError, match=f"corpus '{corpus}' cannot be reached \\(Permission denied\\)"):
                read_corpus(corpus)
        finally:
            os.seteuid(0)
    finally:
        shutil.rmtree(folder)
