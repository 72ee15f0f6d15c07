"""The fault scenarios of tests/faults/ at a larger size (``make bench-faults``).

Real ``medbatch api``, ``worker`` and ``sweeper`` processes on a Redis and a PostgreSQL cluster of
this run's own (free ports, data under a temporary folder), with the default timing settings:
30 s leases, a sweep every 10 s, Redis's 900 s visibility timeout untouched.

  worker_sigkill    two workers score a bulk load; four times one is SIGKILLed mid-batch
  redis_crash       three times Redis is SIGKILLed while workers hold unacknowledged messages,
                    and restarted empty; cases keep arriving while it is down
  postgres_outage   PostgreSQL stopped for 20 s under load; the API is asked for everything
  poison            clean cases with poison of every kind in the same batches
  sweeper_backlog   cases accepted during a broker outage wait behind a routine backlog

Per scenario: accepted / exactly-one / lost / duplicated / wrongly failed / seconds to recover.
The last line is one JSON object with those keys per scenario.
Usage: python bench/faults.py [--scale F]   (F multiplies every size; default 1)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults import scenarios  # noqa: E402
from tests.faults.harness import Servers  # noqa: E402

KEYS = ("accepted", "exactly_one", "lost", "duplicated", "wrongly_failed", "recover_s")


def cpu() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores seen)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every size")
    args = parser.parse_args()

    def n(size: int) -> int:
        return max(1, int(size * args.scale))

    runs = {
        "worker_sigkill": lambda s: scenarios.worker_sigkill(s, cases=n(8000), kills=4),
        "redis_crash": lambda s: scenarios.redis_crash(s, cases=n(8000), crashes=3),
        "postgres_outage": lambda s: scenarios.postgres_outage(s, cases=n(6000), down_s=20),
        "poison": lambda s: scenarios.poison(s, cases=n(3000)),
        "sweeper_backlog": lambda s: scenarios.sweeper_backlog(s, backlog=n(4000), stranded=n(500)),
    }
    print(f"CPU: {cpu()}", flush=True)
    results: dict[str, dict] = {}
    with (
        tempfile.TemporaryDirectory(prefix="medbatch-bench-faults-") as root,
        Servers.started(Path(root)) as servers,
    ):
        for name, run in runs.items():
            started = time.monotonic()
            result = run(servers)
            results[name] = result
            print(
                f"{name:16} accepted {result['accepted']:6}  exactly-one {result['exactly_one']:6}"
                f"  lost {result['lost']}  duplicated {result['duplicated']}"
                f"  wrongly failed {result['wrongly_failed']}"
                f"  recover {result.get('recover_s')} s  ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
            extra = {k: v for k, v in result.items() if k not in KEYS}
            print(f"{'':16} {json.dumps(extra)}", flush=True)
    print(json.dumps({name: {k: r.get(k) for k in KEYS} for name, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
