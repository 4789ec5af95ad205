"""The trainer: AdamW on random windows of the corpus, periodic evaluation, checkpoints, metrics.

    trainer = Trainer(model_config, train_config)      # or Trainer.resume(out_dir)
    trainer.run()                                      # the whole loop, with a progress bar
    trainer.step(); trainer.evaluate(); trainer.save() # or drive it yourself

One step is gradient_accumulation_steps micro-batches (the global batch). Under torchrun each of
the world_size processes runs its share of them in a DistributedDataParallel model, which averages
the gradients: rank r takes micro-batches r, r + world_size, ... So a run over N processes and one
process accumulating over the same global batch see the same windows and take the same steps.

Exact resume: a checkpoint taken at iteration i holds everything step i reads (weights,
optimizer moments, every process's torch RNG for dropout, the gradient scaler); the batches are a
function of (seed, iteration, micro-batch), so a resumed run computes the same loss at step i as
the run that was interrupted.

The loop (Trainer.run), each part a method of its own:

    while True:
        if the policy evaluates at self.iter: _evaluate_and_save()  # losses, metrics record, checkpoint
        if self.iter >= max_iters: break
        _step_and_report()                                          # step(), the progress display

and step() is set the learning rate, then per micro-batch _micro_batch() and _forward_backward(),
then _optimizer_step(). The batches are random windows of one text (fastgpt/run/data.py) or, for a
folder or a .jsonl file of documents, padded or packed rows of documents (fastgpt/run/documents.py);
a document run also reports its real tokens per second, the pads left out. The loop's other jobs live in modules of their own: the checkpoint policy
(when to evaluate and save; the lock on out_dir, the guard against overwriting another run, leftover
temporary files: fastgpt/run/checkpoint_policy.py), the metrics log (fastgpt/run/metrics_log.py),
the progress display (fastgpt/run/progress.py) and the reading of a run back from its checkpoint
(fastgpt/run/resume.py). A loss that is not finite stops the run before its weights are saved, so
the checkpoint on disk is always the last good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch
from torch.nn.parallel import DistributedDataParallel

from fastgpt.run import distributed
from fastgpt.run.atomic_file import interrupts_deferred
from fastgpt.attention import AttentionCall
from fastgpt.attention import kernels_ran as attention_kernels_ran
from fastgpt.attention.registry import choose
from fastgpt.model import kernels as model_kernels
from fastgpt.run.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from fastgpt.run.checkpoint_policy import CheckpointPolicy
from fastgpt.run.config import DTYPES, TrainConfig, split_fields
from fastgpt.machine.cpu_features import bf16_cpu_warning
from fastgpt.run.data import CharDataset, CharTokenizer
from fastgpt.run.documents import (DocumentBatch, DocumentDataset, batch_loss, check_model_takes_packing,
                                   load_training_data, packed_attention_call)
from fastgpt.run.flops import device_peak_flops, training_flops_per_step
from fastgpt.run.metrics_log import METRICS_NAME, MetricsLog
from fastgpt.model.gpt import GPT, ModelConfig, build_model, num_parameters
from fastgpt.run.phase_timer import PhaseTimer
from fastgpt.run.progress import Progress
from fastgpt.run.resume import check_corpus, restore_rng_streams, resumed_settings

# The phases of a run that Trainer.phases times when enabled (`fastgpt bench train --profile`);
# outside them: the loop itself, the progress display, the loss read-outs, the metrics log.
PHASES = ("data", "forward", "backward", "optimizer", "evaluate", "checkpoint", "finish")

LOSS_CURVE_NAME = "loss_curve.png"
RUN_OUTPUTS = (CHECKPOINT_NAME, METRICS_NAME, LOSS_CURVE_NAME)  # the files a run writes in out_dir

T = TypeVar("T")


class TrainingDiverged(RuntimeError):
    """A loss stopped being finite; the run stopped without saving the weights that produced it."""


def resolve_device(name: str) -> torch.device:
    """The device `name` names; under torchrun "auto" and "cuda" mean this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was asked for but this torch build sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", distributed.local_rank())
    return device


def batch_seed(seed: int, it: int, micro: int, micro_batches: int) -> int:
    """The seed of micro-batch `micro` (of `micro_batches` per step, over all processes) of step
    `it`: the (it·micro_batches + micro)-th batch of the run, whichever process draws it."""
    return seed * 2**40 + it * micro_batches + micro


