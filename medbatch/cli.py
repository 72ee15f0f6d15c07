"""The ``medbatch`` command line: demo, api, worker, sweeper, submit, cases, models, db."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from medbatch.settings import Settings, get_settings

if TYPE_CHECKING:
    from datetime import timedelta

    from sqlalchemy.orm import Session


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Alembic announces each of its plugins at INFO on every import.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from db.migrate import upgrade

    if args.db_command == "upgrade":
        upgrade(settings.database_url, args.revision)
        print(f"database at revision {args.revision}")
        return 0
    if args.db_command == "create-tenant":
        from sqlalchemy.exc import IntegrityError

        from db.engine import make_engine, make_sessionmaker, session_scope
        from db.repo import create_tenant

        engine = make_engine(settings.database_url)
        try:
            with session_scope(make_sessionmaker(engine)) as session:
                tenant, key = create_tenant(
                    session, name=args.name, lifetime=_key_lifetime(args, settings)
                )
                expires = _expiry(session, key)
                print(
                    json.dumps({"tenant": tenant.name, "id": tenant.id, "api_key": key, **expires})
                )
        except IntegrityError:
            print(
                f"medbatch db create-tenant: tenant {args.name!r} already exists", file=sys.stderr
            )
            return 1
        finally:
            engine.dispose()
        return 0
    if args.db_command == "create-client":
        from sqlalchemy import select

        from db.engine import make_engine, make_sessionmaker, session_scope
        from db.repo import create_client
        from db.tables import Tenant

        engine = make_engine(settings.database_url)
        try:
            with session_scope(make_sessionmaker(engine)) as session:
                tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == args.tenant))
                if tenant_id is None:
                    print(f"medbatch db create-client: no tenant {args.tenant!r}", file=sys.stderr)
                    return 2
                scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
                try:
                    client, key = create_client(
                        session,
                        tenant_id=tenant_id,
                        name=args.name,
                        scopes=scopes,
                        lifetime=_key_lifetime(args, settings),
                    )
                except ValueError as exc:
                    print(f"medbatch db create-client: --scopes: {exc}", file=sys.stderr)
                    return 2
                print(
                    json.dumps(
                        {
                            "client": client.name,
                            "id": client.id,
                            "scopes": client.scopes,
                            "api_key": key,
                            **_expiry(session, key),
                        }
                    )
                )
        finally:
            engine.dispose()
        return 0
    if args.db_command in ("rotate-key", "revoke-client", "list-clients"):
        return _key_lifecycle(args, settings)
    raise AssertionError(args.db_command)


def _key_lifetime(args: argparse.Namespace, settings: Settings) -> timedelta | None:
    """--lifetime-days, else MEDBATCH_API_KEY_LIFETIME_DAYS; 0 means never."""
    from datetime import timedelta

    days = settings.api_key_lifetime_days if args.lifetime_days is None else args.lifetime_days
    return None if days == 0 else timedelta(days=days)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds")


def _expiry(session: Session, key: str) -> dict[str, str | None]:
    from sqlalchemy import select

    from db import repo

    expires = session.scalar(
        select(repo.ApiKey.expires_at).where(repo.ApiKey.sha256 == repo.hash_api_key(key))
    )
    return {"expires_at": _iso(expires)}


def _key_lifecycle(args: argparse.Namespace, settings: Settings) -> int:
    """rotate-key, revoke-client, list-clients: a tenant's keys, never printed but once."""
    from datetime import timedelta

    from sqlalchemy import select

    from db import repo
    from db.engine import make_engine, make_sessionmaker, session_scope
    from db.tables import ApiClient, Tenant

    command = f"medbatch db {args.db_command}"
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == args.tenant))
            if tenant_id is None:
                print(f"{command}: no tenant {args.tenant!r}", file=sys.stderr)
                return 2
            if args.db_command == "list-clients":
                for row in repo.list_keys(session, tenant_id=tenant_id):
                    print(
                        json.dumps(
                            {k: _iso(v) if isinstance(v, datetime) else v for k, v in row.items()}
                        )
                    )
                return 0
            client = None
            name = getattr(args, "client", None)
            if name is not None:
                client = session.scalar(
                    select(ApiClient).where(
                        ApiClient.tenant_id == tenant_id, ApiClient.name == name
                    )
                )
                if client is None:
                    print(
                        f"{command}: tenant {args.tenant!r} has no client {name!r}", file=sys.stderr
                    )
                    return 2
            if args.db_command == "revoke-client":
                assert client is not None
                keys = repo.revoke_client(session, client_id=client.id)
                print(json.dumps({"client": client.name, "id": client.id, "keys_revoked": keys}))
                return 0
            if client is not None and client.revoked_at is not None:
                print(f"{command}: client {name!r} is revoked; create a new one", file=sys.stderr)
                return 2
            hours = (
                settings.api_key_rotation_overlap_h
                if args.overlap_hours is None
                else args.overlap_hours
            )
            rotated = repo.rotate_key(
                session,
                tenant_id=tenant_id,
                client_id=None if client is None else client.id,
                overlap=timedelta(hours=hours),
                lifetime=_key_lifetime(args, settings),
            )
            print(
                json.dumps(
                    {
                        "tenant": args.tenant,
                        "client": name,
                        "key_id": rotated.key_id,
                        "api_key": rotated.key,
                        "expires_at": _iso(rotated.expires_at),
                        "previous_keys_work_until": {
                            str(k): _iso(until) for k, until in rotated.overlapping
                        },
                    }
                )
            )
            return 0
    finally:
        engine.dispose()


