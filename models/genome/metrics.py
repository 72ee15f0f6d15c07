"""The relationship metrics by name (what a submission checks; no engine is loaded here)."""

from __future__ import annotations

from typing import Literal

Metric = Literal["grm", "king", "ibs", "dot"]
METRICS: tuple[Metric, ...] = ("grm", "king", "ibs", "dot")
