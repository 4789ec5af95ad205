"""torch.compile of the GPT: every backend's attention is traced without a graph break, and a
compiled training step runs on CPU (inductor).

The ext ops and the Triton kernels are torch.library ops with fake kernels, so dynamo records
each as one node. Dropout is on (0.2, as the lecture trains): the ext backend's dropout seed is
a tensor up to an opaque op (causal_softmax_seeded, fastgpt/ext/ops.py), so it is no data-dependent
int either.
"""

import dataclasses
import math

import pytest
import torch
import torch._dynamo

from fastgpt.attention import registry
from fastgpt.run.config import make_configs
from fastgpt.model.gpt import GPT, ModelConfig
from fastgpt.run.trainer import Trainer

TINY = dict(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout_p=0.2)


@pytest.mark.parametrize("backend", ["naive", "sdpa", "ext", "triton"])
def test_compiled_gpt_has_no_graph_break(backend):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, backend=backend))
    x = torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"]))
    model(x, x)  # eager first: the ext library is loaded (a build and a lock dynamo would not trace)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x, x)
    reasons = [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons
    ops = {str(node.target).removesuffix(".default") for graph in explanation.graphs for node in graph.graph.nodes}
    if backend == "ext":  # our ops are in the graph, as single nodes
        assert {"fastgpt.causal_matmul_nt", "fastgpt.causal_softmax_seeded", "fastgpt.causal_matmul_nn"} <= ops, ops
    if backend == "triton":
        assert "fastgpt.flash_attention_fwd" in ops, ops


@pytest.mark.parametrize("backend", ["sdpa", "ext"])
def test_compiled_training_step_runs_on_cpu(backend, small_corpus, tmp_path):
    # Triton under compile on CPU is not run here: inductor would call the interpreter per kernel.
    # naive is not either: it is plain PyTorch ops, as sdpa's model is, and each backend's first
    # compile in a process costs inductor's warm-up (about a minute on 2 cores).
    torch._dynamo.reset()
    config = dict(decay_lr=False, block_size=16, n_layer=1, n_head=2, n_embd=32, batch_size=4, dropout_p=0.2,
                  progress=False, sample_tokens=0, compile=True, backend=backend, data=str(small_corpus),
                  out_dir=str(tmp_path))
    trainer = Trainer(*make_configs("cpu", config))
    assert trainer.train_model is not trainer.model  # the compiled wrapper
    losses = [trainer.step().item() for _ in range(3)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert not any(k.startswith("_orig_mod") for k in trainer.checkpoint_state()["model"])  # plain checkpoints


@pytest.mark.parametrize("backend", ["ext", "auto"])
def test_the_trainer_prepares_the_backend_it_compiles(backend, small_corpus, tmp_path, monkeypatch):
    # The backend (auto resolved: ext on CPU where it builds) loads its ops before torch.compile
    # traces; the trainer names no backend to make that happen.
    if backend == "auto" and registry.get_backend("ext").unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("auto picks ext on CPU only where the extension builds")
    prepared = []
    ext = registry.get_backend("ext")
    monkeypatch.setitem(registry.ATTENTION.backends, "ext", dataclasses.replace(ext, prepare=prepared.append))
    monkeypatch.setattr(torch, "compile", lambda model: model)  # what runs before compiling, not the compile
    config = dict(block_size=16, n_layer=1, n_head=2, n_embd=32, batch_size=4, dropout_p=0.2, progress=False,
                  sample_tokens=0, compile=True, backend=backend, data=str(small_corpus), out_dir=str(tmp_path))
    Trainer(*make_configs("cpu", config))
    assert prepared == [torch.device("cpu")]


def test_seeded_softmax_is_causal_softmax_with_that_seed():
    from fastgpt.ext import layout, ops

    T_q, T_k = 37, 40  # fewer queries than keys: the T_q, T_k arguments reach the kernels
    n = layout.packed_size(T_q, T_k)
    scores = torch.randn(2, 3, n, dtype=torch.float64).float().requires_grad_()
    grad = torch.randn(2, 3, n)
    seed = ops.draw_seed()
    out = ops.causal_softmax_seeded(scores, T_q, T_k, 0.25, 0.3, seed, 7)
    (d_scores,) = torch.autograd.grad(out, scores, grad)
    expected = ops.causal_softmax(scores, T_q, T_k, 0.25, 0.3, int(seed), 7)
    (expected_d_scores,) = torch.autograd.grad(expected, scores, grad)
    assert torch.equal(out, expected) and torch.equal(d_scores, expected_d_scores)
    dense = layout.unpack(out.detach(), T_q, T_k)  # (2, 3, T_q, T_k)
    visible = 2 * 3 * sum(T_k - T_q + i + 1 for i in range(T_q))
    assert (dense != 0).sum() < visible  # some visible weights were zeroed: dropout ran
