"""Driving a tiled job from the CLI, whatever its kind: compute its tiles here, or follow workers.

``run_tile(index)`` computes one tile (returning ``"failed"`` when the job failed) and
``describe()`` reads the job as a dict with ``status``, ``tiles_done`` and ``tiles_total``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from worker.progress import progress_bar

Describe = Callable[[], dict[str, Any]]


def run_inline(
    run_tile: Callable[[int], str], describe: Describe, *, progress: bool = False
) -> dict[str, Any]:
    """Compute every tile in this process, in order, the way a worker does; stop at a failure."""
    tiles = describe()["tiles_total"]
    with progress_bar(progress, tiles, "tiles") as advance:
        for index in range(tiles):
            if run_tile(index) == "failed":
                break
            advance(1)
    return describe()


def follow(describe: Describe, *, progress: bool = False, poll_s: float = 0.5) -> dict[str, Any]:
    """Wait for the workers to finish the job (or fail it), showing tiles done."""
    summary = describe()
    with progress_bar(progress, summary["tiles_total"], "tiles") as advance:
        seen = 0
        while summary["status"] not in ("done", "failed"):
            time.sleep(poll_s)
            summary = describe()
            advance(summary["tiles_done"] - seen)
            seen = summary["tiles_done"]
    return summary
