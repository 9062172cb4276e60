"""The training loop: AdamW with warmup + cosine decay, gradient accumulation and clipping, periodic validation,
atomic checkpoints, exact resume, and a stop with a clear message if the loss stops being a number.

Exact resume needs every source of randomness to be restorable. There is only one here, the choice of
training windows, and it is re-seeded from (seed, step, rank, micro-step) at every step, so step N draws the
same batch whether or not the run was interrupted before it.
"""

import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from toymodel import checkpoint as ckpt
from toymodel.config import ModelConfig
from toymodel.convert import mha_to_gqa
from corpus.mix import IGNORE, MixSampler
from corpus.tokenizer import get_tokenizer
from corpus.windows import eval_batches, sample_batch
from toymodel.model import Transformer
from toymodel.threads import governed_step, thread_policy
from training.config import OptimConfig, TrainConfig, model_config
from training.distributed import DistInfo, mean_across_ranks
from training.probe import MIN_LENGTH, passkey_accuracy
from training.precision import autocast, resolve_dtype


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to min_lr_ratio * lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def seq_len_at(step: int, cfg: OptimConfig, block_size: int) -> int:
    """The row length at `step`: cfg.seq_len_start, rising linearly in multiples of 64 to block_size at step
    cfg.seq_warmup_steps, then block_size (at once when seq_warmup_steps is 0)."""
    if step >= cfg.seq_warmup_steps:
        return block_size
    start = min(cfg.seq_len_start, block_size)
    length = start + (block_size - start) * step / cfg.seq_warmup_steps
    return max(start, int(length) // 64 * 64)


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW that decays matrices (embeddings, projections) but not the norms' gains."""
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over each row's scored targets and then over rows, so that every row
    weighs the same: a task row of data=mix scores its answer and stop (corpus/mix.py; the rest is IGNORE),
    a row of plain text all of its tokens. logits (B, T, V), targets (B, T)."""
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                reduction="none").view_as(targets)  # (B, T), 0 where ignored
    scored = (targets != IGNORE).sum(dim=1).clamp(min=1)  # (B,)
    return (per_token.sum(dim=1) / scored).mean()


def batch_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """A generator whose state depends only on where we are in training (see the module docstring)."""
    return torch.Generator().manual_seed(hash((seed, step, rank, micro)) & 0x7FFF_FFFF_FFFF_FFFF)


def _config_differences(a: ModelConfig, b: ModelConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    return [f"{k}: checkpoint {v} vs requested {getattr(b, k)}" for k, v in asdict(a).items()
            if k not in ignore and v != getattr(b, k)]


Batches = Callable[[int, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # (B, T, generator) -> x, y


def batch_source(cfg: TrainConfig, tokens: np.ndarray) -> Batches:
    """What draws a training batch (x, y) of B rows of T tokens from a generator: random windows of `tokens`, or,
    with data.mix weights, rows of the mixture of plays and task samples (corpus/mix.py)."""
    if not cfg.data.mix:
        return lambda batch_size, seq_len, generator: sample_batch(tokens, batch_size, seq_len, generator)
    block_size = cfg.model.block_size
    shortest = min(cfg.train.seq_len_start, block_size) if cfg.train.seq_warmup_steps else block_size
    return MixSampler(tokens, dict(cfg.data.mix), shortest, get_tokenizer(), cfg.data.key_digits).batch


class Trainer:
    """Owns the model, the optimizer and the step counter of one training run."""

    def __init__(self, cfg: TrainConfig, train_tokens: np.ndarray, val_tokens: np.ndarray, run_dir: Path,
                 device: torch.device, dist: DistInfo = DistInfo(), logger=None, extra_meta: dict | None = None):
        self.cfg, self.opt_cfg, self.run_dir, self.device, self.dist = cfg, cfg.train, Path(run_dir), device, dist
        self.val_tokens = val_tokens
        self.next_batch = batch_source(cfg, train_tokens)
        self.logger, self.extra_meta = logger, extra_meta or {}
        self.model_config = model_config(cfg)
        torch.manual_seed(self.opt_cfg.seed)
        self.model = Transformer(self.model_config, backend=cfg.attn.backend).to(device)
        self.optimizer = make_optimizer(self.model, self.opt_cfg)
        self.step = 0
        if dist.is_main:  # what a killed save left behind (temporary folders of processes that are gone)
            ckpt.remove_stale_temporaries(self.run_dir)
        if cfg.resume:
            self._resume()
        elif cfg.init_from:
            self._init_from(cfg.init_from)
        self.train_model = self.model
        if self.opt_cfg.compile:
            self.train_model = torch.compile(self.train_model)
        if dist.world_size > 1:
            self.train_model = DistributedDataParallel(self.train_model)
        self.dtype = resolve_dtype(self.opt_cfg.dtype, device)  # what train.dtype=auto means here
        self.threads = thread_policy(cfg.threads, device)  # None: a fixed count; else it times every step
        self.autocast = autocast(self.dtype, device)  # products in bf16, master weights and Adam state in fp32

    def _resume(self) -> None:
        if not (self.run_dir / ckpt.LATEST).is_file():
            raise FileNotFoundError(f"resume=true but {self.run_dir} holds no checkpoint; drop resume=true to start")
        ckpt_dir = ckpt.resolve_checkpoint(self.run_dir)
        diffs = _config_differences(ckpt.load_model_config(ckpt_dir), self.model_config)
        if diffs:
            raise ValueError(f"cannot resume from {ckpt_dir}: its model differs ({'; '.join(diffs)})")
        ckpt.load_weights(self.model, ckpt_dir)
        ckpt.load_optimizer(self.optimizer, ckpt_dir)
        self.step = ckpt.read_meta(ckpt_dir)["step"]

    def _init_from(self, path: str) -> None:
        """Start from another checkpoint's weights, pooling K/V heads if it is MHA and this model is not."""
        ckpt_dir = ckpt.resolve_checkpoint(path)
        source = ckpt.load_model_config(ckpt_dir)
        diffs = _config_differences(source, self.model_config, ignore=("n_kv_head",))
        if diffs:
            raise ValueError(f"init_from={path}: the checkpoint's model differs ({'; '.join(diffs)})")
        state = ckpt.load_state_dict(ckpt_dir)
        if source.n_kv_head != self.model_config.n_kv_head:
            state, _ = mha_to_gqa(state, source, self.model_config.n_kv_head)
        ckpt.load_weights(self.model, ckpt_dir, state)

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step over grad_accum micro-batches. Returns (mean loss across ranks, grad norm, tokens
        this rank trained on)."""
        cfg, block_size = self.opt_cfg, self.model_config.block_size
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.step, cfg)
        seq_len = seq_len_at(self.step, cfg, block_size)
        rows = cfg.batch_size * block_size // seq_len  # shorter rows, more of them: the same tokens per step
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.next_batch(rows, seq_len, batch_generator(cfg.seed, self.step, self.dist.rank, micro))
            x, y = x.to(self.device), y.to(self.device)
            last = micro == cfg.grad_accum - 1
            # DDP averages gradients in backward; between accumulation micro-steps that would be wasted work.
            sync = self.train_model.no_sync() if (self.dist.world_size > 1 and not last) else nullcontext()
            with sync, self.autocast:
                loss = lm_loss(self.train_model(x), y) / cfg.grad_accum
            loss.backward()
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        loss = mean_across_ranks(total, self.dist).item()
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss} at step {self.step}; training stopped without saving, so the last good "
                f"checkpoint in {self.run_dir} is intact. Try a lower train.lr (now {cfg.lr}) or train.grad_clip"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, grad_norm.item(), rows * seq_len * cfg.grad_accum

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over evenly spaced windows of the validation split (the same windows every time)."""
        self.model.eval()
        losses = []
        for x, y in eval_batches(self.val_tokens, self.opt_cfg.batch_size, self.model_config.block_size,
                                 self.opt_cfg.eval_batches):
            with self.autocast:
                losses.append(lm_loss(self.model(x.to(self.device)), y.to(self.device)))
        self.model.train()
        return mean_across_ranks(torch.stack(losses).mean(), self.dist).item()

    @torch.no_grad()
    def probe(self) -> float:
        """Passkey accuracy on held-out samples at the current row length and key length (training/probe.py)."""
        self.model.eval()
        length = seq_len_at(self.step, self.opt_cfg, self.model_config.block_size)
        with self.autocast:
            accuracy = passkey_accuracy(self.model, get_tokenizer(), self.val_tokens, length, self.cfg.data.key_digits)
        self.model.train()
        return accuracy

    def save(self) -> Path | None:
        if not self.dist.is_main:
            return None
        return ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.model_config, self.optimizer,
                                    extra=self.extra_meta, keep=self.opt_cfg.keep_checkpoints)

    def run(self, until_step: int | None = None) -> dict:
        """Train from the current step to until_step (default max_steps); checkpoint on the way and at the end."""
        cfg = self.opt_cfg
        until = cfg.max_steps if until_step is None else until_step
        bar = tqdm(total=until, initial=self.step, desc="train", unit="step", disable=not self.dist.is_main,
                   dynamic_ncols=True)
        summary: dict = {"params": self.model.num_params(), "dtype": self.dtype,
                         "kv_bytes_per_token": self.model_config.kv_bytes_per_token()}
        tokens_per_s, t_start, tokens_timed = 0.0, time.perf_counter(), 0
        while self.step < until:
            t0 = time.perf_counter()
            with governed_step(self.threads):
                loss, grad_norm, tokens = self.train_step()
            tokens *= self.dist.world_size
            tokens_per_s = tokens / (time.perf_counter() - t0)
            tokens_timed += tokens
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", threads=torch.get_num_threads())
            if self.step % self.cfg.logger.log_interval == 0 or self.step == until:
                self._log({"train/loss": loss, "train/lr": lr_at(self.step - 1, cfg), "train/grad_norm": grad_norm,
                           "train/tokens_per_s": tokens_per_s})
            summary["train_loss"] = loss
            if self.step % cfg.eval_interval == 0 or self.step == until:
                val = self.evaluate()
                summary.update(val_loss=val, val_ppl=math.exp(val))
                metrics = {"val/loss": val, "val/ppl": math.exp(val)}
                if self.cfg.data.mix and self.model_config.block_size >= MIN_LENGTH:
                    metrics["val/passkey_accuracy"] = summary["passkey_accuracy"] = self.probe()
                self._log(metrics)
                probe = f"  passkey {metrics['val/passkey_accuracy']:.0%}" if "val/passkey_accuracy" in metrics else ""
                bar.write(f"step {self.step:>6}: train loss {loss:.4f}  val loss {val:.4f}  "
                          f"val ppl {math.exp(val):.1f}{probe}")
            if self.step % cfg.ckpt_interval == 0 or self.step == until:
                summary["checkpoint"] = str(self.save())
        bar.close()
        elapsed = time.perf_counter() - t_start
        summary.update(steps=self.step, mean_tokens_per_s=tokens_timed / elapsed if tokens_timed else 0.0,
                       threads=torch.get_num_threads())
        if self.logger is not None:
            self.logger.summary(summary)
        return summary

    def _log(self, metrics: dict) -> None:
        if self.logger is not None:
            self.logger.log(metrics, step=self.step)