def cmd_cases(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    from db import repo
    from db.engine import make_engine, make_sessionmaker, session_scope
    from db.tables import Tenant
    from worker.app import create_app
    from worker.queues import enqueue_cases

    if args.cases_command != "replay":
        raise AssertionError(args.cases_command)
    if not (args.all or args.tenant or args.case_ids):
        print("medbatch cases replay: say which: --all, --tenant NAME or case ids", file=sys.stderr)
        return 2
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            tenant_id = None
            if args.tenant:
                tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == args.tenant))
                if tenant_id is None:
                    print(f"medbatch cases replay: no tenant {args.tenant!r}", file=sys.stderr)
                    return 2
            replayed = repo.replay_dead_letters(
                session, tenant_id=tenant_id, case_ids=args.case_ids or None
            )
        if replayed:
            app = create_app(settings, include_tasks=False)
            try:
                enqueue_cases(app, replayed, per_message=settings.cases_per_message)
            finally:
                app.close()
    finally:
        engine.dispose()
    print(f"re-queued {len(replayed)} dead-lettered cases")
    return 0


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    if args.models_command == "list":
        from models.cases.registry import load_registry

        for spec in load_registry(settings.artifact_dir):
            default = " (default)" if spec.default else ""
            print(
                f"{spec.ref}{default}\t{spec.status}\t{spec.architecture}\t"
                f"{len(spec.inputs)} {spec.input_kind} inputs\tthreshold {spec.threshold}\t"
                f"sha256 {spec.sha256}"
            )
            print(f"    output: {spec.output}")
            if spec.clinical_use:
                print(f"    clinical use: {spec.clinical_use}")
        return 0
    if args.models_command == "register":
        from models.cases.byo import RegistrationError, register

        try:
            params = json.loads(args.params) if args.params else None
            entry = register(
                args.path,
                name=args.name,
                version=args.version,
                schema_path=args.schema,
                artifact_dir=settings.artifact_dir,
                architecture=args.architecture,
                params=params,
            )
        except (RegistrationError, ValueError) as exc:
            print(f"medbatch models register: {exc}", file=sys.stderr)
            return 2
        print(f"registered {entry['name']}@{entry['version']} ({entry['architecture']})")
        print(f"  artifact {settings.artifact_dir / entry['artifact']}")
        print(f"  sha256 {entry['sha256']}")
        return 0
    if args.models_command == "evaluate":
        from models.cases.registry import Registry, RegistryError
        from models.reference.evaluation import NoEvaluationData, evaluate, report_dir

        try:
            spec = Registry.load().resolve(args.ref)
            out = args.out or report_dir(settings.artifact_dir, spec)
            evaluation = evaluate(spec, out)
        except (RegistryError, NoEvaluationData) as exc:
            print(f"medbatch models evaluate: {exc.args[0]}", file=sys.stderr)
            return 2
        metrics = evaluation["metrics"]
        print(f"{spec.ref} on {metrics['n']} held-out cases -> {out}")
        for key in (
            "c_index",
            "roc_auc",
            "pr_auc",
            "accuracy",
            "recall",
            "precision",
            "f1",
            "specificity",
            "f1_negative",
        ):
            if key in metrics:
                print(f"  {key:10} {metrics[key]:.4f}")
        print(f"  {'brier':10} {metrics['brier']:.4f}")
        return 0
    if args.models_command == "shadow":
        from models.cases.shadow import ShadowError, clear_shadow, set_shadow

        if args.off:
            previous = clear_shadow(settings.artifact_dir, args.ref.partition("@")[0])
            print(f"{args.ref}: no shadow" + (f" (was {previous})" if previous else ""))
            return 0
        try:
            released, candidate = set_shadow(settings.artifact_dir, args.ref)
        except ShadowError as exc:
            print(f"medbatch models shadow: {exc}", file=sys.stderr)
            return 2
        print(f"{candidate.ref} shadows {released.ref} (workers pick it up when they start)")
        return 0
    if args.models_command == "drift":
        return _drift(args, settings)
    if args.models_command == "train":
        from models.reference.train import train

        try:
            report = train(
                args.name, out_dir=args.out or settings.artifact_dir, install=args.install
            )
        except (ValueError, FileNotFoundError) as exc:
            print(f"medbatch models train: {exc}", file=sys.stderr)
            return 2
        m = report.metrics
        print(f"trained {report.name}@{report.version} -> {report.artifact}")
        print(f"  sha256 {report.sha256}")
        if not m:
            print("  benchmark weights (seeded initialisation, untrained): not for clinical use")
            return 0
        if report.committed_sha256 and not args.install:
            same = "identical to" if report.sha256 == report.committed_sha256 else "differs from"
            print(f"  {same} the packaged artifact ({report.committed_sha256[:12]}…)")
        for key, value in m.items():
            print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
        return 0
    raise AssertionError(args.models_command)


