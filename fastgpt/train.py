"""The trainer: AdamW on random windows of the corpus, periodic evaluation, checkpoints, metrics.

    trainer = Trainer(model_config, train_config)      # or Trainer.resume(out_dir)
    trainer.run()                                      # the whole loop, with a progress bar
    trainer.step(); trainer.evaluate(); trainer.save() # or drive it yourself

Exact resume: a checkpoint taken at iteration i holds everything step i reads (weights,
optimizer moments, the batch sampler's RNG, torch's RNG for dropout), so a resumed run computes
the same loss at step i as the run that was interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from fastgpt.attention import select_backend
from fastgpt.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from fastgpt.config import ARCHITECTURE_FIELDS, TrainConfig, split_fields
from fastgpt.data import CharDataset, CharTokenizer
from fastgpt.model import GPT, ModelConfig, build_model, num_parameters

METRICS_NAME = "metrics.jsonl"
LOSS_CURVE_NAME = "loss_curve.png"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was asked for but this torch build sees no CUDA GPU; use --device cpu")
    return device


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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Decay the matrices and embeddings only: shrinking biases and LayerNorm gains toward zero
    # regularises nothing useful.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates every parameter in one pass (CPU and CUDA since torch 2.4).
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


class Trainer:
    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, dataset: Optional[CharDataset] = None):
        train_config.validate()
        self.train_config = cfg = train_config
        self.device = resolve_device(cfg.device)
        self.dataset = dataset if dataset is not None else CharDataset.load(cfg.data)
        model_config.vocab_size = self.dataset.tokenizer.vocab_size
        model_config.validate()
        self.dataset.check_block_size(model_config.block_size)
        self.model_config = model_config

        torch.manual_seed(cfg.seed)  # the weight init and dropout draw from torch's global RNG
        self.model = build_model(model_config).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.batch_generator = torch.Generator().manual_seed(cfg.seed)
        self.iter = 0  # the next optimisation step to take
        self.elapsed_s = 0.0  # wall time of the run so far, evaluations included, across resumes
        self.out_dir = Path(cfg.out_dir)

    # -- one step, one evaluation ------------------------------------------------------------

    def step(self) -> torch.Tensor:
        """One optimisation step at iteration self.iter; returns its (detached) training loss."""
        cfg = self.train_config
        lr = learning_rate_at(self.iter, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.dataset.get_batch("train", cfg.batch_size, self.model_config.block_size,
                                      self.batch_generator, self.device)
        self.model.train()
        _, loss = self.model(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.iter += 1
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_iters batches of each split, in eval mode (no dropout). The batches
        come from a generator reseeded each time, so every evaluation scores the same windows and
        the training RNG streams are left untouched."""
        cfg = self.train_config
        self.model.eval()
        losses = {}
        for split in ("train", "val"):
            generator = torch.Generator().manual_seed(cfg.seed + 1)
            total = torch.zeros((), device=self.device)
            for _ in range(cfg.eval_iters):
                x, y = self.dataset.get_batch(split, cfg.batch_size, self.model_config.block_size, generator, self.device)
                total += self.model(x, y)[1]
            losses[split] = (total / cfg.eval_iters).item()
        self.model.train()
        return losses

    def attention_backend(self) -> str:
        """The attention backend that training calls run ('auto' resolved), or 'none' (bigram)."""
        if not isinstance(self.model, GPT):
            return "none"
        mc = self.model_config
        probe = torch.empty(1, mc.n_head, mc.block_size, mc.n_embd // mc.n_head, device=self.device)
        return select_backend(probe, mc.dropout, mc.attention).name

    def set_attention_backend(self, name: str) -> None:
        self.model.set_attention_backend(name)
        self.model_config.attention = name

    # -- checkpoints ---------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "model_config": dataclasses.asdict(self.model_config),
            "train_config": dataclasses.asdict(self.train_config),
            "vocab": self.dataset.tokenizer.chars,
            "iter": self.iter,
            "elapsed_s": self.elapsed_s,
            "rng_cpu": torch.get_rng_state(),
            "rng_batches": self.batch_generator.get_state(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self) -> Path:
        path = self.out_dir / CHECKPOINT_NAME
        save_checkpoint(self.checkpoint_state(), path)
        return path

    @classmethod
    def resume(cls, out_dir: str | Path, overrides: Optional[dict[str, Any]] = None,
               dataset: Optional[CharDataset] = None) -> "Trainer":
        """The run saved in out_dir, ready to take its next step. `overrides` may change training
        settings (max_iters, attention, device, ...) but not the architecture."""
        state = load_checkpoint(Path(out_dir) / CHECKPOINT_NAME)
        values = {**state["model_config"], **state["train_config"], "out_dir": str(out_dir)}
        for name, value in (overrides or {}).items():
            if name in ARCHITECTURE_FIELDS and value != values.get(name):
                raise ValueError(f"cannot change {name} from {values.get(name)!r} to {value!r} when resuming")
            values[name] = value
        model_config, train_config = split_fields(values)
        trainer = cls(model_config, train_config, dataset)
        if trainer.dataset.tokenizer.chars != state["vocab"]:
            raise ValueError(
                "the corpus's vocabulary differs from the checkpoint's: resume with the corpus it was "
                f"trained on (--data {state['train_config']['data']})"
            )
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.iter = state["iter"]
        trainer.elapsed_s = state["elapsed_s"]
        torch.set_rng_state(state["rng_cpu"])
        trainer.batch_generator.set_state(state["rng_batches"])
        if trainer.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], trainer.device)
        return trainer

    # -- the loop ------------------------------------------------------------------------------

    def _prepare_metrics_file(self) -> Path:
        path = self.out_dir / METRICS_NAME
        self.out_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.iter > 0 and path.exists():  # resuming: drop records the interrupted run wrote past its checkpoint
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["iter"] <= self.iter]
        path.write_text("".join(line + "\n" for line in kept))
        return path

    def run(self) -> list[dict[str, Any]]:
        """Trains up to max_iters, evaluating and checkpointing every eval_interval steps and at the
        end; writes metrics.jsonl and the loss-curve PNG; prints a sample. Returns the metrics."""
        cfg = self.train_config
        metrics_path = self._prepare_metrics_file()
        backend = self.attention_backend()
        tokens_per_step = cfg.batch_size * self.model_config.block_size
        print(f"fastgpt: {self.model_config.model} with {num_parameters(self.model) / 1e6:.2f} M parameters on "
              f"{self.device}, attention backend {self.model_config.attention!r} -> {backend}")

        records = []
        bar = tqdm(total=cfg.max_iters, initial=self.iter, disable=not cfg.progress, unit="it", dynamic_ncols=True)
        run_start = time.perf_counter() - self.elapsed_s
        window_start, window_steps, window_train_s = self.iter, 0, 0.0
        resumed_at = self.iter if self.iter > 0 else None
        loss = None
        while True:
            last = self.iter >= cfg.max_iters
            if (self.iter % cfg.eval_interval == 0 or last) and self.iter != resumed_at:
                losses = self.evaluate()
                self.elapsed_s = time.perf_counter() - run_start
                record = {
                    "iter": self.iter,
                    "train_loss": losses["train"],
                    "val_loss": losses["val"],
                    "tokens_per_s": window_steps * tokens_per_step / window_train_s if window_train_s else None,
                    "elapsed_s": self.elapsed_s,
                    "backend": backend,
                    "lr": learning_rate_at(max(self.iter - 1, 0), cfg),
                }
                records.append(record)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                self.save()
                bar.write(f"step {self.iter}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                window_steps, window_train_s = 0, 0.0
            if last:
                break
            t0 = time.perf_counter()
            loss = self.step()
            window_steps += 1
            if self.iter % 10 == 0 or self.iter == cfg.max_iters:
                loss_value = loss.item()  # a device sync: only every few steps
                window_train_s += time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{window_steps * tokens_per_step / window_train_s:,.0f}", refresh=False)
                bar.update(self.iter - bar.n)
            else:
                window_train_s += time.perf_counter() - t0
        bar.close()
        self.elapsed_s = time.perf_counter() - run_start

        from fastgpt.plots import plot_loss_curve  # matplotlib loads only when a run finishes

        png = plot_loss_curve(metrics_path, self.out_dir / LOSS_CURVE_NAME)
        print(f"fastgpt: {self.iter} iterations in {self.elapsed_s:.1f} s; metrics {metrics_path}, loss curve {png}, "
              f"checkpoint {self.out_dir / CHECKPOINT_NAME}")
        if cfg.sample_tokens > 0:
            tokenizer = self.dataset.tokenizer
            prompt = "\n" if "\n" in tokenizer.stoi else tokenizer.chars[0]
            print(sample_text(self.model, tokenizer, prompt, cfg.sample_tokens, device=self.device))
        return records


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
