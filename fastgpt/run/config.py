"""Training configuration and the named presets.

A run's settings are a ModelConfig (the network) and a TrainConfig (the optimisation and the
bookkeeping). A preset fills both; every field can then be overridden on the command line, where
field `n_layer` is the flag `--n-layer`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from fastgpt.model.gpt import ModelConfig


# --dtype names -> the autocast dtype (fp32: autocast off)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainConfig:
    data: Optional[str] = None  # corpus path; None: $FASTGPT_DATA, else tiny-shakespeare as packaged
    # A folder of text files or a .jsonl file is a corpus of documents (fastgpt/run/documents.py):
    # batches of one document per row, padded; with pack, documents back to back, attention within each.
    pack: bool = False
    text_field: Optional[str] = None  # the field of a .jsonl line that holds its document; None: "text"
    out_dir: str = "out"  # checkpoint, metrics.jsonl and loss-curve PNG go here
    device: str = "auto"  # "auto" (cuda if present, else cpu), "cpu", "cuda", "cuda:1", ...
    seed: int = 1337
    batch_size: int = 64  # sequences per micro-batch, in each process
    # Micro-batches per optimisation step, over all processes (the global batch): a step sees
    # batch_size * block_size * gradient_accumulation_steps tokens whatever the world size; each
    # of the world_size processes runs gradient_accumulation_steps / world_size of them.
    gradient_accumulation_steps: int = 1
    dtype: str = "fp32"  # autocast dtype of the forward and backward: "bf16", "fp16" (with a gradient scaler), "fp32"
    compile: bool = False  # torch.compile the model
    peak_tflops: Optional[float] = None  # the device's peak, for the MFU estimate; None: fastgpt.run.flops's table (GPUs)
    max_iters: int = 5000
    eval_interval: int = 500  # evaluate (and checkpoint) every this many steps, and at the end
    eval_iters: int = 200  # batches per split in each evaluation
    learning_rate: float = 3e-4  # peak learning rate
    decay_lr: bool = False  # linear warmup then cosine decay to min_lr; else constant
    warmup_iters: int = 0
    lr_decay_iters: int = 5000  # the cosine reaches min_lr here, and stays
    min_lr: float = 3e-5
    weight_decay: float = 0.01  # on matrices and embeddings; never on biases and LayerNorm
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 0.0  # clip the global gradient norm to this; 0 disables
    resume: bool = False  # continue the run whose checkpoint is in out_dir
    sample_tokens: int = 500  # characters sampled at the end of training; 0 for none
    progress: bool = True  # progress bar

    def validate(self) -> None:
        # NaN slips through every comparison below (nan < 0 is False): refuse it, and inf, first.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name} must be a finite number; got {value}")
        positive = ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "lr_decay_iters")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping); got {self.grad_clip}")
        for name in ("min_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops must be > 0 (or unset); got {self.peak_tflops}")
        if self.text_field is not None and not self.text_field:
            raise ValueError("text_field is empty (--text-field ''): name the field of a .jsonl line that holds its "
                             "document, or leave it out for 'text'")
        if not str(self.out_dir).strip():
            # Path("") is the current folder: the run would scatter its files wherever it was started
            raise ValueError(f"out_dir is empty ({str(self.out_dir)!r}): name the folder the run's checkpoint and "
                             "metrics go to, e.g. --out-dir out")
        if self.decay_lr:
            self._check_schedule()

    def _check_schedule(self) -> None:
        """The warmup, then the cosine from learning_rate down to min_lr (fastgpt.run.trainer.learning_rate_at)."""
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr} is above learning_rate={self.learning_rate}: the cosine decay "
                             "would raise the rate; set --min-lr at most --learning-rate (or --no-decay-lr)")
        if self.warmup_iters >= self.lr_decay_iters:
            raise ValueError(f"warmup_iters={self.warmup_iters} must be below lr_decay_iters={self.lr_decay_iters}: "
                             "the cosine decay runs between them, so it would never run and the rate would drop "
                             "to min_lr as the warmup ends; raise --lr-decay-iters or lower --warmup-iters")

    def check_world_size(self, world_size: int) -> int:
        """The micro-batches each of `world_size` processes runs per step."""
        if self.gradient_accumulation_steps % world_size != 0:
            raise ValueError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} (micro-batches per step, over all "
                f"processes) must be divisible by the world size {world_size}: use a multiple of {world_size}"
            )
        return self.gradient_accumulation_steps // world_size


PRESETS: dict[str, dict[str, Any]] = {
    # The lecture's gpt.py: 10.8 M parameters, a GPU workload (its CPU step: docs/benchmarks.md).
    "shakespeare-char": dict(
        model="gpt", batch_size=64, block_size=256, n_embd=384, n_head=6, n_layer=6, dropout_p=0.2,
        learning_rate=3e-4, max_iters=5000, eval_interval=500, eval_iters=200,
    ),
    # nanoGPT's CPU run (its README): 0.8 M parameters, small enough to train on a laptop's CPU.
    "cpu": dict(
        model="gpt", batch_size=12, block_size=64, n_embd=128, n_head=4, n_layer=4, dropout_p=0.0,
        learning_rate=1e-3, decay_lr=True, warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4,
        max_iters=2000, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=250, eval_iters=20,
    ),
    # The lecture's bigram.py.
    "bigram": dict(
        model="bigram", batch_size=32, block_size=8, learning_rate=1e-2, max_iters=3000,
        eval_interval=300, eval_iters=200, dropout_p=0.0,
    ),
}

MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# Fields that define the network's parameters: a resumed run cannot change them (window and
# softcap change what the parameters compute, not which there are: a resumed run may change them).
ARCHITECTURE_FIELDS = ("model", "vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "sinks")


def make_configs(preset: str, overrides: dict[str, Any] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The preset's configs with `overrides` ({field: value}) applied on top."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is unknown; choose one of: {', '.join(PRESETS)}")
    if (overrides or {}).get("vocab_size") is not None:
        # The trainer sets it from the corpus: a value given here would be ignored without a word.
        raise ValueError(f"vocab_size={overrides['vocab_size']} (--vocab-size): a new run's vocabulary is its corpus's "
                         "characters, counted when the corpus is read; drop --vocab-size (a --resume keeps its "
                         "checkpoint's)")
    return split_fields({**PRESETS[preset], **(overrides or {})})


def split_fields(values: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    unknown = set(values) - MODEL_FIELDS - TRAIN_FIELDS
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    model = ModelConfig(**{k: v for k, v in values.items() if k in MODEL_FIELDS})
    train = TrainConfig(**{k: v for k, v in values.items() if k in TRAIN_FIELDS})
    return model, train