def _drift(args: argparse.Namespace, settings: Settings) -> int:
    from db import repo
    from db.engine import make_engine, make_sessionmaker, session_scope
    from models.cases.registry import RegistryError, load_registry
    from models.cases.shadow import ShadowError, drift

    registry = load_registry(settings.artifact_dir)
    try:
        released = registry.resolve(f"{args.name}@{args.released}" if args.released else args.name)
        version = args.candidate or registry.shadows.get(args.name)
        if version is None:
            raise ShadowError(f"{args.name} has no shadow; name one with --candidate VERSION")
        candidate = registry.resolve(f"{args.name}@{version}")
        engine = make_engine(settings.database_url)
        with session_scope(make_sessionmaker(engine)) as session:
            pairs = repo.shadow_pairs(
                session, name=args.name, released=released.version, candidate=candidate.version
            )
        engine.dispose()
        result = drift(released, candidate, pairs)
    except (RegistryError, ShadowError) as exc:
        print(f"medbatch models drift: {exc.args[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    print(f"{result.candidate} against {result.released} on {result.cases} cases scored by both")
    print(f"  mean |difference|      {result.mean_abs_diff:.4f} (max {result.max_abs_diff:.4f})")
    print(f"  Spearman rank corr.    {result.spearman:.4f}")
    print(
        f"  flips at the threshold {result.flips} ({result.flips / result.cases:.1%}): "
        f"{result.flips_up} up, {result.flips_down} down"
    )
    return 0


def cmd_genome(args: argparse.Namespace, settings: Settings) -> int:
    import shutil

    from sqlalchemy import select

    from db import genome as jobs
    from db import repo
    from db.engine import make_engine, make_sessionmaker, session_scope
    from db.tables import Tenant
    from worker.tasks import genome as tasks

    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    if args.genome_command == "status":
        with session_scope(sessions) as session:
            found = jobs.get_job(session, job_id=args.job_id)
            if found is None:
                print(f"medbatch genome status: no job {args.job_id}", file=sys.stderr)
                return 2
            print(json.dumps(tasks.describe(found), default=str, indent=2))
        return 0
    inline = args.inline or settings.embedded_broker
    with session_scope(sessions) as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == args.tenant))
        if tenant_id is None:
            tenant_id = repo.create_tenant(session, name=args.tenant)[0].id
    keep = None
    if args.keep is not None:
        try:
            lines = [line.split() for line in args.keep.read_text().splitlines() if line.strip()]
        except OSError as exc:
            print(f"medbatch genome compare: --keep: {exc}", file=sys.stderr)
            return 2
        keep = [f[0] if len(f) == 1 else (f[0], f[1]) for f in lines]
    app = None if inline else _celery(settings)
    try:
        job = tasks.submit(
            sessions,
            app,
            tenant_id=tenant_id,
            metric=args.metric,
            bfile=args.bfile or args.vcf,
            query=args.query,
            threshold=args.threshold,
            ibs_missing=args.ibs_missing,
            tile_rows=args.tile_rows or settings.genome_tile_rows,
            keep=keep,
            min_maf=args.min_maf,
            artifact_dir=settings.artifact_dir,
            output="pairs" if args.table else "square",
            block=args.block,
        )
    except tasks.SubmissionError as exc:
        option = "vcf" if exc.field == "bfile" and args.vcf else exc.field.replace("_", "-")
        option = "table" if option == "output" else option
        print(f"medbatch genome compare: --{option}: {exc}", file=sys.stderr)
        return 2
    where = "in this process" if inline else "on the genome queue"
    shape = "pairs only, " if args.table else ""
    print(
        f"genome comparison {job['id']}: {job['metric']}, {shape}{job['n_rows']} x "
        f"{job['n_samples']} samples, {job['n_variants']} variants, {job['tiles_total']} tiles "
        f"{where}"
    )
    if inline:
        summary = tasks.run_inline(
            sessions, job_id=job["id"], device=settings.device, progress=True
        )
    elif args.wait or args.out:
        summary = tasks.wait(sessions, job_id=job["id"], progress=True)
    else:
        return 0
    if summary["status"] != "done":
        print(
            f"medbatch genome compare: job {job['id']} failed: {summary['error']}", file=sys.stderr
        )
        return 1
    for path in summary["outputs"]:
        target = path
        if args.out:
            target = str(args.out) + Path(path).name.removeprefix(job["metric"])
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        print(f"  {target}")
    if job["metric"] == "king":
        degrees = summary["degree_counts"] or {}
        relation = ">=" if args.table else ">"
        print(f"  {sum(degrees.values())} pairs with kinship {relation} {args.threshold:.4f}")
        for degree, count in degrees.items():
            print(f"    {degree:<18} {count}")
    engine.dispose()
    return 0


