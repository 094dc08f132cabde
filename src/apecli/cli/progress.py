"""Progress displays on stderr, shown only on a terminal; each yields the callback the library calls."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn

from apecli.cli.io import console


def _bar(*columns: ProgressColumn, transient: bool, enabled: bool = True) -> Progress:
    return Progress(*columns, BarColumn(), TimeRemainingColumn(), console=console, transient=transient,
                    disable=not (enabled and console.is_terminal))


@contextmanager
def steps(description: str) -> Iterator[Callable[[int, int], None]]:
    """One bar for a search: ``report(done, total)``."""
    with _bar(TextColumn(description), TaskProgressColumn(), transient=True) as bar:
        task = bar.add_task("", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextmanager
def splits(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """One bar per split, with images/s: ``report(split, done, total)``."""
    with _bar(TextColumn("{task.description:<5}"), TextColumn("{task.completed}/{task.total}"),
              TextColumn("{task.fields[rate]}"), transient=False, enabled=enabled) as bar:
        tasks: dict[str, int] = {}

        def report(split: str, done: int, total: int) -> None:
            if split not in tasks:
                tasks[split] = bar.add_task(split, total=total, rate="")
            bar.update(tasks[split], completed=done)
            speed = bar.tasks[tasks[split]].speed
            bar.update(tasks[split], rate=f"{speed:,.0f} img/s" if speed else "")

        yield report


@contextmanager
def epochs(count: int) -> Iterator[Callable[[int, int, float, float], None]]:
    """Training epochs with loss and validation accuracy: ``report(epoch, epochs, loss, val)``."""
    with _bar(TextColumn("epoch {task.completed}/{task.total}"),
              TextColumn("loss {task.fields[loss]}  val {task.fields[val]}"), transient=True) as bar:
        task = bar.add_task("", total=count, loss="-", val="-")
        yield lambda epoch, total, loss, val: bar.update(task, completed=epoch, loss=f"{loss:.4f}", val=f"{val:.2f}%")
