"""FedPer vs "federate, then fine-tune", at one federated token budget on the same users and the same start.

Both arms continue federated training from a run's global model over a small population (so every user takes
part in several rounds) for the same number of client tokens, with the same seed and fleet:
- fedavg: every parameter averaged; then each user's personalization is trained on their own train split
  afterwards (this package's default: spelling preference, gated adapter, gated phrase cache), and also
  the output bias alone (mode bias) as the closest match to the FedPer arm;
- fedper: the output bias is FedPer-local (fl_core's local_params): each client keeps its own across rounds
  and only the rest is averaged; a user is evaluated with the shared parameters plus their own bias;
- fedper + adapter: the same with this package's whole local layer, the low-rank residual adapter on the LSTM
  output and the output bias, kept on each client across rounds (AdaptedLM).
Test splits measure all of them (top-1 over users' sampled test words).

    fedkey bench fedper --run-dir runs/full15 --users 32 --tokens 200000 --json out.json
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedkey import config as C
from fedkey.errors import FedkeyError
from keyboard.model import KeyboardLM, State

if TYPE_CHECKING:
    from fl_core.params import ParamSpec
    from keyboard.adapter_file import AdapterArrays


@dataclass
class FedPerConfig:
    """The comparison's size and budget."""

    users: int = field(default=32, metadata={"help": "training users taking part (seeded sample of the run's)"})
    tokens: int = field(default=300_000, metadata={"help": "federated client-token budget of each arm"})
    clients_per_round: int = field(default=8, metadata={"help": "clients a round"})
    local: str = field(default="out_bias", metadata={"help": "FedPer-local parameters (fl_core local_params globs)"})
    rank: int = field(default=8, metadata={"help": "rank of the FedPer-local residual adapter (0: no adapter arm)"})
    server_lr: float = field(default=0.01, metadata={"help": "server Adam lr (the start is already trained)"})
    # from a trained start over 32 users, 1.0 (fl_core's default) cost every arm a point of top-1 (session 19)
    client_lr: float = field(default=0.3, metadata={"help": "client SGD lr, shared and local parameters alike"})
    eval_positions: int = field(default=20_000, metadata={"help": "test word positions evaluated (0: all)"})
    seed: int = field(default=0, metadata={"help": "seed of the user sample, the rounds and the evaluation"})
    threads: int = field(default=1, metadata={"help": "torch threads"})


ADAPTER_LOCAL = "adapter_A,adapter_B,out_bias"