def cmd_nightly(args: argparse.Namespace, settings: Settings) -> int:
    import time
    from datetime import UTC, datetime

    from sqlalchemy import select

    from db import repo
    from db.engine import make_engine, make_sessionmaker, session_scope
    from db.tables import Tenant
    from models.cases.registry import RegistryError, load_registry
    from worker.fhir_intake import run_nightly, settle_counts

    if not (args.input / "Patient.ndjson").is_file():
        print(f"medbatch nightly: --input: no Patient.ndjson in {args.input}", file=sys.stderr)
        return 2
    try:
        spec = load_registry(settings.artifact_dir).resolve(args.model)
    except RegistryError as exc:
        print(f"medbatch nightly: --model: {exc}", file=sys.stderr)
        return 2
    as_of = args.as_of or datetime.now(UTC)
    if as_of.tzinfo is None:
        print(
            "medbatch nightly: --as-of needs a time zone, e.g. 2026-11-23T02:00:00Z",
            file=sys.stderr,
        )
        return 2
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == args.tenant))
        if tenant_id is None:
            tenant_id = repo.create_tenant(session, name=args.tenant)[0].id
    app = None if settings.embedded_broker else _celery(settings)
    summary = run_nightly(
        args.input,
        spec,
        sessions=sessions,
        app=app,
        tenant_id=tenant_id,
        as_of=as_of,
        lookback_days=args.lookback_days,
        per_message=settings.cases_per_message,
        progress=True,
    )
    if app is None:
        print("embedded broker: cases are stored, not sent; start a worker on a real broker")
    elif args.wait:
        while not settle_counts(sessions, summary):
            time.sleep(1.0)
    settle_counts(sessions, summary)
    engine.dispose()
    print(json.dumps(summary.as_dict(), indent=2))
    return 0


