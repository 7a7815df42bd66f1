"""The federated training stage: fl_core's simulation over a prepared run's training users.

Reads runs/<name>/data and the tokenizer; writes runs/<name>/<out>/ (default `fl`): the
model dir (model.pt + tokenizer.model, loadable by keyboard.checkpoint.load_model),
config.toml, checkpoint.pt (+ .prev), history.jsonl (one line per round), plots/*.png,
eval_test.json and eval_heldout_test.json (final evaluation with the [eval] settings).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedkey import config as C
from fedkey.errors import FedkeyError
from fedkey.io import atomic_write_bytes, read_json, write_json
from fedkey.pipeline import CENTRAL, DATA, evaluate_stage, load_prepared, public_start
from fedkey.progress import bar
from fedkey.stages import is_done, mark_done, stage_key
from fl_core.config import FleetConfig, FLConfig
from fl_core.params import ParamSpec
from fl_core.simulation import Simulation

if TYPE_CHECKING:
    from data.shards import Shards
    from fl_core.aggregate import Aggregator
    from fl_core.privacy.config import PrivacyConfig
    from keyboard.model import KeyboardLM
    from keyboard.tokenizer import Tokenizer

FL = "fl"
HISTORY = "history.jsonl"
START = "start.json"  # what public_start returned for this stage
# typical UTC offsets of the corpus' two regions: US users spread over the four mainland zones
TZ = {"US": (-5.0, -6.0, -7.0, -8.0), "GB": (0.0,)}


def region_time_zones(shards: Shards, users: list[str], seed: int) -> np.ndarray:
    """A UTC offset per user from their region (seeded), so availability follows real day/night."""
    rng = np.random.default_rng([seed, 7300])
    return np.array([rng.choice(TZ.get(shards.region(u), (0.0,))) for u in users], dtype=np.float64)


def build_simulation(run_dir: Path, mcfg: C.ModelConfig, fcfg: FLConfig, fleet: FleetConfig, out_dir: Path,
                     aggregator: Aggregator | None = None,
                     evaluate: Callable[[int, torch.Tensor], dict[str, Any]] | None = None,
                     progress: bool = False) -> tuple[Simulation, KeyboardLM, Tokenizer]:
    """The simulation over the run's training users, its model template and the tokenizer."""
    from fedkey.fl_task import KeyboardTask

    shards, tok = load_prepared(run_dir)
    users = shards.users("train")
    if not users:
        raise FedkeyError(f"{run_dir / DATA}: no training users; prepare with more users or a lower --min-words")
    # the same seed and passes give the centralized baseline's start
    model, pre = public_start(run_dir, mcfg, shards, tok, fcfg.pretrain_epochs, fcfg.seed, fcfg.max_len, fcfg.threads,
                              progress)
    # the stage's result names the start it trained from
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / START, pre or {})
    spec = ParamSpec.of(model, fcfg.local_patterns())
    task = KeyboardTask(shards, tok, model, fcfg.batch_size, fcfg.max_messages, fcfg.max_len, fcfg.local_epochs)
    sim = Simulation(task, spec, users, spec.flatten(dict(model.named_parameters())), fcfg, fleet, out_dir,
                     aggregator=aggregator, tz_hours=region_time_zones(shards, users, fcfg.seed), evaluate=evaluate)
    return sim, model, tok


class QuickEval:
    """Cheap evaluation during training: a seeded sample of word positions of the test splits."""

    def __init__(self, run_dir: Path, model: KeyboardLM, tok: Tokenizer, positions: int, seed: int = 0) -> None:
        from keyboard.evaluate import Message

        shards, _ = load_prepared(run_dir)
        self.model, self.tok = model, tok
        self.cfg = C.EvalConfig(max_positions=positions, ksr_messages=0, seed=seed)
        self.msgs = {}
        for split in ("test", "heldout_test"):
            ds = shards.dataset(split)
            self.msgs[split] = [Message(u, r, t) for u, r, t in zip(ds["user"], ds["region"], ds["text"])]

    def __call__(self, round_: int, flat: torch.Tensor, spec: ParamSpec) -> dict[str, Any]:
        """top-1/top-3/perplexity (pooled) on both test splits."""
        from keyboard.evaluate import evaluate

        spec.load_into(self.model, flat)
        self.model.eval()
        out = {}
        for split, msgs in self.msgs.items():
            if msgs:
                m = evaluate(self.model, self.tok, msgs, self.cfg)["pooled"]
                out[split] = {k: m[k] for k in ("top1", "top3", "perplexity", "n_words")}
        return out


def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    """history.jsonl, one round per line, as of the last checkpoint (rewritten whole, atomically: a resumed run
    never duplicates a round)."""
    atomic_write_bytes(out / HISTORY, "".join(json.dumps(h) + "\n" for h in history).encode())


