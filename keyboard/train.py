"""Centralized training of the keyboard model: the upper bound federated training is compared with."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedkey.config import CentralConfig, to_dict
from fedkey.errors import FedkeyError
from fedkey.io import load_torch, save_torch
from keyboard.batches import iterate_epoch
from keyboard.model import KeyboardLM
from keyboard.tokenizer import PAD

STATE_FILE = "train_state.pt"
# settings a resumed run may change: they decide how fast it runs, not what it computes
RUNTIME = {"threads", "max_minutes"}


@dataclass
class TrainProgress:
    """What the progress bar shows."""

    tokens: int
    loss: float
    tokens_per_s: float
    done: bool = False


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-piece cross-entropy over real (non-padding) targets, and their count."""
    logits, _ = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=PAD)
    return loss, int((y != PAD).sum())


def train_central(
    model: KeyboardLM,
    seqs: list[list[int]],
    cfg: CentralConfig,
    out_dir: str | Path,
    resume: bool = False,
    on_progress: Callable[[TrainProgress], None] | None = None,
    checkpoint_every_s: float = 30.0,
) -> dict:
    """Train on framed messages until cfg.max_tokens real tokens (or cfg.max_minutes); resumable."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_FILE
    # the fused kernel updates all parameters in one pass: ~10% of a step at this model size
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    epoch, batch_idx, tokens, elapsed, loss_ema = 0, 0, 0, 0.0, None
    if resume and state_path.exists():
        st = load_torch(state_path)
        saved, now = st["config"], to_dict(cfg)
        differ = sorted(k for k in saved.keys() | now.keys() if k not in RUNTIME and saved.get(k) != now.get(k))
        if differ:
            raise FedkeyError(f"{state_path}: was trained with other settings ({', '.join(differ)}); "
                              f"use the same ones, or delete {state_path.parent} to start over")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        epoch, batch_idx, tokens, elapsed, loss_ema = st["epoch"], st["batch_idx"], st["tokens"], st["elapsed"], st["loss_ema"]

    def checkpoint() -> None:
        save_torch(state_path, {"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch,
                                "batch_idx": batch_idx, "tokens": tokens, "elapsed": elapsed,
                                "loss_ema": loss_ema, "config": to_dict(cfg)})

    def lr_at(tokens: int) -> float:
        # short linear warm-up, then cosine decay to 2% over the token budget: a decayed rate
        # is worth a large share of a short run's final loss
        frac = min(1.0, tokens / max(1, cfg.max_tokens))
        warm = min(1.0, tokens / max(1, cfg.warmup_tokens)) if cfg.warmup_tokens else 1.0
        return cfg.lr * warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else float("inf")
    start, last_ckpt = time.perf_counter() - elapsed, time.perf_counter()
    run_tokens, run_start = 0, time.perf_counter()
    done = tokens >= cfg.max_tokens or elapsed >= budget_s
    while not done:
        for i, (x, y) in enumerate(iterate_epoch(seqs, cfg.batch_size, cfg.seed, epoch)):
            if i < batch_idx:
                continue
            for group in opt.param_groups:
                group["lr"] = lr_at(tokens)
            loss, n = lm_loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            tokens += n
            run_tokens += n
            batch_idx = i + 1
            lv = loss.item()
            loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
            now = time.perf_counter()
            elapsed = now - start
            done = tokens >= cfg.max_tokens or elapsed >= budget_s
            if on_progress:
                on_progress(TrainProgress(tokens, loss_ema, run_tokens / max(now - run_start, 1e-9), done))
            if now - last_ckpt > checkpoint_every_s:
                checkpoint()
                last_ckpt = now
            if done:
                break
        else:
            epoch, batch_idx = epoch + 1, 0
    if run_tokens or not state_path.exists():  # a finished run resumed (a shared pretrained start) has nothing new
        checkpoint()
    model.eval()
    return {"tokens": tokens, "seconds": elapsed, "loss": loss_ema, "epochs": epoch + batch_idx / max(1, np.ceil(len(seqs) / cfg.batch_size))}