def cmd_compounds(args: argparse.Namespace, settings: Settings) -> int:
    import shutil

    from sqlalchemy import select

    from db import repo
    from db.engine import make_engine, make_sessionmaker, session_scope
    from db.tables import Tenant
    from worker.tasks import compounds as tasks

    if args.all_pairs == (args.query is not None):
        print("medbatch compounds search: give --query FILE or --all-pairs", file=sys.stderr)
        return 2
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == args.tenant))
        if tenant_id is None:
            tenant_id = repo.create_tenant(session, name=args.tenant)[0].id
    inline = args.inline or settings.embedded_broker
    try:
        job = tasks.submit(
            sessions,
            None if inline else _celery(settings),
            tenant_id=tenant_id,
            library=args.library,
            query=args.query,
            top_k=args.top_k,
            threshold=args.threshold,
            metric=args.metric,
            kind=args.fingerprint,
            radius=args.radius,
            fp_size=args.bits,
            smiles_column=args.smiles_column,
            tile_rows=args.tile_rows,
            artifact_dir=settings.artifact_dir,
        )
    except tasks.SubmissionError as exc:
        print(f"medbatch compounds search: --{exc.field.replace('_', '-')}: {exc}", file=sys.stderr)
        return 2
    print(
        f"compound search {job['id']}: {job['n_query']} queries x {job['n_library']} library "
        f"molecules ({job['fingerprint']}), {job['tiles_total']} tiles; "
        f"{job['unreadable']} records RDKit could not read"
    )
    for example in job["unreadable_examples"]:
        print(f"  skipped: {example}")
    if inline:
        summary = tasks.run_inline(
            sessions,
            job_id=job["id"],
            device=settings.device,
            progress=True,
            engine=settings.chem_engine,
            engine_cache=settings.chem_engine_cache,
        )
    else:
        summary = tasks.wait(sessions, job_id=job["id"], progress=True)
    engine.dispose()
    if summary["status"] != "done":
        print(
            f"medbatch compounds search: job {job['id']} failed: {summary['error']}",
            file=sys.stderr,
        )
        return 1
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(summary["output"], args.out)
    print(f"  {args.out or summary['output']}")
    return 0


