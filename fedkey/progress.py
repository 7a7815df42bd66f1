"""One progress-bar helper for every long stage (rich), silent when progress is off."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


PROGRESS_FILE_ENV = "FEDKEY_PROGRESS_FILE"


@contextlib.contextmanager
def _file_bar(path: Path, description: str, total: float | None, unit: str) -> Iterator[Callable[[float, str], None]]:
    """The bar's state as one small JSON file, replaced at most twice a second, for another process to draw."""
    last = [0.0]

    def write(done: float, status: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - last[0] < 0.5:
            return
        last[0] = now
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"description": description, "completed": done, "total": total, "unit": unit,
                                   "status": status}))
        os.replace(tmp, path)

    write(0, "", force=True)
    yield write
    write(total or 0, "", force=True)


def read_file_bar(path: Path) -> dict | None:
    """The latest state a _file_bar wrote (None before the first or if unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def bar(enabled: bool, description: str, total: float | None, unit: str = "") -> Iterator[Callable[[float, str], None]]:
    """Yield update(completed, status_text); a spinner-like bar when total is None."""
    if not enabled:
        yield lambda done, status="": None
        return
    if os.environ.get(PROGRESS_FILE_ENV):  # a stage running beside another: `fedkey run` draws its bar
        with _file_bar(Path(os.environ[PROGRESS_FILE_ENV]), description, total, unit) as update:
            yield update
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn() if unit != "tok" else
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} " + unit), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}")]
    with Progress(*cols, transient=False) as prog:
        task = prog.add_task(description, total=total, status="")

        def update(done: float, status: str = "") -> None:
            prog.update(task, completed=done, status=status)

        yield update
        if total:
            prog.update(task, completed=total)
