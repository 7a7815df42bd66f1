"""Named presets: overrides applied over the defaults, under any TOML file and flags."""

from __future__ import annotations

PRESETS: dict[str, dict[str, dict]] = {
    # the README's first command must stay under 15 minutes on 2 cores, setup included, on slow days too
    "quick": {
        # the centralized baseline gets the larger share: it is the table the first command exists to print. It
        # starts from the federated stage's pretrained start (trained once, for both): 1.0M tokens from there
        # matched 1.4M from a random start, 17.5% top-1 either way (docs/results/sweeps.md, session 20)
        "central": {"max_tokens": 1_000_000, "pretrain_epochs": 1.0},
        # the defaults' small rounds (4 clients of <= 16 messages) with bold server steps for the short budget and
        # one pass of public pretraining; top-1 on the preset's 20k positions (docs/results/sweeps.md, session 16):
        # 8 x 64 at lr 0.03 with half a pass 13.7%; 4 x 16: lr 0.03 14.9%, 0.05 15.0%, 0.08 15.2%; with one pass
        # lr 0.05 15.6%, 0.08 15.7%, 0.12 15.8%; two passes (the full preset's) 16.5% but a minute and a half more
        "fl": {"max_tokens": 300_000, "pretrain_epochs": 1.0, "server_lr": 0.08, "eval_every": 40},
        # KSR on 150 messages (~7,500 keystrokes): each KSR keystroke is a search, 20 s of every 300-message evaluation
        "eval": {"max_positions": 20_000, "ksr_messages": 150},
        # every user in about two minutes of training: the latest 1k pieces each, a 512-piece shortlist, 20 steps
        "personal": {"steps": 20, "max_train_tokens": 1024, "max_val_tokens": 256, "shortlist": 512},
        # half the full sample's messages (~5,400 keystrokes, still ~54 beyond the p99): 45 s less of the run
        "latency": {"messages": 100, "check_messages": 25},
    },
    # the README's figures: 3M tokens each side (about 1.4 epochs), 100k test positions; ~45 minutes
    "full": {
        "central": {"max_tokens": 3_000_000},
        "fl": {"max_tokens": 3_000_000},
        "eval": {"max_positions": 100_000, "ksr_messages": 1000},
    },
}


def preset_overrides(name: str | None, section: str) -> dict:
    """The preset's values for one config section ({} for no preset)."""
    from fedkey.errors import FedkeyError

    if not name:
        return {}
    if name not in PRESETS:
        raise FedkeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[name].get(section, {}))