def _celery(settings: Settings):
    from worker.app import create_app

    return create_app(settings, include_tasks=False)


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from api_shim.main import create_app

    # No uvicorn access log: it prints query strings, which may name a patient
    # (?subject=Patient/…). api_shim/audit.py logs each request by its route template instead.
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        access_log=False,
    )
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import create_app, run_worker, worker_argv
    from worker.context import context

    app = create_app(settings)
    queues = tuple(q.strip() for q in args.queues.split(",") if q.strip())
    if queues in (("genome",), ("chem",), ("genome", "chem"), ("chem", "genome")):
        # A tile is seconds of work: take one at a time, so every genome worker gets its share.
        app.conf.worker_prefetch_multiplier = 1
    if args.sweeper or args.beat:
        from worker.sweeper import Sweeper

        Sweeper(settings, app=app, sessions=context(app).sessions).start_thread()
    return run_worker(
        app, worker_argv(settings, queues=queues, beat=args.beat, hostname=args.hostname)
    )


def cmd_sweeper(args: argparse.Namespace, settings: Settings) -> int:
    from worker.sweeper import run_sweeper

    return run_sweeper(settings)


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    import httpx

    try:
        body = json.loads(Path(args.file).read_text())
    except (OSError, ValueError) as exc:
        print(f"medbatch submit: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    response = httpx.post(
        f"{args.api.rstrip('/')}/v1/cases",
        json=body,
        headers={"Authorization": f"Bearer {args.api_key}"},
        timeout=60,
    )
    print(json.dumps(response.json(), indent=2))
    return 0 if response.status_code == 202 else 1


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from medbatch.demo import run_demo

    return run_demo(settings, timeout_s=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    from models.reference.train import TRAINABLE
    from worker.queues import SCORE_QUEUES

    parser = argparse.ArgumentParser(prog="medbatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="embedded broker + API + worker; score the held-out cases")
    demo.add_argument("--timeout", type=float, default=150.0, help="seconds to wait for scores")
    demo.set_defaults(func=cmd_demo)

    api = sub.add_parser("api", help="run the HTTP shim")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run a Celery worker (one per GPU or core group)")
    worker.add_argument("--queues", default=",".join(SCORE_QUEUES))
    worker.add_argument(
        "--beat", action="store_true", help="also run the beat schedule (nightly) and a sweeper"
    )
    worker.add_argument(
        "--sweeper", action="store_true", help="also run the sweeper, in a thread of its own"
    )
    worker.add_argument("--hostname", default=None, help="Celery node name")
    worker.set_defaults(func=cmd_worker)

    sweeper = sub.add_parser(
        "sweeper",
        help="hand back what dead workers held and what the broker lost (safe to run several)",
    )
    sweeper.set_defaults(func=cmd_sweeper)

    submit = sub.add_parser("submit", help="POST a JSON file of cases to the API")
    submit.add_argument("file")
    submit.add_argument("--api", default="http://127.0.0.1:8000")
    submit.add_argument("--api-key", required=True)
    submit.set_defaults(func=cmd_submit)

    cases = sub.add_parser("cases", help="cases in the database")
    csub = cases.add_subparsers(dest="cases_command", required=True)
    replay = csub.add_parser("replay", help="re-queue dead-lettered cases with a fresh count")
    replay.add_argument("case_ids", nargs="*", type=int, help="only these case ids")
    replay.add_argument("--tenant", help="only this tenant's cases")
    replay.add_argument("--all", action="store_true", help="every dead-lettered case")
    cases.set_defaults(func=cmd_cases)

    models = sub.add_parser("models", help="the model registry")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="list registered model versions")
    train = msub.add_parser("train", help="train a reference model reproducibly")
    train.add_argument("name", help=f"one of: {', '.join(TRAINABLE)}")
    train.add_argument(
        "--out", type=Path, default=None, help="folder (default: MEDBATCH_ARTIFACT_DIR)"
    )
    train.add_argument(
        "--install", action="store_true", help="replace the packaged artifact and registry entry"
    )
    reg = msub.add_parser("register", help="validate and register your own model artifact")
    reg.add_argument("path", type=Path, help="TorchScript, torch.export program or safetensors")
    reg.add_argument("--name", required=True)
    reg.add_argument("--version", required=True)
    reg.add_argument("--schema", type=Path, required=True, help="JSON: inputs, output, threshold")
    reg.add_argument("--architecture", help="for a safetensors state dict: a built-in (mlp)")
    reg.add_argument("--params", help="JSON hyper-parameters of --architecture")
    shadow = msub.add_parser(
        "shadow", help="let a candidate version also score the released version's cases"
    )
    shadow.add_argument("ref", help="NAME@VERSION of a candidate (with --off: NAME)")
    shadow.add_argument("--off", action="store_true", help="stop shadowing NAME")
    drift = msub.add_parser("drift", help="compare a shadowing candidate with the released version")
    drift.add_argument("name")
    drift.add_argument("--candidate", help="version (default: the current shadow)")
    drift.add_argument("--released", help="version (default: the default version)")
    drift.add_argument("--json", action="store_true", help="one JSON object")
    evaluate = msub.add_parser("evaluate", help="held-out metrics and plots of a model version")
    evaluate.add_argument("ref", help="NAME or NAME@VERSION")
    evaluate.add_argument(
        "--out", type=Path, default=None, help="folder (default: MEDBATCH_ARTIFACT_DIR/reports/…)"
    )
    models.set_defaults(func=cmd_models)

    genome = sub.add_parser("genome", help="genome comparisons: relationship matrices, relatives")
    gsub = genome.add_subparsers(dest="genome_command", required=True)
    compare = gsub.add_parser(
        "compare", help="a relationship matrix (and related pairs) of a PLINK 1 fileset"
    )
    source = compare.add_mutually_exclusive_group(required=True)
    source.add_argument("--bfile", type=Path, help="PLINK 1 fileset prefix (.bed/.bim/.fam)")
    source.add_argument("--vcf", type=Path, help="VCF or BCF file (biallelic, diploid)")
    compare.add_argument(
        "--query",
        type=Path,
        help="new samples (fileset prefix or VCF, same variants) to compare against the cohort only",
    )
    compare.add_argument("--metric", choices=["grm", "king", "ibs", "dot"], required=True)
    compare.add_argument("--out", type=Path, help="copy the outputs to OUT.rel, … (waits)")
    compare.add_argument(
        "--threshold", type=float, default=2.0**-4.5, help="KING kinship of recorded pairs"
    )
    compare.add_argument("--ibs-missing", choices=["frequency", "flat"], default="frequency")
    compare.add_argument(
        "--keep",
        type=Path,
        help="samples to keep: a file of 'IID' or 'FID IID' lines (plink --keep)",
    )
    compare.add_argument(
        "--min-maf", type=float, help="drop variants with a lower minor allele frequency"
    )
    compare.add_argument("--tile-rows", type=int, default=0, help="result rows per tile task")
    compare.add_argument(
        "--table",
        action="store_true",
        help="KING pairs only (kinship >= --threshold) as plink2's .kin0, in 2-D tiles: no "
        "N x N matrix (plink2 --make-king-table --king-table-filter)",
    )
    compare.add_argument(
        "--block", type=int, default=0, help="with --table: samples per side of a tile"
    )
    compare.add_argument("--tenant", default="local", help="owner of the job (created if new)")
    compare.add_argument("--wait", action="store_true", help="show progress until it is done")
    compare.add_argument(
        "--inline",
        action="store_true",
        help="run the tiles in this process (the default with the embedded broker)",
    )
    gstatus = gsub.add_parser("status", help="a job's progress and outputs")
    gstatus.add_argument("job_id", type=int)
    genome.set_defaults(func=cmd_genome)

    compounds = sub.add_parser("compounds", help="compound similarity (Tanimoto, Dice)")
    csub = compounds.add_subparsers(dest="compounds_command", required=True)
    search = csub.add_parser(
        "search", help="nearest neighbours or threshold hits of queries in a library"
    )
    search.add_argument("--library", type=Path, required=True, help=".smi, .sdf or .csv")
    search.add_argument("--query", type=Path, help="queries (.smi, .sdf, .csv)")
    search.add_argument("--all-pairs", action="store_true", help="the library against itself")
    mode = search.add_mutually_exclusive_group(required=True)
    mode.add_argument("--top-k", type=int, help="the K most similar per query")
    mode.add_argument("--threshold", type=float, help="every pair at or above this")
    search.add_argument("--metric", choices=["tanimoto", "dice"], default="tanimoto")
    search.add_argument(
        "--fingerprint",
        choices=["morgan", "feature-morgan", "rdkit", "atom-pair", "torsion"],
        default="morgan",
    )
    search.add_argument("--radius", type=int, default=2)
    search.add_argument("--bits", type=int, default=2048)
    search.add_argument("--smiles-column", default="smiles", help="for .csv inputs")
    search.add_argument("--tile-rows", type=int, default=0)
    search.add_argument("--tenant", default="local")
    search.add_argument("--out", type=Path, help="copy the neighbours CSV here")
    search.add_argument("--inline", action="store_true", help="no worker: compute here")
    compounds.set_defaults(func=cmd_compounds)

    nightly = sub.add_parser(
        "nightly", help="score a FHIR Bulk Data export (NDJSON folder) on score.bulk"
    )
    nightly.add_argument("--input", type=Path, required=True, help="folder with Patient.ndjson, …")
    nightly.add_argument("--model", default="whas500-mortality")
    nightly.add_argument("--tenant", default="local", help="owner of the cases (created if new)")
    nightly.add_argument(
        "--as-of", type=datetime.fromisoformat, help="the moment to score at (default: now)"
    )
    nightly.add_argument("--lookback-days", type=int, default=730)
    nightly.add_argument("--wait", action="store_true", help="wait until every case is scored")
    nightly.set_defaults(func=cmd_nightly)

    db = sub.add_parser("db", help="database schema and tenants")
    dsub = db.add_subparsers(dest="db_command", required=True)
    up = dsub.add_parser("upgrade", help="run Alembic migrations")
    up.add_argument("revision", nargs="?", default="head")
    lifetime = argparse.ArgumentParser(add_help=False)
    lifetime.add_argument(
        "--lifetime-days",
        type=int,
        help="days the new key works (default: MEDBATCH_API_KEY_LIFETIME_DAYS, 365; 0: never)",
    )
    tenant = dsub.add_parser(
        "create-tenant", parents=[lifetime], help="create a tenant and print its API key once"
    )
    tenant.add_argument("name")
    client = dsub.add_parser(
        "create-client",
        parents=[lifetime],
        help="an API client of a tenant with scopes; prints its key once",
    )
    client.add_argument("tenant")
    client.add_argument("name")
    client.add_argument(
        "--scopes",
        required=True,
        help="comma-separated: cases:submit, results:read, genome:submit, compounds:submit, admin",
    )
    rotate = dsub.add_parser(
        "rotate-key",
        parents=[lifetime],
        help="a new key for a tenant (or --client); the old ones work until the overlap ends",
    )
    rotate.add_argument("tenant")
    rotate.add_argument("--client", help="rotate this client's key instead of the tenant's own")
    rotate.add_argument(
        "--overlap-hours",
        type=float,
        help="hours the previous keys keep working (default: MEDBATCH_API_KEY_ROTATION_OVERLAP_H, "
        "24; 0: they stop now)",
    )
    revoke = dsub.add_parser("revoke-client", help="stop every key of a client, now")
    revoke.add_argument("tenant")
    revoke.add_argument("client")
    listing = dsub.add_parser(
        "list-clients", help="a tenant's keys: client, scopes, state, expiry, last use (no keys)"
    )
    listing.add_argument("tenant")
    db.set_defaults(func=cmd_db)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = get_settings()
    _setup_logging(settings)
    return int(args.func(args, settings))


if __name__ == "__main__":
    sys.exit(main())
