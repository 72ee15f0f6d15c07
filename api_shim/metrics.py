"""Prometheus metrics of the API process (served at /metrics)."""

from prometheus_client import Counter

CASES_SUBMITTED = Counter(
    "medbatch_cases_submitted_total", "Cases accepted by POST /v1/cases", ["model", "priority"]
)