def learning_rate_at(it: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_iters, then a cosine from learning_rate down to min_lr at
    lr_decay_iters, then min_lr; the constant learning_rate when decay_lr is off."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)  # 0 -> 1
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # Decay the matrices and embeddings only: shrinking biases and LayerNorm gains toward zero
    # regularises nothing useful.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates every parameter in one pass (CPU and CUDA since torch 2.4).
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


def compile_model(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """torch.compile(model), once the attention backend (the resolved name, or "none" for a model
    without attention) has loaded what its calls need: loading (a build, a lock) is Python that
    dynamo should not trace."""
    from fastgpt.attention import get_backend

    if backend != "none":
        get_backend(backend).prepare(next(model.parameters()).device)
    return torch.compile(model)


def checked_train_config(cfg: TrainConfig) -> TrainConfig:
    """cfg, validated, with its corpus path made absolute: the checkpoint stores it, and a resume
    from another directory must find the same file."""
    cfg.validate()
    if cfg.data is not None:
        cfg.data = os.path.abspath(cfg.data)
    return cfg


class Trainer:
    def __init__(self, model_config: ModelConfig, train_config: TrainConfig,
                 dataset: Optional[CharDataset | DocumentDataset] = None):
        self.train_config = checked_train_config(train_config)
        self._join_processes()
        cfg = train_config
        self.dataset = dataset if dataset is not None else load_training_data(cfg.data, cfg.pack, cfg.text_field)
        self.real_tokens = 0  # targets that trained (not pads) in this process's micro-batches, for document runs
        self._window_real_tokens = 0  # real_tokens when the progress window opened
        self.model_config = self._fit_to_corpus(model_config)
        self._build_model_and_optimizer()
        self._wrap_for_training()
        self.iter = 0  # the next optimisation step to take
        self.saved_iter: Optional[int] = None  # the iteration the checkpoint in out_dir holds, if this run has one
        self.elapsed_s = 0.0  # wall time of the run so far, evaluations included, across resumes
        self.out_dir = Path(train_config.out_dir)
        self.phases = PhaseTimer(self.device)  # off: a profile turns it on (fastgpt/bench/train_profile.py)

    # -- building the run ----------------------------------------------------------------------

    def _join_processes(self) -> None:
        """The device, and under torchrun this process's place among the others (a no-op otherwise)."""
        self.device = resolve_device(self.train_config.device)
        distributed.setup(self.device)  # under torchrun: join the process group
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.micro_steps = self.train_config.check_world_size(self.world_size)  # this process's share of the global batch

    def _fit_to_corpus(self, model_config: ModelConfig) -> ModelConfig:
        """model_config with the corpus's vocabulary, checked against the corpus."""
        model_config.vocab_size = self.dataset.tokenizer.vocab_size
        model_config.validate()
        check_model_takes_packing(self.dataset, model_config.model)
        self.dataset.check_block_size(model_config.block_size)
        return model_config

    def _build_model_and_optimizer(self) -> None:
        cfg = self.train_config
        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        self.model = build_model(self.model_config).to(self.device)  # the model itself: weights, checkpoints, sampling
        torch.manual_seed(cfg.seed + self.rank)  # each process its own dropout masks
        self.optimizer = make_optimizer(self.model, cfg)
        self.autocast_dtype = DTYPES[cfg.dtype]
        # fp16's narrow exponent range needs the loss scaled up before backward (bf16 and fp32 do not)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)

    def _wrap_for_training(self) -> None:
        """What the steps call: the model, compiled and/or wrapped to average gradients over the processes."""
        backend = self.attention_backend()  # a backend that cannot take the autocast dtype fails here
        self.eval_model = compile_model(self.model, backend) if self.train_config.compile else self.model
        self.train_model = self.eval_model
        if distributed.enabled():
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.eval_model, device_ids=device_ids)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype != torch.float32)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of the global batch: every process's micro-batches together."""
        return self.train_config.batch_size * self.model_config.block_size * self.train_config.gradient_accumulation_steps

    # -- one step, one evaluation ------------------------------------------------------------

    def step(self) -> torch.Tensor:
        """One optimisation step at iteration self.iter over the global batch; returns this
        process's (detached) training loss, the mean over its micro-batches."""
        self._set_learning_rate(learning_rate_at(self.iter, self.train_config))
        self.train_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for j in range(self.micro_steps):
            total += self._forward_backward(self._micro_batch(j), last=j == self.micro_steps - 1)
        self._optimizer_step()
        self.iter += 1
        return total / self.micro_steps

    def _set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _micro_batch(self, j: int) -> tuple[torch.Tensor, torch.Tensor] | DocumentBatch:
        """This process's j-th micro-batch of the step: inputs and targets, (batch_size, block_size)
        each (and for documents, the packing and the count of real tokens)."""
        cfg = self.train_config
        micro = self.rank + j * self.world_size  # which micro-batch of the global batch
        with self.phases("data"):
            generator = torch.Generator().manual_seed(batch_seed(cfg.seed, self.iter, micro, cfg.gradient_accumulation_steps))
            batch = self.dataset.get_batch("train", cfg.batch_size, self.model_config.block_size, generator, self.device)
        if isinstance(batch, DocumentBatch):
            self.real_tokens += batch.real_tokens
        return batch

    def _forward_backward(self, batch: tuple[torch.Tensor, torch.Tensor] | DocumentBatch, last: bool) -> torch.Tensor:
        """Accumulates the gradients of one micro-batch; returns its detached fp32 loss."""
        # Gradients are averaged over the processes once, after the last micro-batch: the earlier
        # ones only accumulate locally.
        sync = self.train_model.no_sync() if isinstance(self.train_model, DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with sync:
            with self.phases("forward"), self.autocast():
                loss = batch_loss(self.train_model, batch)
            with self.phases("backward"):
                # / micro_steps here and DDP's mean over the processes: the mean over the global batch
                self.scaler.scale(loss / self.micro_steps).backward()
        return loss.detach().float()

    def _optimizer_step(self) -> None:
        with self.phases("optimizer"):
            if self.train_config.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_config.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_iters batches of each split, in eval mode (no dropout). The batches
        come from a generator reseeded each time, so every evaluation scores the same windows and
        the training RNG streams are left untouched. Rank 0 alone evaluates, with no collective."""
        with self.phases("evaluate"):
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        cfg = self.train_config
        self.eval_model.eval()
        losses = {}
        for split in ("train", "val"):
            generator = torch.Generator().manual_seed(cfg.seed + 1)
            total = torch.zeros((), device=self.device)
            for _ in range(cfg.eval_iters):
                batch = self.dataset.get_batch(split, cfg.batch_size, self.model_config.block_size, generator, self.device)
                with self.autocast():
                    total += batch_loss(self.eval_model, batch).float()
            losses[split] = (total / cfg.eval_iters).item()
        self.eval_model.train()
        return losses

    def attention_kernel(self) -> str:
        """The attention kernel path that training calls run (the backend setting resolved, e.g.
        "ext.cpu_flash"), or "none" (bigram). The probe has the dtype autocast gives the attention's inputs."""
        if not isinstance(self.model, GPT):
            return "none"
        mc = self.model_config
        probe = torch.empty(1, mc.n_head, mc.block_size, mc.n_embd // mc.n_head, device=self.device,
                            dtype=self.autocast_dtype)
        options = self.model.blocks[0].attn.attention_options()  # a window, softcap, sinks: what paths may refuse
        try:
            if self.packed:  # one varlen call over the packed rows
                return choose(packed_attention_call(mc.block_size, mc.n_head, mc.n_kv_head, mc.n_embd // mc.n_head,
                                                    self.device, self.autocast_dtype, mc.dropout_p, options),
                              mc.backend).name
            return choose(AttentionCall.like(probe, kv_heads=mc.n_kv_head, dropout_p=mc.dropout_p, **options),
                          mc.backend).name
        except (ValueError, RuntimeError) as e:
            raise type(e)(f"--dtype {self.train_config.dtype} runs the attention in {str(self.autocast_dtype).removeprefix('torch.')}: "
                          f"{e}") from None

    @property
    def packed(self) -> bool:
        """Whether the batches are packed documents (--pack)."""
        return isinstance(self.dataset, DocumentDataset) and self.dataset.pack

    def attention_backend(self) -> str:
        """The backend of attention_kernel() ("ext" for "ext.cpu_flash"), or "none" (bigram)."""
        return self.attention_kernel().partition(".")[0]

    def set_backend(self, name: str) -> None:
        self.model.set_backend(name)
        self.model_config.backend = name

    # -- checkpoints ---------------------------------------------------------------------------

    @functools.cached_property
    def corpus_fingerprint(self) -> str:
        return self.dataset.fingerprint()

    def checkpoint_state(self) -> dict[str, Any]:
        """The run's state; every process calls it (each contributes its RNG state)."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "model_config": dataclasses.asdict(self.model_config),
            "train_config": dataclasses.asdict(self.train_config),
            "vocab": self.dataset.tokenizer.chars,
            "corpus_fingerprint": self.corpus_fingerprint,
            "iter": self.iter,
            "elapsed_s": self.elapsed_s,
            "rng": distributed.gather(rng),  # one entry per process, in rank order
        }

    def save(self) -> Path:
        """Writes the checkpoint from rank 0; every process calls it, and waits until it is written."""
        path = self.out_dir / CHECKPOINT_NAME
        with self.phases("checkpoint"):
            state = self.checkpoint_state()
            with interrupts_deferred():  # a Ctrl-C mid-write stops the run once the file and saved_iter agree
                self._on_rank0(lambda: self._written(path, lambda: save_checkpoint(state, path)))
                self.saved_iter = self.iter
            distributed.barrier()
        return path

    def _written(self, path: Path, write: Callable[[], T]) -> T:
        """write(), which writes `path`; an OSError it raises (a full disk) becomes one RuntimeError
        naming the file, what the checkpoint on disk still holds, and how to go on."""
        try:
            return write()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                what = f"no space left on the device holding {path} ({e.strerror})"
                fix = "Free space there"
            else:
                what = f"cannot write {path} ({e.strerror or e})"
                fix = "Fix that"
            if self.saved_iter is None:
                raise RuntimeError(f"{what}; no checkpoint was written. {fix}, then start the run again "
                                   "(with --overwrite if it left files)") from None
            raise RuntimeError(f"{what}; {self.out_dir / CHECKPOINT_NAME} still holds iteration {self.saved_iter}. "
                               f"{fix}, then continue with: fastgpt train --resume --out-dir {self.out_dir}") from None

    def resume_hint(self) -> str:
        """What the checkpoint in out_dir holds and how to continue from it: for a run that stopped."""
        if self.saved_iter is None:
            return "no checkpoint was written"
        return (f"{self.out_dir / CHECKPOINT_NAME} holds iteration {self.saved_iter}; continue with: "
                f"fastgpt train --resume --out-dir {self.out_dir}")

    @classmethod
    def resume(cls, out_dir: str | Path, overrides: Optional[dict[str, Any]] = None,
               dataset: Optional[CharDataset] = None, allow_corpus_change: bool = False) -> "Trainer":
        """The run saved in out_dir, ready to take its next step. `overrides` may change training
        settings (max_iters, backend, device, ...) but not the architecture; the corpus must be
        the one the run was trained on unless allow_corpus_change."""
        state = load_checkpoint(Path(out_dir) / CHECKPOINT_NAME)
        model_config, train_config = split_fields(resumed_settings(state, out_dir, overrides))
        trainer = cls(model_config, train_config, dataset)
        check_corpus(state, trainer.dataset.tokenizer.chars, lambda: trainer.corpus_fingerprint, allow_corpus_change,
                     trainer.is_main)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            trainer.scaler.load_state_dict(state["scaler"])
        trainer.iter = trainer.saved_iter = state["iter"]
        trainer.elapsed_s = state["elapsed_s"]
        restore_rng_streams(state["rng"], trainer.rank, trainer.world_size, trainer.device, train_config.seed,
                            trainer.iter)
        return trainer

    # -- the loop ------------------------------------------------------------------------------

    def run(self, overwrite: bool = False) -> list[dict[str, Any]]:
        """Trains up to max_iters, evaluating and checkpointing every eval_interval steps and at the
        end; writes metrics.jsonl and the loss-curve PNG; prints a sample. Returns the metrics
        records this run wrote. A new run refuses an out_dir that holds another run's checkpoint
        unless `overwrite`. Raises TrainingDiverged if a loss stops being finite.
        Under torchrun every process trains; rank 0 alone evaluates, writes and prints."""
        cfg = self.train_config
        policy = CheckpointPolicy(self.out_dir, cfg.eval_interval, cfg.max_iters, self.saved_iter, RUN_OUTPUTS)
        lock = self._on_rank0(lambda: policy.claim(overwrite))  # None in the other processes
        try:
            path = self.out_dir / METRICS_NAME
            metrics = self._on_rank0(lambda: self._written(path, lambda: MetricsLog.start(path, self.saved_iter)))
            self._train(policy, metrics)
            if self.is_main:
                with self.phases("finish"):
                    self._finish(metrics)
        finally:
            if lock is not None:
                lock.release()
        return metrics.records if self.is_main else []

    def _train(self, policy: CheckpointPolicy, metrics: Optional[MetricsLog]) -> None:
        """The loop: evaluate and save when the policy says so, else take a step. `metrics` is rank 0's."""
        backend = self._announce()
        run_start = time.perf_counter() - self.elapsed_s
        loss = None  # the last step's, this process's
        with self._progress() as progress:
            while True:
                if policy.evaluates_at(self.iter):
                    self._evaluate_and_save(loss, metrics, progress, backend, run_start)
                if self.iter >= self.train_config.max_iters:
                    break
                loss = self._step_and_report(progress)
        self.elapsed_s = time.perf_counter() - run_start

    def _announce(self) -> str:
        """Rank 0 prints what runs where; returns the attention backend that training calls run."""
        kernel = self.attention_kernel()
        if self.is_main:
            print(self._describe(kernel))
            if isinstance(self.dataset, DocumentDataset):
                print(self.dataset.describe())
            if self.device.type == "cpu" and self.autocast_dtype == torch.bfloat16 and (warning := bf16_cpu_warning()):
                print(f"fastgpt: warning: --dtype bf16: {warning}")
        return kernel.partition(".")[0]

    def _evaluate_and_save(self, loss: Optional[torch.Tensor], metrics: Optional[MetricsLog], progress: Progress,
                           backend: str, run_start: float) -> None:
        """Evaluates, appends the metrics record, saves the checkpoint and prints the losses; every
        process takes part (the step loss and the checkpoint's RNG states are collectives)."""
        # the last step's loss over the global batch: a collective, so every process takes part
        step_loss = distributed.mean(loss).item() if loss is not None else None
        losses = self._on_rank0(lambda: self._evaluate_finite(step_loss))  # None elsewhere
        real = self._real_tokens_per_s(progress)  # a collective too
        self.elapsed_s = time.perf_counter() - run_start
        self._on_rank0(lambda: self._written(metrics.path, lambda: metrics.append(
            self._record(losses, step_loss, progress, backend, real))))
        self.save()  # reached only with finite losses: a diverged run keeps its last good checkpoint
        if self.is_main:
            rate = f", {real:,.0f} real tokens/s of {progress.tokens_per_s():,.0f} tokens/s" if real is not None else ""
            progress.write(f"step {self.iter}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{rate}")
        progress.new_window()

    def _step_and_report(self, progress: Progress) -> torch.Tensor:
        """One step, timed for the progress display; stops the run if its loss, read every few
        steps, is not finite. Returns this process's loss of the step."""
        t0 = time.perf_counter()
        loss = self.step()
        loss_value = None
        if progress.sync_due(self.iter):
            # A device sync, so only every few steps. The mean over the processes: every process
            # sees the same value, so a divergence stops them all at once.
            loss_value = distributed.mean(loss).item()
        progress.step_done(self.iter, time.perf_counter() - t0, loss_value)
        self._stop_if_diverged({"training loss": loss_value})
        return loss

    def _on_rank0(self, fn: Callable[[], T]) -> Optional[T]:
        """fn() in rank 0 alone (None elsewhere). A refusal it raises (ValueError, RuntimeError) is
        raised in every process, so that they all stop instead of waiting for rank 0 in a collective."""
        if not distributed.enabled():
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except (ValueError, RuntimeError) as e:
                error = e
        error = distributed.gather(error)[0]
        if error is not None:
            raise error
        return result

    def _evaluate_finite(self, step_loss: Optional[float]) -> dict[str, float]:
        losses = self.evaluate()
        self._stop_if_diverged({"train loss": losses["train"], "val loss": losses["val"], "step loss": step_loss})
        return losses

    def _stop_if_diverged(self, losses: dict[str, Optional[float]]) -> None:
        """Raises TrainingDiverged if one of `losses` (None: not measured) is not finite."""
        found = ", ".join(f"{name} {value}" for name, value in losses.items()
                          if value is not None and not math.isfinite(value))
        if not found:
            return
        kept = (f"{self.out_dir / CHECKPOINT_NAME} still holds iteration {self.saved_iter}, the last with finite losses"
                if self.saved_iter is not None else "no checkpoint was written")
        raise TrainingDiverged(
            f"the run diverged at iteration {self.iter} ({found}) and stopped without saving; {kept}. Resume with "
            f"a lower learning rate: fastgpt train --resume --out-dir {self.out_dir} --learning-rate LR"
        )

    def _real_tokens_per_s(self, progress: Progress) -> Optional[float]:
        """Targets that trained (pads left out) per second over the progress window, every process's
        together; None on one text (every token is real) or before a step was timed. Every process calls it."""
        if not isinstance(self.dataset, DocumentDataset):
            return None
        counted = torch.tensor(float(self.real_tokens - self._window_real_tokens), device=self.device)
        self._window_real_tokens = self.real_tokens
        total = distributed.mean(counted).item() * self.world_size
        return total / progress.window_s if progress.window_s > 0 else None

    def _record(self, losses: dict[str, float], step_loss: Optional[float], progress: Progress,
                backend: str, real_tokens_per_s: Optional[float] = None) -> dict[str, Any]:
        """The metrics record of the evaluation at this iteration; a document run's adds its batching
        and real_tokens_per_s (tokens_per_s counts every position, pads too)."""
        documents = {} if not isinstance(self.dataset, DocumentDataset) else {
            "batching": self.dataset.mode, "real_tokens_per_s": real_tokens_per_s}
        return {
            "iter": self.iter,
            "train_loss": losses["train"],
            "val_loss": losses["val"],
            "step_loss": step_loss,
            "tokens_per_s": progress.tokens_per_s(),
            "mfu_estimate": progress.mfu(),
            "elapsed_s": self.elapsed_s,
            "backend": backend,
            # every kernel that ran since the last record, by name, with its calls (training and evaluation)
            "kernels": {**attention_kernels_ran(reset=True), **model_kernels.kernels_ran(reset=True)},
            "lr": learning_rate_at(max(self.iter - 1, 0), self.train_config),
            **documents,
        }

    def _progress(self) -> Progress:
        cfg, mc = self.train_config, self.model_config
        # MFU, an estimate: one process's share of the step's FLOPs against one device's peak
        flops_per_device = training_flops_per_step(num_parameters(self.model), mc.n_layer, mc.n_embd,
                                                   cfg.batch_size * self.micro_steps, mc.block_size,
                                                   mc.window)
        peak = device_peak_flops(self.device, cfg.peak_tflops * 1e12 if cfg.peak_tflops else None)
        return Progress(self.iter, cfg.max_iters, self.tokens_per_step, flops_per_device, peak,
                        show=cfg.progress and self.is_main)

    def _describe(self, kernel: str) -> str:
        cfg, mc = self.train_config, self.model_config
        return (f"fastgpt: {mc.model} with {num_parameters(self.model) / 1e6:.2f} M parameters on {self.device}"
                f"{f' × {self.world_size} processes' if self.world_size > 1 else ''}, attention backend "
                f"{mc.backend!r} -> kernel path {kernel}, dtype {cfg.dtype}{', compiled' if cfg.compile else ''}; "
                f"{self.tokens_per_step:,} tokens per step ({cfg.gradient_accumulation_steps} micro-batches of "
                f"{cfg.batch_size} × {mc.block_size})")

    def _finish(self, metrics: MetricsLog) -> None:
        """Rank 0, after the last step: the loss curve, a summary line and a sample."""
        png = self.out_dir / LOSS_CURVE_NAME
        try:
            from fastgpt.run.plots import plot_loss_curve  # matplotlib loads only when a run finishes

            plot_loss_curve(metrics.path, png)
            curve = f"loss curve {png}"
        except Exception as e:  # noqa: BLE001  the run is saved: a plot that fails must not fail it
            print(f"fastgpt train: warning: could not draw {png} ({e}); the checkpoint and metrics are kept, and "
                  "fastgpt.run.plots.plot_loss_curve draws it from the metrics", file=sys.stderr)
            curve = "no loss curve"
        print(f"fastgpt: {self.iter} iterations in {self.elapsed_s:.1f} s; metrics {metrics.path}, {curve}, "
              f"checkpoint {self.out_dir / CHECKPOINT_NAME}")
        if self.train_config.sample_tokens > 0:
            tokenizer = self.dataset.tokenizer
            prompt = "\n" if "\n" in tokenizer.stoi else tokenizer.chars[0]
            print(sample_text(self.model, tokenizer, prompt, self.train_config.sample_tokens, device=self.device))


def sample_text(model, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int, temperature: float = 1.0,
                top_k: Optional[int] = None, seed: Optional[int] = None, device: torch.device | str = "cpu") -> str:
    """The prompt followed by max_new_tokens sampled characters."""
    if not prompt:
        raise ValueError("prompt must hold at least one character to start from")
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return tokenizer.decode(out[0].tolist())
