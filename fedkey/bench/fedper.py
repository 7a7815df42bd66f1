"""FedPer (local layers stay on each device across rounds) vs federate, then personalize, on the same users.

Every arm continues federated training from the run's global model over a seeded sample of training users for
the same client tokens, seed and fleet (personalization/fedper.py): FedAvg then this package's personalization,
FedPer with the output bias local, and FedPer with the low-rank adapter and the output bias local. Compared on
the users' sampled test words: mean top-1 over users, gain over the FedAvg arm's global model, users hurt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedkey.io import save_figure, write_json
from fedkey.tables import console


def add_flags(p: argparse.ArgumentParser) -> None:
    """Flags of this benchmark: the start model, the plot, and every FedPerConfig field."""
    from personalization.fedper import FedPerConfig

    p.add_argument("--model", type=Path, help="start model folder (default: the run's fl/ model, else central/)")
    p.add_argument("--plot", type=Path, help="PNG (default: beside --json, else RUN_DIR/bench/fedper.png)")
    for f in FedPerConfig.__dataclass_fields__.values():
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default, help=f.metadata["help"])


def run(args: argparse.Namespace) -> None:
    """Train the arms, print the table, plot each arm's per-user gains."""
    from personalization.fedper import FedPerConfig, compare, markdown

    cfg = FedPerConfig(**{k: getattr(args, k) for k in FedPerConfig.__dataclass_fields__})
    res = compare(args.run_dir, args.model, cfg, progress=not args.no_progress)
    console.print(markdown(res, cfg), markup=False, highlight=False, soft_wrap=True)
    plot = args.plot or (args.json.with_suffix(".png") if args.json else args.run_dir / "bench" / "fedper.png")
    _plot(res, plot)
    console.print(f"per-user gains -> {plot}")
    if args.json:
        write_json(args.json, res)


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    arms = [a for a in res["rows"] if a != "fedavg (global)"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.boxplot([[100 * g for g in res["rows"][a]["gain_per_user"].values()] for a in arms], vert=False, showmeans=True)
    ax.set_yticks(range(1, len(arms) + 1), arms, fontsize=8)
    ax.axvline(0, color="grey", lw=1)
    ax.axvline(-0.5, color="tab:red", lw=1, ls="--", label="hurt: below -0.5 point")
    ax.set_xlabel("per-user top-1 gain over the FedAvg arm's global model (points)")
    ax.legend(fontsize=8)
    ax.set_title(f"{len(res['users'])} users, {res['config']['tokens']:,} federated tokens per arm")
    fig.tight_layout()
    save_figure(fig, path)
