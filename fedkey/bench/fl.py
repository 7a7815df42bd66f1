"""Federated vs centralized training speed: real (non-padding) tokens/s of both, interleaved in one run.

Both sides train the same model (same size, same initial weights) on the same training
users' messages for the same number of real tokens, with the same batch size (messages
per step; per client for federated). Centralized is the production trainer's step
(keyboard.train: nn.LSTM on length-bucketed padded batches, Adam, clipping, all torch
threads). Federated is the whole engine (fl_core.simulation rounds: fleet, selection,
reading and encoding each client's messages from the shards, local SGD, compression,
aggregation, server optimizer, checkpoints as a real run writes them; no evaluation). The two
alternate in chunks so machine load hits both alike; the ratio is of the totals.
`--same-math` also times centralized training through the federated step's code (packed
rows, hand-batched LSTM, SGD), to separate the engine's gains from the step's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

from fedkey import config as C
from fedkey import pipeline as P
from fedkey.io import write_json
from fedkey.tables import console
from fl_core.config import FleetConfig, FLConfig


def add_flags(p: argparse.ArgumentParser) -> None:
    """Flags of this benchmark."""
    p.add_argument("--tokens", type=int, default=60_000, help="real tokens each side trains on in total")
    p.add_argument("--repeats", type=int, default=3, help="interleaved chunks the tokens are split into")
    p.add_argument("--same-math", action="store_true", help="also time centralized training with the federated step")
    p.add_argument("--central-threads", default="0,1",
                   help="torch thread counts to time centralized training with (0: all cores, the trainer's default); "
                        "`ratio` is against the first")
    C.add_flags(p, C.ModelConfig)
    C.add_flags(p, FLConfig)


class _Central:
    """The production centralized step (as keyboard.train.train_central runs it)."""

    def __init__(self, seqs, vocab: int, mcfg: C.ModelConfig, batch: int, seed: int, same_math: bool) -> None:
        import torch

        from keyboard.batches import iterate_epoch
        from keyboard.model import KeyboardLM

        torch.manual_seed(seed)
        self.model = KeyboardLM(vocab, mcfg)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.batches = (b for epoch in range(1000) for b in iterate_epoch(seqs, batch, seed, epoch))
        self.same_math = same_math
        if same_math:  # the federated step's code on the central batches
            from fedkey.fl_task import KeyboardTask
            from fl_core.params import ParamSpec

            self.spec = ParamSpec.of(self.model)
            self.task = KeyboardTask(None, None, self.model, batch, 10**9, 64)
            self.flat = self.spec.flatten(dict(self.model.named_parameters()))
            self.raw = (b for epoch in range(1000) for b in _raw_epoch(seqs, batch, seed, epoch))

    def train(self, tokens: int) -> tuple[int, float]:
        """Train until `tokens` real tokens; (tokens, seconds)."""
        import torch

        from fl_core.client import ClientData, local_train
        from keyboard.train import lm_loss

        n, t0 = 0, time.perf_counter()
        if self.same_math:
            batches, n = [], 0
            while n < tokens:
                b = next(self.raw)
                batches.append(b)
                n += sum(len(s) - 1 for s in b)
            t0 = time.perf_counter()
            self.flat, _ = local_train(self.task, self.spec, self.flat, ClientData(batches, 0, n), 0.1, 1.0)
            return n, time.perf_counter() - t0
        while n < tokens:
            x, y = next(self.batches)
            loss, k = lm_loss(self.model, x, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            n += k  # lm_loss counts real targets only
        return n, time.perf_counter() - t0


@contextlib.contextmanager
def _threads(n: int):
    """Run a block with n torch threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _raw_epoch(seqs, batch: int, seed: int, epoch: int):
    import numpy as np

    from keyboard.batches import bucketed_order

    rng = np.random.default_rng([seed, epoch])
    for idx in bucketed_order(np.array([len(s) for s in seqs]), batch, rng):
        yield [seqs[i] for i in idx]


