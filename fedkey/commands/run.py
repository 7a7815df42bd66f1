"""fedkey run: the main job, prepare -> central -> federated -> personalize -> export -> report.

Each stage is the subcommand a user would type, with the same --run-dir, --preset and --config.
A stage whose command line and input files did not change since it finished is skipped; the
training stages also resume from their last checkpoint, so a run killed at any point continues
without redoing finished work or losing it. On two or more cores the centralized baseline and the
federated model train side by side, each on its share of the cores (fedkey.side_by_side; --jobs 1: one
stage after another).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from fedkey.commands.common import add_common, add_parser
from fedkey.side_by_side import LANE_FLAG, LANES, Lane, run_lanes, split_cpus, usable_cpus, watch_parent
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
    p.add_argument("--jobs", type=int, default=2,
                   help="lanes of stages run side by side, each on its share of the cores: the centralized baseline "
                        "beside the federated model (1: one stage after another on every core)")
    p.add_argument(LANE_FLAG, dest="lane_child", action="store_true", help=argparse.SUPPRESS)


def _plan(st: Stage, args: argparse.Namespace) -> tuple[list[str], str, Path, dict[str, str], bool]:
    """The stage's command line, its key, its marker folder, its inputs' hashes and whether it must run."""
    run_dir: Path = args.run_dir
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
    return argv, key, marker, inputs, bool(missing) or not is_done(marker, key, [f"../../{o}" for o in st.outputs])


def _lanes(todo: list[Stage], args: argparse.Namespace) -> list[Lane]:
    """The side-by-side lanes worth starting now: at least two with work left, and a core for each."""
    cpus = usable_cpus()
    if args.lane_child or args.jobs < 2 or len(cpus) < 2:
        return []
    names = {st.name for st in todo}
    # a lane of finished stages costs nothing to skip, but it gets no core: its work is done
    busy = {lane: [n for n in stage_names if n in names] for lane, stage_names in LANES.items()}
    busy = {lane: ns for lane, ns in busy.items()
            if any(_plan(st, args)[4] for st in todo if st.name in ns)}
    if len(busy) < 2:
        return []
    busy = dict(list(busy.items())[: min(args.jobs, len(cpus))])
    logs = args.run_dir / "logs"
    return [Lane(name, ns, share, logs / f"{name}.log", logs / f".{name}.progress.json")
            for (name, ns), share in zip(busy.items(), split_cpus(cpus, len(busy)))]


def run(args: argparse.Namespace) -> None:
    """Run every stage in order (independent ones side by side), then write and print the report."""
    from fedkey.cli import _modules, build_parser
    from fedkey.report import collect, print_report, write_report

    run_dir: Path = args.run_dir
    if args.lane_child:
        watch_parent()
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    t_start = time.perf_counter()
    todo = [st for st in stages(run_dir) if not args.only or st.name in args.only]
    ran_in_lanes: set[str] = set()
    for st in todo:
        if st.name in ran_in_lanes:
            continue
        if st.argv[0] not in commands:
            console.print(f"[yellow]stage {st.name}: skipped, `fedkey {st.argv[0]}` is not in this version[/]")
            continue
        if any(st.name in names for names in LANES.values()):
            lanes = _lanes([t for t in todo if t.name not in ran_in_lanes], args)
            if lanes:
                run_lanes(lanes, _lane_argv(args), progress=not args.no_progress)
                ran_in_lanes |= {n for lane in lanes for n in lane.stages}
                if st.name in ran_in_lanes:
                    continue
        argv, key, marker, inputs, pending = _plan(st, args)
        if not pending:
            console.print(f"[dim]stage {st.name}: inputs unchanged, skipped[/]")
            continue
        console.rule(f"[bold]{st.name}[/]  fedkey {' '.join(argv)}")
        t0, started = time.perf_counter(), time.time()
        sub_args = parser.parse_args(argv)
        _modules()[sub_args.command].run(sub_args)
        mark_done(marker, key, {"argv": argv}, inputs, seconds=time.perf_counter() - t0,
                  started=started, ended=time.time())
    if args.lane_child:
        return
    sections = collect(run_dir)  # read once: the terminal and report.md show the same figures
    print_report(sections, run_dir)
    path = write_report(run_dir, sections)
    console.print(f"report: {path} ({time.perf_counter() - t_start:.0f} s this invocation)")


def _lane_argv(args: argparse.Namespace) -> list[str]:
    """The flags a lane's `fedkey run` shares with this one."""
    argv = ["--run-dir", str(args.run_dir), "--jobs", "1"]
    if args.preset:
        argv += ["--preset", args.preset]
    if args.config:
        argv += ["--config", str(args.config)]
    if args.no_progress:
        argv.append("--no-progress")
    return argv
