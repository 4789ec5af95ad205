"""Documents packed into the rows of a batch (fastgpt/model/packing.py): the layout, and the GPT's
packed forward against each document run alone."""

import pytest
import torch

from fastgpt.attention import kernels_ran
from fastgpt.model.gpt import GPT, ModelConfig
from fastgpt.model.packing import Packing


def test_from_lengths_lays_out_edges_and_positions():
    packing = Packing.from_lengths([[4, 2, 4], [6, 4]], 10)
    assert packing.cu_seqlens.tolist() == [0, 4, 6, 10, 16, 20] and packing.cu_seqlens.dtype == torch.int32
    assert packing.positions.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    assert packing.max_len == 6 and packing.documents == 5


def test_from_position_ids_is_transformers_convention():
    packing = Packing.from_lengths([[4, 2, 4], [6, 4]], 10)
    again = Packing.from_position_ids(packing.positions)
    assert torch.equal(again.cu_seqlens, packing.cu_seqlens) and torch.equal(again.positions, packing.positions)
    assert again.max_len == 6


@pytest.mark.parametrize("lengths,message", [
    ([[4, 2, 3]], r"row 0's document lengths \[4, 2, 3\] must be >= 1 each and sum to T=10"),
    ([[10], [0, 10]], r"row 1's document lengths \[0, 10\]"),
])
def test_bad_lengths_are_refused(lengths, message):
    with pytest.raises(ValueError, match=message):
        Packing.from_lengths(lengths, 10)


def test_position_ids_that_skip_are_refused():
    with pytest.raises(ValueError, match="token 2 of row 0 is 5 after 1"):
        Packing.from_position_ids(torch.tensor([[0, 1, 5, 6]]))


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_a_packed_batch_gives_each_document_alone(backend):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=65, block_size=16, n_embd=32, n_head=4, n_kv_head=2, n_layer=2, dropout_p=0.0,
                         backend=backend, window=5)
    model = GPT(config).double().eval()
    lengths = [[5, 3, 8], [10, 6]]
    docs = [torch.randint(0, 65, (n,)) for row in lengths for n in row]
    idx = torch.stack([torch.cat(docs[:3]), torch.cat(docs[3:])])
    kernels_ran(reset=True)
    logits, _ = model(idx, packing=Packing.from_lengths(lengths, 16))
    assert kernels_ran() == {backend: 2}  # one varlen call per layer
    alone = torch.cat([model(doc[None])[0][0] for doc in docs])
    torch.testing.assert_close(logits.reshape(-1, 65), alone, rtol=1e-10, atol=1e-12)
