"""``medbatch submit``: POST a JSON file of cases to the API and say what became of them."""

from __future__ import annotations

import argparse
import json
from collections import Counter, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medbatch.cli._common import command, fail, number

if TYPE_CHECKING:
    from medbatch.settings import Settings

#: Cases per request: below the API's default limit (MEDBATCH_MAX_CASES_PER_REQUEST, 1000); a
#: request over its body limit (413) is sent again as two halves.
CHUNK = 500


def add_parsers(sub: Any) -> None:
    submit = command(sub, "submit", "POST a JSON file of cases to the API; prints a summary")
    submit.add_argument("file", help="JSON: one case or a list of cases (examples/cases.json)")
    submit.add_argument("--api", default="http://127.0.0.1:8000", help="the API's base URL")
    submit.add_argument("--api-key", required=True, help="a key with the cases:submit scope")
    submit.add_argument(
        "--json", action="store_true", help="print the API's answers as JSON instead of a summary"
    )
    submit.add_argument(
        "--timeout",
        # -5, nan or inf reached the socket: a ValueError or OverflowError traceback.
        type=number(float, 0.1, 86400),
        default=60.0,
        help="seconds to wait for each request",
    )
    submit.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    import httpx

    try:
        # Bytes: json finds UTF-8 (a byte order mark too, as Windows tools write it) or UTF-16/32
        # itself, whatever the locale's encoding.
        body = json.loads(Path(args.file).read_bytes())
    except (OSError, ValueError) as exc:
        fail(f"cannot read {args.file}: {exc}")
    if isinstance(body, dict) and "resourceType" in body:
        # A FHIR user's first try: the Bundle was six "Field required" / "Extra inputs" lines.
        fail(
            f"{args.file} is a FHIR resource, not cases (examples/cases.json); send a Bundle to "
            "POST /v1/fhir (Content-Type: application/fhir+json), an NDJSON export to "
            "`medbatch nightly --input FOLDER`"
        )
    chunks = (
        [body[i : i + CHUNK] for i in range(0, max(len(body), 1), CHUNK)]
        if isinstance(body, list)
        else [body]
    )
    try:
        base = httpx.URL(args.api)
    except httpx.InvalidURL as exc:
        fail(f"--api: {args.api}: {exc}")
    if base.scheme not in ("http", "https") or not base.host:
        fail(f"--api: {args.api} is not an http:// or https:// URL")
    url = f"{args.api.rstrip('/')}/v1/cases"
    answers: list[dict[str, Any]] = []
    refused: tuple[int, Any] | None = None
    with httpx.Client(
        headers={"Authorization": f"Bearer {args.api_key}"}, timeout=args.timeout
    ) as client:
        pending = deque(chunks)
        while pending:
            chunk = pending.popleft()
            try:
                response = client.post(url, json=chunk)
            except httpx.HTTPError as exc:
                fail(
                    f"cannot reach the API at {args.api} ({type(exc).__name__}); is `medbatch api` running?",
                    code=1,
                )
            try:
                answer = response.json()
            except ValueError:
                answer = {"detail": response.text[:200]}
            if response.status_code == 413 and isinstance(chunk, list) and len(chunk) > 1:
                # Over the API's MEDBATCH_MAX_BODY_BYTES (500 ECGs of 540 samples are more than
                # its 4 MiB): its halves go instead, in order.
                half = len(chunk) // 2
                pending.extendleft([chunk[half:], chunk[:half]])
                continue
            if response.status_code != 202:
                refused = (response.status_code, answer)
                break
            answers.append(answer)
    if args.json:
        print(
            json.dumps(
                {
                    "accepted": answers,
                    "refused": refused and {"status": refused[0], "body": refused[1]},
                },
                indent=2,
            )
        )
    else:
        _summary(answers, refused)
    return 0 if refused is None else 1


def _summary(answers: list[dict[str, Any]], refused: tuple[int, Any] | None) -> None:
    cases = [c for a in answers for c in a.get("cases", [])]
    if cases:
        ids = [c["id"] for c in cases]
        new = sum(1 for c in cases if c.get("created"))
        statuses = Counter(c["status"] for c in cases)
        models = Counter(c["model"] for c in cases)
        enqueued = all(a.get("enqueued", True) for a in answers)
        print(
            f"accepted {len(cases)} cases: ids {min(ids)}-{max(ids)}, {new} new, "
            f"{len(cases) - new} already there"
        )
        print("  status: " + ", ".join(f"{n} {s}" for s, n in statuses.most_common()))
        print("  model:  " + ", ".join(f"{n} {m}" for m, n in models.most_common()))
        if not enqueued:
            print(
                "  the broker was unreachable: the cases are stored; the sweeper sends them later"
            )
    if refused is not None:
        status, body = refused
        print(f"refused ({status}) after {len(cases)} accepted cases:")
        detail = body.get("detail") if isinstance(body, dict) else body
        problems = detail if isinstance(detail, list) else [detail]
        for problem in problems[:10]:
            if isinstance(problem, dict):
                where = ".".join(str(p) for p in problem.get("loc", []))
                print(f"  {where}: {problem.get('msg')}")
            else:
                print(f"  {problem}")
        total = body.get("total") if isinstance(body, dict) else None
        if total and total > len(problems[:10]):
            print(f"  … {total} problems in all (--json for every one the API listed)")
