"""A rich progress bar for long CLI work (genome tiles, nightly patients), or nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(show: bool, total: int | None, label: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; with ``show``, a bar of ``label`` that counts to ``total``."""
    if not show:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
