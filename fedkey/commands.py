"""What each subcommand does: build configs, call the pipeline stage, print tables, write --json."""

from __future__ import annotations

import argparse
import statistics
import time

from fedkey import config as C
from fedkey import pipeline as P
from fedkey.io import write_json
from fedkey.tables import console, dataset_table, print_eval


def cmd_prepare(args: argparse.Namespace) -> None:
    """fedkey prepare."""
    cfg = C.from_args(C.PrepareConfig, args)
    res = P.prepare_stage(args.run_dir, cfg, progress=not args.no_progress)
    console.print(dataset_table(res["rows"], res["skips"]))
    console.print(("unchanged inputs: nothing to do" if res["skipped"] else f"prepared in {res['seconds']:.1f} s")
                  + f"; shards in {args.run_dir / P.DATA}")
    if args.json:
        write_json(args.json, res)


def cmd_train_central(args: argparse.Namespace) -> None:
    """fedkey train-central."""
    mcfg, ccfg = C.from_args(C.ModelConfig, args), C.from_args(C.CentralConfig, args)
    res = P.central_stage(args.run_dir, mcfg, ccfg, resume=args.resume, progress=not args.no_progress)
    what = "already trained with these settings" if res.get("skipped") else "trained"
    console.print(f"centralized model {what}: {res['tokens']:,} tokens in {res['seconds']:.0f} s, "
                  f"loss {res['loss']:.3f} -> {args.run_dir / P.CENTRAL}")
    if args.json:
        write_json(args.json, res)


def cmd_evaluate(args: argparse.Namespace) -> None:
    """fedkey evaluate."""
    ecfg = C.from_args(C.EvalConfig, args)
    model_dir = args.model or args.run_dir / P.CENTRAL
    res = P.evaluate_stage(args.run_dir, model_dir, ecfg, progress=not args.no_progress,
                           json_path=args.json, with_ngram=not args.no_ngram)
    print_eval(res, f"{model_dir} on {ecfg.split}")


def cmd_bench(args: argparse.Namespace) -> None:
    """fedkey bench central: training tokens/s, median of repeats."""
    import torch

    from keyboard.batches import iterate_epoch
    from keyboard.model import KeyboardLM
    from keyboard.train import lm_loss

    mcfg, ccfg = C.from_args(C.ModelConfig, args), C.from_args(C.CentralConfig, args)
    shards, tok = P.load_prepared(args.run_dir)
    seqs = P.encode_split(shards, tok, "train", ccfg.max_len)
    torch.manual_seed(ccfg.seed)
    model = KeyboardLM(tok.vocab_size, mcfg)
    opt = torch.optim.Adam(model.parameters(), lr=ccfg.lr)
    batches = iterate_epoch(seqs, ccfg.batch_size, ccfg.seed, 0)
    rates = []
    for _ in range(args.repeats + 1):  # the first repeat warms up and is dropped
        n, t0 = 0, time.perf_counter()
        for _, (x, y) in zip(range(args.steps), batches):
            loss, k = lm_loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += k
        rates.append(n / (time.perf_counter() - t0))
    rate = statistics.median(rates[1:])
    console.print(f"central training: {rate:,.0f} real tokens/s (median of {args.repeats} x {args.steps} steps, "
                  f"batch {ccfg.batch_size} messages, {torch.get_num_threads()} threads)")
    if args.json:
        write_json(args.json, {"central_tokens_per_s": rate, "repeats": rates[1:]})


def cmd_run(args: argparse.Namespace) -> None:
    """fedkey run: every stage in order, skipping those whose inputs did not change."""
    progress = not args.no_progress
    pcfg = C.from_args(C.PrepareConfig, args)
    res = P.prepare_stage(args.run_dir, pcfg, progress=progress)
    console.print(dataset_table(res["rows"], res["skips"]))
    mcfg, ccfg = C.from_args(C.ModelConfig, args), C.from_args(C.CentralConfig, args)
    # an interrupted run continues from its checkpoint: resume is always safe, the config is checked
    P.central_stage(args.run_dir, mcfg, ccfg, resume=True, progress=progress)
    ecfg = C.from_args(C.EvalConfig, args)
    ev = P.evaluate_stage(args.run_dir, args.run_dir / P.CENTRAL, ecfg, progress=progress, json_path=args.json)
    print_eval(ev, f"centralized model on {ecfg.split}")
