"""Probe of session 23 (issue 4): does training the global model for on-device adaptation raise what a user ends
up with, beyond the same rounds of plain federated training?

From a trained federated model, `--rounds` more rounds of `--clients` users each (picked by their data size, as
the engine's "size" sampling does), every client on a window of `--support + --query` consecutive train messages:
- fedsgd: one gradient on the whole window (the shipped client's local work: one step of 16 messages);
- meta: first-order MAML whose inner loop is dynamic evaluation (one SGD step at `--inner-lr` on each support
  message, in the order sent), the client's gradient taken on the query messages at the adapted weights;
- reptile: an SGD step on every message of the window (FedAvg with per-message local steps, which Jiang et al.
  2019 read as Reptile), the client's mean step as its update.
The server applies the token-weighted mean with Adam at the shipped federated run's final server rate. Judge the
models with `fedkey bench phrase_ceiling --model OUT --dynamic-lr 0.03` against the model it started from.

    .venv/bin/python docs/results/personal23/meta_probe.py --run-dir runs/full21 --mode meta --out runs/meta1k
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from fedkey import pipeline as P
from keyboard.batches import frame, pad_batch
from keyboard.checkpoint import load_model, save_model
from keyboard.model import KeyboardLM
from keyboard.train import lm_loss


def client_update(model: KeyboardLM, win: list[list[int]], mode: str, support: int, inner_lr: float
                  ) -> tuple[list[torch.Tensor], int, float]:
    """One client's update direction (a gradient-like tensor per parameter), its token weight and last loss."""
    client = copy.deepcopy(model).train()
    cp = list(client.parameters())
    inner = torch.optim.SGD(cp, lr=inner_lr)
    if mode == "reptile":
        n = 0
        for m in win:
            loss, k = lm_loss(client, *pad_batch([m]))
            inner.zero_grad()
            loss.backward()
            inner.step()
            n += k
        return [(p.detach() - q.detach()) / (inner_lr * len(win)) for p, q in zip(model.parameters(), cp)], n, loss.item()
    batch = win
    if mode == "meta":
        for m in win[:support]:
            loss, _ = lm_loss(client, *pad_batch([m]))
            inner.zero_grad()
            loss.backward()
            inner.step()
        batch = win[support:]
    loss, n = lm_loss(client, *pad_batch(batch))
    client.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(cp, 1.0)
    return [p.grad for p in cp], n, loss.item()


def main() -> None:
    """Train the model further under one mode and save it as a model folder."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a run with a trained fl/ model")
    ap.add_argument("--mode", choices=("fedsgd", "meta", "reptile"), required=True)
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--support", type=int, default=8)
    ap.add_argument("--query", type=int, default=8)
    ap.add_argument("--inner-lr", type=float, default=0.03)
    ap.add_argument("--server-lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    model, tok, _ = load_model(a.run_dir / "fl")
    shards, _ = P.load_prepared(a.run_dir)
    seqs = {u: [frame(ids, 64) for ids in tok.encode_batch(shards.user_texts("train", u))] for u in shards.users("train")}
    W = a.support + a.query
    users = [u for u in seqs if len(seqs[u]) >= W]
    sizes = np.array([sum(map(len, seqs[u])) for u in users], float)
    print(len(users), "users with >=", W, "train messages", flush=True)
    rng = np.random.default_rng(a.seed)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=a.server_lr, betas=(0.9, 0.99), eps=1e-3)
    t0, losses = time.time(), []
    for r in range(a.rounds):
        total, wsum = [torch.zeros_like(p) for p in params], 0
        for i in rng.choice(len(users), a.clients, replace=False, p=sizes / sizes.sum()):
            s = seqs[users[i]]
            j = int(rng.integers(0, len(s) - W + 1))
            update, n, loss = client_update(model, s[j:j + W], a.mode, a.support, a.inner_lr)
            for t, g in zip(total, update):
                t += g * n
            wsum += n
            losses.append(loss)
        opt.zero_grad()
        for p, t in zip(params, total):
            p.grad = t / wsum
        opt.step()
        if (r + 1) % 100 == 0:
            print(f"round {r + 1} loss {np.mean(losses[-400:]):.4f} {time.time() - t0:.0f}s", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    save_model(a.out, model.eval(), tok, probe={k: str(v) for k, v in vars(a).items()})
    print("saved", a.out, f"{time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
