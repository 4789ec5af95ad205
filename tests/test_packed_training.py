"""Training on documents: a packed batch's loss and gradients are those of its documents run one by
one, `fastgpt train --data DOCS [--pack]` end to end, and the lecture's default run untouched."""

import hashlib
import json

import pytest
import torch

from fastgpt.attention import available_backends, refusal
from fastgpt.attention.registry import choose
from fastgpt.cli import main
from fastgpt.model.gpt import GPT, ModelConfig
from fastgpt.run.config import make_configs
from fastgpt.run.data import CharDataset
from fastgpt.run.documents import (IGNORE_INDEX, Document, DocumentDataset, batch_loss, load_training_data,
                                   packed_attention_call)
from fastgpt.run.trainer import Trainer

SPEECHES = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "First Citizen:\nYou are all resolved rather to die than to famish?",
    "All:\nResolved. resolved.",
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.",
    "All:\nWe know't, we know't.",
    "Second Citizen:\nOne word, good citizens.",
    "Ay.",
] * 3

TINY_RUN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "3",
            "--eval-iters", "2", "--eval-interval", "2", "--max-iters", "4", "--no-progress", "--no-decay-lr",
            "--sample-tokens", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread computes them at once, where several wait on each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def documents(pack: bool) -> DocumentDataset:
    return DocumentDataset([Document(str(i), text) for i, text in enumerate(SPEECHES)], pack=pack)


def float64_gpt(vocab_size: int, block_size: int = 32) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16, dropout_p=0.0,
                         backend="naive")
    return GPT(config).double()


def loss_one_by_one(model, segments) -> torch.Tensor:
    """The mean loss over every real target of `segments` [(x (n,), y (n,))], each run on its own."""
    total = sum(model(x[None], y[None])[1] * (y != IGNORE_INDEX).sum() for x, y in segments)
    return total / sum(int((y != IGNORE_INDEX).sum()) for _, y in segments)


def grads(model, loss) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_a_packed_batch_is_its_documents_run_one_by_one():
    ds = documents(pack=True)
    batch = ds.get_batch("train", 4, 32, torch.Generator().manual_seed(0))
    model = float64_gpt(ds.tokenizer.vocab_size)
    edges = batch.packing.cu_seqlens.tolist()
    x, y = batch.x.view(-1), batch.y.view(-1)
    segments = [(x[a:b], y[a:b]) for a, b in zip(edges, edges[1:])]
    assert len(segments) > 4  # rows hold several documents each
    packed = batch_loss(model, batch)
    alone = loss_one_by_one(model, segments)
    torch.testing.assert_close(packed, alone, rtol=1e-12, atol=0)
    for g_packed, g_alone in zip(grads(model, packed), grads(model, alone)):
        torch.testing.assert_close(g_packed, g_alone, rtol=1e-10, atol=1e-12)


def test_a_padded_batch_is_its_rows_real_tokens_run_one_by_one():
    ds = documents(pack=False)
    batch = ds.get_batch("train", 6, 16, torch.Generator().manual_seed(0))
    assert (batch.y == IGNORE_INDEX).any()  # some rows are padded
    model = float64_gpt(ds.tokenizer.vocab_size)
    rows = [(x[y != IGNORE_INDEX], y[y != IGNORE_INDEX]) for x, y in zip(batch.x, batch.y)]
    torch.testing.assert_close(batch_loss(model, batch), loss_one_by_one(model, rows), rtol=1e-12, atol=0)


def test_the_trainers_packed_step_is_the_loss_of_its_documents(tmp_path):
    model_config, train_config = make_configs("cpu", dict(
        block_size=16, n_layer=1, n_head=2, n_embd=16, batch_size=3, backend="naive", pack=True, progress=False,
        sample_tokens=0, out_dir=str(tmp_path), dropout_p=0.0))
    trainer = Trainer(model_config, train_config, documents(pack=True))
    assert trainer.packed and trainer.attention_kernel() == "naive"
    batch = trainer._micro_batch(0)  # the batch step() draws at iteration 0
    reference = trainer.model.double()
    edges = batch.packing.cu_seqlens.tolist()
    x, y = batch.x.view(-1), batch.y.view(-1)
    expected = loss_one_by_one(reference, [(x[a:b], y[a:b]) for a, b in zip(edges, edges[1:])]).item()
    trainer.model.float()
    real_before = trainer.real_tokens
    assert trainer.step().item() == pytest.approx(expected, rel=1e-5)
    assert trainer.real_tokens - real_before == 3 * 16  # a packed step trains every position


