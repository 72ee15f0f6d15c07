"""Shared test data: real Wisconsin cases as API payloads, and broker inspection."""

from __future__ import annotations

import base64
import json

import redis

from models import breast_cancer
from worker.queues import ALL_QUEUES


def wdbc_cases(n: int, *, prefix: str = "wdbc", priority: str = "routine") -> list[dict]:
    """``n`` real Wisconsin cases (held-out ones first) as POST /v1/cases items."""
    split = breast_cancer.split()
    rows = [*split.x_test, *split.x_train]
    return [
        {
            "external_id": f"{prefix}-{i:04d}",
            "model": "breast-cancer",
            "priority": priority,
            "features": dict(zip(split.feature_names, map(float, x), strict=True)),
        }
        for i, x in enumerate(rows[:n])
    ]


def queued_messages(client: redis.Redis) -> dict[str, list[dict]]:
    """Messages waiting in each medbatch queue (kombu's Redis transport keeps a list per queue)."""
    out: dict[str, list[dict]] = {}
    for queue in ALL_QUEUES:
        out[queue] = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    return out


def queued_case_ids(client: redis.Redis) -> dict[str, list[int]]:
    """Case ids carried by the queued scoring messages, per queue."""
    out: dict[str, list[int]] = {}
    for queue, messages in queued_messages(client).items():
        ids: list[int] = []
        for message in messages:
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            ids += args[0]
        out[queue] = ids
    return out
