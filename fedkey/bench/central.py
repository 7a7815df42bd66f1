"""Centralized training throughput: real (non-padding) tokens per second, median of repeats."""

from __future__ import annotations

import argparse
import statistics
import time

from fedkey import config as C
from fedkey import pipeline as P
from fedkey.io import write_json
from fedkey.tables import console


def add_flags(p: argparse.ArgumentParser) -> None:
    """Flags of this benchmark."""
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    p.add_argument("--steps", type=int, default=20, help="training steps per repeat")
    C.add_flags(p, C.ModelConfig)
    C.add_flags(p, C.CentralConfig)


def central_tokens_per_s(seqs: list[list[int]], vocab_size: int, mcfg: C.ModelConfig, ccfg: C.CentralConfig,
                         repeats: int, steps: int) -> list[float]:
    """Tokens/s of `repeats` timed runs of `steps` Adam steps (after one warm-up run)."""
    import torch

    from keyboard.batches import iterate_epoch
    from keyboard.model import KeyboardLM
    from keyboard.train import lm_loss

    torch.manual_seed(ccfg.seed)
    model = KeyboardLM(vocab_size, mcfg)
    opt = torch.optim.Adam(model.parameters(), lr=ccfg.lr)
    batches = iterate_epoch(seqs, ccfg.batch_size, ccfg.seed, 0)
    rates = []
    for _ in range(repeats + 1):
        n, t0 = 0, time.perf_counter()
        for _, (x, y) in zip(range(steps), batches):
            loss, k = lm_loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += k
        rates.append(n / (time.perf_counter() - t0))
    return rates[1:]


def run(args: argparse.Namespace) -> None:
    """Measure and print central training tokens/s."""
    import torch

    mcfg, ccfg = C.from_args(C.ModelConfig, args), C.from_args(C.CentralConfig, args)
    shards, tok = P.load_prepared(args.run_dir)
    seqs = P.encode_split(shards, tok, "train", ccfg.max_len)
    rates = central_tokens_per_s(seqs, tok.vocab_size, mcfg, ccfg, args.repeats, args.steps)
    rate = statistics.median(rates)
    console.print(f"central training: {rate:,.0f} real tokens/s (median of {args.repeats} x {args.steps} steps, "
                  f"batch {ccfg.batch_size} messages, {torch.get_num_threads()} threads)")
    if args.json:
        write_json(args.json, {"central_tokens_per_s": rate, "repeats": rates})