def fl_stage(run_dir: Path, mcfg: C.ModelConfig, fcfg: FLConfig, fleet: FleetConfig, ecfg: C.EvalConfig,
             resume: bool = False, progress: bool = True, out_name: str = FL, final_eval: bool = True,
             aggregator: Aggregator | None = None, privacy: PrivacyConfig | None = None) -> dict[str, Any]:
    """Federated training of the keyboard model (skipped when already done with these settings).

    `privacy` (fl_core.privacy.config.PrivacyConfig): DP, secure and robust aggregation options.
    """
    from keyboard.checkpoint import save_model

    run_dir = Path(run_dir)
    out = run_dir / out_name
    shards, tok = load_prepared(run_dir)
    cfgd = {"model": C.to_dict(mcfg), "fl": C.to_dict(fcfg), "fleet": C.to_dict(fleet)}
    privacy = privacy if privacy is not None and privacy.active else None
    if privacy is not None:
        cfgd["privacy"] = C.to_dict(privacy)
    inputs = {"tokenizer": tok.sha256, "shards": shards.manifest.get("source_hash", "")}
    key = stage_key({k: v for k, v in cfgd.items()}, inputs)
    if aggregator is None and is_done(out, key, ["model.pt"]):
        res = {**read_json(out / "stage.json").get("result", {}), "skipped": True}
        return _with_evals(run_dir, out, ecfg, res, progress, final_eval)
    C.save(out / "config.toml", mcfg, fcfg, fleet, *([privacy] if privacy else []))
    holder: dict[str, Any] = {}
    sim, model, tok = build_simulation(run_dir, mcfg, fcfg, fleet, out, aggregator,
                                       evaluate=lambda r, flat: holder["eval"](r, flat, sim.spec), progress=progress)
    from fl_core.privacy.engine import attach, epsilon_line

    private = attach(sim, privacy) if privacy else None
    if fcfg.eval_every:
        holder["eval"] = QuickEval(run_dir, model, tok, fcfg.eval_positions, ecfg.seed)
    t0 = time.perf_counter()
    with bar(progress, f"federated training ({len(sim.population)} users)", fcfg.max_tokens, unit="tok") as update:
        last_acc: list[str] = [""]

        def on_round(log: dict[str, Any]) -> None:
            if "eval" in log and "test" in log["eval"]:
                last_acc[0] = f"  top-1 {100 * log['eval']['test']['top1']:.1f}%"
            eps = f"  epsilon {log['epsilon']:.3g}" if "epsilon" in log else ""
            update(min(log["tokens_total"], fcfg.max_tokens),
                   f"round {log['round']}  loss {log['loss']:.3f}  {log['completed']}/{log['selected']} clients"
                   f"  up {log['up_total'] / 2**20:,.0f} MiB{last_acc[0]}{eps}")
            if private is not None and private.accountant is not None and not progress:
                print(f"round {log['round']}: {epsilon_line(private)}", flush=True)

        state = sim.run(resume=resume, on_round=on_round, on_checkpoint=lambda: write_history(out, sim.history))
    write_history(out, sim.history)
    sim.spec.load_into(model, sim.full_params())
    h = sim.history
    result = {"rounds": state.round, "tokens": sim.tokens, "seconds": time.perf_counter() - t0,
              "up_bytes": sim.up_total, "down_bytes": sim.down_total, "sim_hours": sim.clock_s / 3600,
              "clients_used": sum(x["completed"] for x in h), "dropped": sum(x["dropped"] for x in h),
              "late": sum(x["late"] for x in h), "aborted": sum(x["aborted"] for x in h),
              "sat_out": sum(x["sat_out"] for x in h), "skipped_rounds": sum(bool(x["skipped"]) for x in h),
              "loss": h[-1]["loss"] if h else None}
    pre = read_json(out / START)
    if pre:
        result.update(pretrain_tokens=pre["tokens"], pretrain_seconds=pre["seconds"])
    if private is not None and private.accountant is not None:
        acc = private.accountant
        result.update(epsilon=private.epsilon(), delta=acc.delta, dp_sampling=acc.sampling.kind,
                      noise_multiplier=acc.z, stopped_at_target_epsilon=not private.may_run_round())
    save_model(out, model, tok, config=cfgd, result=result)
    if aggregator is None:
        mark_done(out, key, cfgd, inputs, result=result)
    return _with_evals(run_dir, out, ecfg, {**result, "skipped": False}, progress, final_eval)


def _with_evals(run_dir: Path, out: Path, ecfg: C.EvalConfig, res: dict[str, Any], progress: bool,
                final_eval: bool) -> dict[str, Any]:
    from fedkey.fl_plots import plot_history

    if final_eval:
        for split in ("test", "heldout_test"):
            ev = evaluate_stage(run_dir, out, C.build(C.EvalConfig, None, {**C.to_dict(ecfg), "split": split}),
                                progress=progress)
            res[f"eval_{split}"] = {k: ev["pooled"][k] for k in ("top1", "top3", "perplexity", "ksr", "n_words")}
    central = run_dir / CENTRAL / "eval_test.json"
    central_top1 = read_json(central)["pooled"]["top1"] if central.is_file() else None
    hist = [json.loads(line) for line in (out / HISTORY).read_text().splitlines()] if (out / HISTORY).is_file() else []
    res["plots"] = [str(p) for p in plot_history(hist, out / "plots", central_top1, res.get("eval_test", {}).get("top1"))]
    return res
