"""fedkey run: the main job, prepare -> central -> federated -> personalize -> export -> report.

Each stage is the subcommand a user would type, with the same --run-dir, --preset and --config.
A stage whose command line and input files did not change since it finished is skipped; the
training stages also resume from their last checkpoint, so a run killed at any point continues
without redoing finished work or losing it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from fedkey.commands.common import add_common, add_parser
from fedkey.stages import file_hash, is_done, mark_done, stage_key
from fedkey.tables import console


@dataclass
class Stage:
    """One step of the job: a subcommand, the files it reads and the files it leaves."""

    name: str
    argv: list[str]
    inputs: list[str]
    outputs: list[str]
    preset: bool = True


def stages(run_dir: Path) -> list[Stage]:
    """The job's stages in order (paths relative to the run directory)."""
    return [
        Stage("prepare", ["prepare"], [], ["data/manifest.json", "tokenizer/tokenizer.model"], preset=False),
        Stage("centralized baseline", ["train-central", "--resume"], ["tokenizer/tokenizer.model"], ["central/model.pt"]),
        Stage("evaluate centralized", ["evaluate"], ["central/model.pt"], ["central/eval_test.json"]),
        Stage("federated training", ["train", "--resume", "--no-final-eval"], ["tokenizer/tokenizer.model"], ["fl/model.pt"]),
        # the trigram row is the same for every model: the centralized evaluation already has it
        Stage("evaluate federated", ["evaluate", "--model", str(run_dir / "fl"), "--no-ngram"], ["fl/model.pt"],
              ["fl/eval_test.json"]),
        Stage("personalize", ["personalize", "--all"], ["fl/model.pt"], ["personal/report.json"]),
        Stage("export", ["export"], ["fl/model.pt", "personal/report.json"], ["export/manifest.json"], preset=False),
        Stage("latency", ["bench", "latency", "--json", str(run_dir / "export" / "latency.json")],
              ["export/manifest.json"], ["export/latency.json"]),
    ]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the subcommand."""
    p = add_parser(sub, "run", "The main job: prepare -> centralized baseline -> federated training -> "
                               "personalization -> export -> report (finished stages are skipped).")
    add_common(p)
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages (by name)")


def run(args: argparse.Namespace) -> None:
    """Run every stage in order, then write and print the report."""
    from fedkey.cli import _modules, build_parser
    from fedkey.report import collect, print_report, write_report

    run_dir: Path = args.run_dir
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    t_start = time.perf_counter()
    for st in stages(run_dir):
        if args.only and st.name not in args.only:
            continue
        if st.argv[0] not in commands:
            console.print(f"[yellow]stage {st.name}: skipped, `fedkey {st.argv[0]}` is not in this version[/]")
            continue
        argv = [*st.argv, "--run-dir", str(run_dir)]
        if st.preset and args.preset:
            argv += ["--preset", args.preset]
        if args.config:
            argv += ["--config", str(args.config)]
        if args.no_progress:
            argv.append("--no-progress")
        missing = [i for i in st.inputs if not (run_dir / i).exists()]
        inputs = {i: file_hash(run_dir / i) for i in st.inputs if (run_dir / i).exists()}
        if args.config:
            inputs["config"] = file_hash(args.config)
        key = stage_key({"argv": argv}, inputs)
        marker = run_dir / "stages" / st.name.replace(" ", "_")
        if not missing and is_done(marker, key, [f"../../{o}" for o in st.outputs]):
            console.print(f"[dim]stage {st.name}: inputs unchanged, skipped[/]")
            continue
        console.rule(f"[bold]{st.name}[/]  fedkey {' '.join(argv)}")
        t0 = time.perf_counter()
        sub_args = parser.parse_args(argv)
        _modules()[sub_args.command].run(sub_args)
        mark_done(marker, key, {"argv": argv}, inputs, seconds=time.perf_counter() - t0)
    sections = collect(run_dir)  # read once: the terminal and report.md show the same figures
    print_report(sections, run_dir)
    path = write_report(run_dir, sections)
    console.print(f"report: {path} ({time.perf_counter() - t_start:.0f} s this invocation)")
