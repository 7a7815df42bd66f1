"""Flags every subcommand shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich_argparse import RichHelpFormatter


def add_parser(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand parser with rich help."""
    return sub.add_parser(name, help=help, description=help, formatter_class=RichHelpFormatter)


def add_common(p: argparse.ArgumentParser, preset: bool = True) -> None:
    """--run-dir, --config, --preset, --json, --no-progress."""
    p.add_argument("--run-dir", type=Path, default=Path("runs/default"), help="folder holding every artifact of a run")
    p.add_argument("--config", type=Path, help="TOML file with one table per settings section (e.g. \\[central])")
    if preset:
        p.add_argument("--preset", choices=["quick", "full"], help="named settings (flags and --config still win)")
    p.add_argument("--json", type=Path, help="also write the measured figures to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
