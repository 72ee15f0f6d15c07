"""The API process's and the CLI's start-up footprint, each in fresh interpreters.

- ``api``: import ``api_shim.main`` and build the app (SQLite, no server needed): seconds, resident
  memory (VmRSS), and which of torch, numba, rdkit, captum it loaded;
- ``help``: ``medbatch --help`` wall time.

``--tree DIR`` measures another checkout (e.g. a ``git worktree`` of an older commit) with this
interpreter, so two trees can be compared side by side: ``--tree`` may be given twice. Medians of
``--runs`` runs, alternated between trees. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numba", "rdkit", "captum")

_PROBE = """
import json, sys, time
started = time.perf_counter()
from api_shim.main import create_app
from medbatch.settings import Settings
app = create_app(Settings(database_url=sys.argv[1], artifact_dir=sys.argv[2]))
seconds = time.perf_counter() - started
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
print(json.dumps({"s": seconds, "rss_mib": rss, "loaded": [m for m in %r if m in sys.modules]}))
"""


def _api(tree: Path, tmp: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    db = f"sqlite:///{tmp / 'footprint.sqlite'}"
    out = subprocess.run(
        [sys.executable, "-c", _PROBE % (HEAVY,), db, str(tmp)],
        capture_output=True, text=True, env=env, cwd=tmp, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _help(tree: Path, tmp: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "medbatch.cli", "--help"],
        capture_output=True, env=env, cwd=tmp, check=True,
    )  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, action="append", help="a checkout (default: this)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    trees = [t.resolve() for t in (args.tree or [ROOT])]
    runs: dict[Path, list[tuple[dict, float]]] = {t: [] for t in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            for tree in trees:
                runs[tree].append((_api(tree, Path(tmp)), _help(tree, Path(tmp))))
    result = {}
    for tree, found in runs.items():
        result[str(tree)] = {
            "api_s": round(statistics.median(a["s"] for a, _ in found), 2),
            "api_rss_mib": round(statistics.median(a["rss_mib"] for a, _ in found)),
            "api_loads": found[-1][0]["loaded"],
            "help_s": round(statistics.median(h for _, h in found), 2),
        }
        print(f"{tree}: {result[str(tree)]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