def test_pack_refuses_a_model_without_attention(tmp_path):
    bigram = make_configs("bigram", dict(pack=True, out_dir=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match="--pack keeps each document's attention inside it, and model 'bigram'"):
        Trainer(*bigram, documents(pack=True))


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_a_packed_run_names_the_kernel_path_of_its_varlen_call_or_refuses_it_up_front(tmp_path, backend):
    configs = make_configs("cpu", dict(block_size=16, n_layer=1, n_head=2, n_embd=32, backend=backend, pack=True,
                                       out_dir=str(tmp_path), progress=False))
    probe = packed_attention_call(16, 2, None, 16, torch.device("cpu"), torch.float32, 0.0, {})
    why = refusal(probe, backend)
    if why is not None:  # refused when the run is built, not at its first step
        with pytest.raises(ValueError) as refused:
            Trainer(*configs, documents(pack=True))
        assert "varlen" in str(refused.value)
        return
    assert Trainer(*configs, documents(pack=True)).attention_kernel() == choose(probe, backend).name


# -- through the command line ------------------------------------------------------------------

@pytest.fixture()
def speeches_jsonl(tmp_path):
    path = tmp_path / "speeches.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in SPEECHES), encoding="utf-8")
    return path


@pytest.mark.parametrize("pack", [False, True])
def test_fastgpt_train_on_documents_says_how_it_batches_and_logs_real_tokens(speeches_jsonl, tmp_path, capsys, pack):
    out = tmp_path / "run"
    flags = ["--pack"] if pack else []
    assert main(["train", "--preset", "cpu", "--data", str(speeches_jsonl), "--out-dir", str(out), "--backend", "naive",
                 *flags, *TINY_RUN]) == 0
    printed = capsys.readouterr().out
    assert "attention backend 'naive' -> kernel path naive" in printed
    assert f"documents from JSONL file '{speeches_jsonl}': 22 train, 2 val" in printed
    assert ("batches packed (--pack)" if pack else "batches padded: one document") in printed
    assert "step 4: train loss" in printed and "real tokens/s of" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 2, 4]
    last = records[-1]
    assert last["batching"] == ("packed" if pack else "padded")
    assert [name for name in last["kernels"] if not name.startswith("linear.")] == ["naive"]
    if pack:
        assert last["real_tokens_per_s"] == pytest.approx(last["tokens_per_s"])
    else:
        assert 0 < last["real_tokens_per_s"] < last["tokens_per_s"]  # the pads are counted out
    # a document run resumes like any other: same documents, same fingerprint
    assert main(["train", "--resume", "--out-dir", str(out), "--max-iters", "6", "--no-progress"]) == 0
    assert "resuming at iteration 4 of 6" in capsys.readouterr().out


def test_fastgpt_train_pack_on_one_text_file_is_refused_in_one_line(small_corpus, tmp_path, capsys):
    assert main(["train", "--data", str(small_corpus), "--pack", "--out-dir", str(tmp_path / "run"), *TINY_RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastgpt train: error: --pack packs documents into rows") and "\n" not in err
    assert not (tmp_path / "run").exists()


# -- the lecture's run --------------------------------------------------------------------------

def test_the_default_run_trains_on_the_shipped_text_with_the_same_batches(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTGPT_DATA", raising=False)
    model_config, train_config = make_configs("cpu", dict(block_size=32, n_layer=1, n_head=2, n_embd=16, batch_size=4,
                                                          backend="naive", progress=False, out_dir=str(tmp_path)))
    trainer = Trainer(model_config, train_config)
    assert type(trainer.dataset) is CharDataset and not trainer.packed
    digest = hashlib.sha256()
    for it in range(2):
        trainer.iter = it
        x, y = trainer._micro_batch(0)
        digest.update(x.numpy().tobytes())
        digest.update(y.numpy().tobytes())
    # the windows the default run drew before documents existed, iterations 0 and 1
    assert digest.hexdigest() == "eed3b2904266e18276dc69ba1de911abcc857e0a63fb00eb1cf69cd35f8dca9d"
    trainer.iter = 0
    x, y = trainer._micro_batch(0)
    expected = trainer.model(x, y)[1].item()  # the lecture's call: model(x, y), no packing
    assert trainer.step().item() == expected
    assert trainer.real_tokens == 0  # counted for document runs only


# -- the benchmark ------------------------------------------------------------------------------

def test_the_speeches_written_as_jsonl_or_a_folder_are_the_documents_fastgpt_train_reads(tmp_path):
    from fastgpt.bench.packing import shakespeare_speeches, write_documents

    speeches = shakespeare_speeches()
    assert speeches[0] == "First Citizen:\nBefore we proceed any further, hear me speak.\n" and len(speeches) > 7000
    some = speeches[:30]
    for path in (tmp_path / "speeches.jsonl", tmp_path / "speeches"):
        ds = load_training_data(str(write_documents(some, path)), pack=True)
        assert ds.train.documents + ds.val.documents == 30 and ds.val.documents == 3
    with pytest.raises(FileExistsError):
        write_documents(some, tmp_path / "speeches")  # never adds files to a folder of documents


def test_the_packing_benchmark_times_both_modes_and_writes_json_and_a_plot(tmp_path):
    from fastgpt.bench.packing import main

    speeches = tmp_path / "speeches.jsonl"
    speeches.write_text("".join(json.dumps({"text": t}) + "\n" for t in SPEECHES), encoding="utf-8")
    out = tmp_path / "bench"
    assert main(["--data", str(speeches), "--block-size", "32", "--batch-size", "2", "--steps", "1", "--reps", "2",
                 "--warmup", "0", "--backend", "naive", "--out-dir", str(out), "--no-progress"]) == 0
    result = json.loads((out / "packing_cpu.json").read_text())
    padded, packed = result["records"]
    assert (padded["mode"], packed["mode"]) == ("padded", "packed") and packed["real_fraction"] == 1.0
    assert 0 < padded["real_fraction"] < 1 and padded["kernel_path"] == packed["kernel_path"] == "naive"
    assert result["environment"]["device"].startswith("CPU") and result["documents"]["train"] == 22
    assert result["packed_over_padded"] == pytest.approx(packed["real_tokens_per_s"] / padded["real_tokens_per_s"])
    assert (out / "packing_cpu.png").stat().st_size > 0 and (out / "packing_cpu.csv").exists()