class AdaptedLM(KeyboardLM):
    """KeyboardLM with a trainable residual adapter f + (f A) B on its LSTM output, FedPer's local layer.

    The same form as a personalized user's adapter (PersonalizedLM), so a client's local A, B and bias
    become that user's adapter file's arrays; B starts at zero, so the adapter starts as the identity.
    """

    def __init__(self, base: KeyboardLM, rank: int, seed: int = 0) -> None:
        super().__init__(base.vocab_size, base.cfg)
        self.load_state_dict(base.state_dict())
        d = base.cfg.embed_dim
        g = torch.Generator().manual_seed(seed)
        self.adapter_A = nn.Parameter(torch.randn(d, rank, generator=g) * d**-0.5)
        self.adapter_B = nn.Parameter(torch.zeros(rank, d))

    def features(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Adapted LSTM outputs and the LSTM state (the adapter does not feed back into the recurrence)."""
        feats, state = super().features(ids, state)
        return feats + (feats @ self.adapter_A) @ self.adapter_B, state

    def shared_model(self) -> KeyboardLM:
        """The plain KeyboardLM of the shared parameters and this copy's out_bias."""
        plain = KeyboardLM(self.vocab_size, self.cfg)
        plain.load_state_dict({k: v for k, v in self.state_dict().items() if not k.startswith("adapter_")})
        return plain.eval()


def _federate(run_dir: Path, model_dir: Path, users: list[str], cfg: FedPerConfig, local: str, out: Path,
              rank: int = 0):
    """Continue federated training of the model in model_dir (with a rank-`rank` adapter if > 0) over `users`;
    returns (model, tok, sim)."""
    from fedkey.fl_task import KeyboardTask
    from fedkey.pipeline import load_prepared
    from fl_core.config import FleetConfig, FLConfig
    from fl_core.params import ParamSpec
    from fl_core.simulation import Simulation
    from keyboard.checkpoint import load_model

    shards, _ = load_prepared(run_dir)
    model, tok, _ = load_model(model_dir)
    if rank:
        model = AdaptedLM(model, rank, cfg.seed)
    model.train()
    fcfg = FLConfig(seed=cfg.seed, max_tokens=cfg.tokens, clients_per_round=cfg.clients_per_round,
                    server_lr=cfg.server_lr, client_lr=cfg.client_lr, pretrain_epochs=0, local_params=local, eval_every=0,
                    executor="sequential", threads=cfg.threads)
    fleet = FleetConfig(availability=False, overselect=1.0, dropout=0.0)  # every arm sees the same rounds
    spec = ParamSpec.of(model, fcfg.local_patterns())
    task = KeyboardTask(shards, tok, model, fcfg.batch_size, fcfg.max_messages, fcfg.max_len, fcfg.local_epochs)
    sim = Simulation(task, spec, users, spec.flatten(dict(model.named_parameters())), fcfg, fleet, out)
    sim.run()
    spec.load_into(model, sim.full_params())
    return model.eval(), tok, sim


def compare(run_dir: Path, model_dir: Path | None, cfg: FedPerConfig, progress: bool = False) -> dict[str, Any]:
    """Run both arms and evaluate them on the sampled users' test splits; returns the figures."""
    from data.british import REGIONAL_PAIRS
    from fedkey.personal_stage import _messages
    from fedkey.pipeline import load_prepared
    from fl_core.simulation import LOCAL
    from keyboard.adapter_file import AdapterArrays
    from keyboard.words import PieceTable
    from personalization.batched import train_adapters
    from personalization.config import PersonalConfig
    from personalization.data import load_users
    from personalization.evaluate import AdapterBank, evaluate_users
    from personalization.report import top1_gains
    from personalization.spelling import attach_spelling
    from personalization.store import default_base

    torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    model_dir = Path(model_dir) if model_dir else default_base(run_dir)
    shards, _ = load_prepared(run_dir)
    pool = [u for u in shards.users("train") if shards.user_texts("test", u)]
    if len(pool) < cfg.users:
        raise FedkeyError(f"{run_dir}: {len(pool)} training users with test messages, fewer than --users {cfg.users}")
    users = sorted(np.random.default_rng(cfg.seed).choice(pool, cfg.users, replace=False).tolist())
    ecfg = C.EvalConfig(seed=cfg.seed, max_positions=cfg.eval_positions, ksr_messages=0, threads=cfg.threads)
    msgs = _messages(shards, users)
    out: dict[str, Any] = {"config": C.to_dict(cfg), "users": users, "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fed, tok, sim_a = _federate(run_dir, model_dir, users, cfg, "", Path(tmp) / "fedavg")
        out["seconds"]["fedavg"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        per, _, sim_p = _federate(run_dir, model_dir, users, cfg, cfg.local, Path(tmp) / "fedper")
        out["seconds"]["fedper"] = time.perf_counter() - t0
        # each user's own FedPer-local parameters, as of after the last round (None: never selected)
        locals_ = {u: sim_p.store.get(u, LOCAL, sim_p.state.round + 1) for u in users}
        if cfg.rank:
            t0 = time.perf_counter()
            ada, _, sim_r = _federate(run_dir, model_dir, users, cfg, ADAPTER_LOCAL, Path(tmp) / "fedper_adapter",
                                      cfg.rank)
            out["seconds"]["fedper + adapter"] = time.perf_counter() - t0
            locals_r = {u: sim_r.store.get(u, LOCAL, sim_r.state.round + 1) for u in users}
    if [e.name for e in sim_p.spec.local] != ["out_bias"]:
        raise FedkeyError(f"--local {cfg.local!r}: this comparison evaluates a FedPer-local out_bias only")
    sims = {"fedavg": sim_a, "fedper": sim_p, **({"fedper + adapter": sim_r} if cfg.rank else {})}
    out["rounds"] = {k: s.state.round for k, s in sims.items()}
    out["tokens"] = {k: s.tokens for k, s in sims.items()}
    out["fedper_users_with_local"] = sum(v is not None for v in locals_.values())

    table = PieceTable.from_tokenizer(tok)
    starts = torch.zeros(tok.vocab_size, dtype=torch.bool)
    starts[torch.from_numpy(table.start_space)] = True
    cont = torch.zeros(tok.vocab_size, dtype=torch.bool)
    cont[torch.from_numpy(table.cont)] = True
    banks: dict[str, AdapterBank] = {"fedavg (global)": AdapterBank(fed, {})}
    for name, pcfg in (("fedavg + fine-tuned output bias", PersonalConfig(mode="bias", cache_order=0, regional_penalty=0,
                                                                          threads=cfg.threads)),
                       ("fedavg + personalization (default)", PersonalConfig(threads=cfg.threads))):
        t0 = time.perf_counter()
        data = load_users(shards, tok, users, pcfg.val_frac, pcfg.max_len, pcfg.max_train_tokens, pcfg.max_val_tokens)
        attach_spelling(data, tok, fed.out_bias.detach().numpy(), REGIONAL_PAIRS, pcfg)
        res = train_adapters(fed, data, pcfg, starts, cont)
        banks[name] = AdapterBank(fed, {r.user: AdapterArrays(r.A, r.B, r.user_bias, "", r.user, {})
                                        for r in res if r.use_adapter}, {r.user: r.cache for r in res if r.cache})
        out["seconds"][name] = time.perf_counter() - t0
    fedper_bank = AdapterBank(per, _local_adapters(sim_p.spec, locals_, per))
    t0 = time.perf_counter()
    evs = evaluate_users(fed, list(banks.values()), tok, msgs, ecfg)
    evs_p = evaluate_users(per, [AdapterBank(per, {}), fedper_bank], tok, msgs, ecfg)
    arms = [*zip(banks, evs), ("fedper (shared part, no local bias)", evs_p[0]),
            ("fedper (shared + own local bias)", evs_p[1])]
    if cfg.rank:
        shared = ada.shared_model()
        evs_r = evaluate_users(shared, [AdapterBank(shared, {}), AdapterBank(shared, _local_adapters(sim_r.spec, locals_r,
                                                                                                   shared))], tok, msgs, ecfg)
        arms += [("fedper + adapter (shared part, no local layer)", evs_r[0]),
                 ("fedper + adapter (shared + own adapter and bias)", evs_r[1])]
    out["seconds"]["evaluate"] = time.perf_counter() - t0
    rows = {}
    ref = evs[0]
    for name, ev in arms:
        per_user = top1_gains(ref, ev)
        gains = np.array(list(per_user.values()))
        rows[name] = {"mean_top1": ev["mean_over_users"]["top1"], "pooled_top1": ev["pooled"]["top1"],
                      "pooled_top3": ev["pooled"]["top3"],
                      "mean_gain_vs_fedavg": float(gains.mean()) if len(gains) else None,
                      "hurt_vs_fedavg": int((gains < -0.005).sum()), "users": int(len(gains)),
                      "gain_per_user": {u: float(g) for u, g in per_user.items()}}
    out["rows"] = rows
    out["n_words"] = ref["pooled"]["n_words"]
    return out


def _local_adapters(spec: ParamSpec, locals_: dict[str, torch.Tensor | None], shared: KeyboardLM) -> dict[str, AdapterArrays]:
    """Each selected user's FedPer-local output bias (and A, B where the adapter is local too: else rank 0) as
    adapter arrays over the shared model."""
    from keyboard.adapter_file import AdapterArrays

    d = shared.cfg.embed_dim
    out = {}
    for u, v in locals_.items():
        if v is None:
            continue
        part = {e.name: v[e.offset - spec.n_shared: e.offset - spec.n_shared + e.numel].view(*e.shape) for e in spec.local}
        A, B = part.get("adapter_A", torch.zeros(d, 0)), part.get("adapter_B", torch.zeros(0, d))
        out[u] = AdapterArrays(A.numpy(), B.numpy(), (part["out_bias"] - shared.out_bias.detach()).numpy(), "", u, {})
    return out


def markdown(res: dict[str, Any], cfg: FedPerConfig) -> str:
    """The comparison as a Markdown table, with its size and budget on the line above."""
    lines = [f"{cfg.users} users, {res['n_words']:,} test words; {cfg.tokens:,} federated tokens per arm "
             f"({' / '.join(str(r) for r in res['rounds'].values())} rounds)",
             "| arm | mean top-1 over users | pooled top-1 | pooled top-3 | mean gain vs fedavg | hurt > 0.5 pt |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in res["rows"].items():
        lines.append(f"| {name} | {100 * r['mean_top1']:.2f}% | {100 * r['pooled_top1']:.2f}% | "
                     f"{100 * r['pooled_top3']:.2f}% | {100 * r['mean_gain_vs_fedavg']:+.2f} pt | "
                     f"{r['hurt_vs_fedavg']}/{r['users']} |")
    return "\n".join(lines)
