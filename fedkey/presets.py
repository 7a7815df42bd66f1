"""Named presets: overrides applied over the defaults, under any TOML file and flags."""

from __future__ import annotations

PRESETS: dict[str, dict[str, dict]] = {
    # about 12 minutes on 2 cores, so the README's first command (with its ~2-minute install) ends within 15
    "quick": {
        # the centralized baseline gets the larger share: it is the table the first command exists to print
        "central": {"max_tokens": 1_400_000},
        # a short budget buys bold server steps (0.03; the 3M-token default is 0.005)
        # and wider rounds: 8 clients of 64 messages, the settings its 0.03 was tuned with (the defaults' small
        # rounds were measured at 3M tokens and lr 0.005 only)
        "fl": {"max_tokens": 300_000, "pretrain_epochs": 0.5, "server_lr": 0.03, "clients_per_round": 8,
               "max_messages": 64, "eval_every": 10},
        "eval": {"max_positions": 20_000, "ksr_messages": 300},
        # every user in about two minutes of training: the latest 1k pieces each, a 512-piece shortlist, 20 steps
        "personal": {"steps": 20, "max_train_tokens": 1024, "max_val_tokens": 256, "shortlist": 512},
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
