"""One progress-bar helper for every long stage (rich), silent when progress is off."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextlib.contextmanager
def bar(enabled: bool, description: str, total: float | None, unit: str = "") -> Iterator[Callable[[float, str], None]]:
    """Yield update(completed, status_text); a spinner-like bar when total is None."""
    if not enabled:
        yield lambda done, status="": None
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