def run(args: argparse.Namespace) -> None:
    """Measure and print both throughputs and their ratio."""
    import torch

    from fedkey.fl_stage import build_simulation

    mcfg = C.from_args(C.ModelConfig, args)
    fcfg = C.from_args(FLConfig, args)
    fcfg = C.build(FLConfig, None, {**C.to_dict(fcfg), "eval_every": 0, "max_tokens": 10**12,
                                             "pretrain_epochs": 0.0})  # speed only: no server pretraining
    shards, tok = P.load_prepared(args.run_dir)
    seqs = P.encode_split(shards, tok, "train", fcfg.max_len)
    counts = [int(x) for x in args.central_threads.split(",") if x.strip()]
    centrals = {n: _Central(seqs, tok.vocab_size, mcfg, fcfg.batch_size, fcfg.seed, False) for n in counts}
    same = _Central(seqs, tok.vocab_size, mcfg, fcfg.batch_size, fcfg.seed, True) if args.same_math else None
    chunk = max(1, args.tokens // args.repeats)
    totals = {"fl": [0, 0.0], "same": [0, 0.0], **{f"central{n}": [0, 0.0] for n in counts}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedkey-bench-fl-") as tmp:
        sim, _, _ = build_simulation(args.run_dir, mcfg, fcfg, FleetConfig(), Path(tmp))
        sim.checkpoint()
        threads = torch.get_num_threads()
        for n, central in centrals.items():  # warm-up of every side, untimed
            with _threads(n or threads):
                central.train(2_000)
        sim.run_round()
        sim.maybe_checkpoint()
        for rep in range(args.repeats):
            row = {}
            for n, central in centrals.items():
                with _threads(n or threads):
                    n_c, s_c = central.train(chunk)
                totals[f"central{n}"][0] += n_c
                totals[f"central{n}"][1] += s_c
                row[f"central_{n or threads}_threads_tokens_per_s"] = n_c / s_c
            row["central_tokens_per_s"] = row[f"central_{counts[0] or threads}_threads_tokens_per_s"]
            t0, n_f, rounds = time.perf_counter(), 0, 0
            while n_f < chunk:
                n_f += sim.run_round()["tokens"]
                sim.maybe_checkpoint()
                rounds += 1
            s_f = time.perf_counter() - t0
            row.update({"fl_tokens_per_s": n_f / s_f, "fl_rounds": rounds})
            totals["fl"][0] += n_f
            totals["fl"][1] += s_f
            if same is not None:
                n_s, s_s = same.train(chunk)
                totals["same"][0] += n_s
                totals["same"][1] += s_s
                row["central_same_math_tokens_per_s"] = n_s / s_s
            row["ratio"] = row["fl_tokens_per_s"] / row["central_tokens_per_s"]
            rows.append(row)
            console.print(f"chunk {rep + 1}/{args.repeats}: central {row['central_tokens_per_s']:,.0f} tok/s, "
                          f"federated {row['fl_tokens_per_s']:,.0f} tok/s ({rounds} rounds), ratio {row['ratio']:.2f}")
    by_threads = {n or threads: totals[f"central{n}"][0] / totals[f"central{n}"][1] for n in counts}
    c_rate = by_threads[counts[0] or threads]
    f_rate = totals["fl"][0] / totals["fl"][1]
    best = max(by_threads.values())
    out = {"central_tokens_per_s": c_rate, "fl_tokens_per_s": f_rate, "ratio": f_rate / c_rate,
           "central_by_threads": by_threads, "ratio_vs_best_central": f_rate / best,
           "tokens_each": totals[f"central{counts[0]}"][0], "fl_tokens": totals["fl"][0], "batch_size": fcfg.batch_size,
           "clients_per_round": fcfg.clients_per_round, "executor": fcfg.executor,
           "torch_threads": threads, "load_avg_1min": os.getloadavg()[0], "chunks": rows}
    if same is not None:
        out["central_same_math_tokens_per_s"] = totals["same"][0] / totals["same"][1]
    console.print(f"centralized {c_rate:,.0f} real tokens/s, federated {f_rate:,.0f} real tokens/s: "
                  f"ratio {f_rate / c_rate:.2f} (batch {fcfg.batch_size} messages, {fcfg.clients_per_round} clients/round, "
                  f"{fcfg.executor} executor, {threads} threads, load average {out['load_avg_1min']:.1f})")
    console.print("centralized by torch threads: " + ", ".join(f"{n}: {r:,.0f} tokens/s" for n, r in by_threads.items())
                  + f"; federated / best centralized: {f_rate / best:.2f}")
    if same is not None:
        console.print(f"centralized through the federated step's code: {out['central_same_math_tokens_per_s']:,.0f} tokens/s")
    if args.json:
        write_json(args.json, out)
