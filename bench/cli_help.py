"""How long a new user waits for ``medbatch --help`` and each command's help, side by side with
the floor (a bare interpreter) and with what an eager CLI would pay (importing the worker's app,
which imports torch, Celery and SQLAlchemy: what ``medbatch --help`` cost before the CLI became a
package with lazy imports, 3.6-4.9 s on this VM). Median of ``--repeat`` runs each, fresh
processes. The last line is one JSON object with the figures.

    python bench/cli_help.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("demo", "api", "worker", "sweeper", "submit", "nightly", "cases", "genome",
            "compounds", "models", "db")  # fmt: skip


def _time(argv: list[str], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        began = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        runs.append(time.perf_counter() - began)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    repeat = parser.parse_args().repeat
    py = [sys.executable]
    figures = {
        "bare_interpreter_s": _time([*py, "-c", "pass"], repeat),
        "help_s": _time([*py, "-m", "medbatch.cli", "--help"], repeat),
        "eager_imports_s": _time(
            [*py, "-c", "import worker.app, worker.tasks.genome, api_shim.main"], repeat
        ),
    }
    per_command = {c: _time([*py, "-m", "medbatch.cli", c, "--help"], repeat) for c in COMMANDS}
    figures["slowest_command_help_s"] = max(per_command.values())
    figures["slowest_command"] = max(per_command, key=per_command.__getitem__)
    figures["eager_over_help"] = figures["eager_imports_s"] / figures["help_s"]
    for name, value in figures.items():
        print(f"{name:24} {value:.3f}" if isinstance(value, float) else f"{name:24} {value}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
