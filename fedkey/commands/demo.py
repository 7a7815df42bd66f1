"""fedkey demo: a terminal keyboard over the exported int8 bundle (suggestions as you type, per profile)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from fedkey.commands.common import add_parser
from fedkey.errors import FedkeyError

if TYPE_CHECKING:
    from tui.app import KeyboardApp


def register(sub: argparse._SubParsersAction) -> None:
    """Add the subcommand."""
    p = add_parser(sub, "demo", "Type in a terminal keyboard and see the on-device model's suggestions, "
                                "for the global model or a user's personalized profile.")
    p.add_argument("--run-dir", type=Path, default=Path("runs/default"), help="run folder whose export/ is used")
    p.add_argument("--bundle", type=Path, help="exported bundle folder (default: RUN_DIR/export)")
    p.add_argument("--user", metavar="ID", help="start with this shipped user's profile (default: the global model)")
    p.add_argument("--fp32", action="store_true", help="use model.onnx instead of the int8 model")
    p.add_argument("--json", type=Path, help="on exit, write the session's figures (keystrokes saved, latency)")


def bundle_dir(args: argparse.Namespace) -> Path:
    """The bundle to open, refused in one line when there is none."""
    bundle = args.bundle or args.run_dir / "export"
    if not (bundle / "manifest.json").is_file():
        out = f" --out {bundle}" if args.bundle else ""
        raise FedkeyError(f"no bundle at {bundle}; run `fedkey export --run-dir {args.run_dir}{out}` first")
    return bundle


def make_app(args: argparse.Namespace) -> KeyboardApp:
    """The app over the bundle's int8 model (no torch on this path), starting on --user's profile."""
    from keyboard.runtime import load_bundle
    from tui.app import KeyboardApp

    bundle = bundle_dir(args)
    engine = load_bundle(bundle, user=args.user, int8=not args.fp32)
    # with users' profiles shipped, a second engine stays on the global model to show what each adapter changes
    reference = load_bundle(bundle, int8=not args.fp32) if engine.profiles() else None
    return KeyboardApp(engine, reference)


def run(args: argparse.Namespace) -> None:
    """Run the app until Ctrl+Q or Escape; --json gets the session's figures."""
    from fedkey.io import write_json

    app = make_app(args)
    app.run()
    if args.json:
        write_json(args.json, app.summary())
