"""``medbatch compounds search``: Tanimoto or Dice neighbours of query molecules in a library."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medbatch.cli._common import (
    HelpFormatter,
    celery,
    database,
    fail,
    follow,
    refuse_overwrite,
    tenant_id,
)

if TYPE_CHECKING:
    from medbatch.settings import Settings


def add_parsers(sub: Any) -> None:
    compounds = sub.add_parser(
        "compounds", help="compound similarity (Tanimoto, Dice)", formatter_class=HelpFormatter
    )
    csub = compounds.add_subparsers(dest="compounds_command", required=True, metavar="COMMAND")
    search = csub.add_parser(
        "search",
        help="nearest neighbours or threshold hits of queries in a library",
        formatter_class=HelpFormatter,
    )
    search.add_argument(
        "--library",
        type=Path,
        required=True,
        help=".smi, .sdf or .csv (examples/compounds/library.sdf)",
    )
    search.add_argument(
        "--query", type=Path, help="queries: .smi, .sdf or .csv (examples/compounds/hits.smi)"
    )
    search.add_argument("--all-pairs", action="store_true", help="the library against itself")
    mode = search.add_mutually_exclusive_group(required=True)
    mode.add_argument("--top-k", type=int, help="the K most similar per query")
    mode.add_argument("--threshold", type=float, help="every pair at or above this")
    search.add_argument(
        "--metric", choices=["tanimoto", "dice"], default="tanimoto", help="similarity"
    )
    search.add_argument(
        "--fingerprint",
        choices=["morgan", "feature-morgan", "rdkit", "atom-pair", "torsion"],
        default="morgan",
        help="RDKit fingerprint kind",
    )
    search.add_argument("--radius", type=int, default=2, help="Morgan radius")
    search.add_argument("--bits", type=int, default=2048, help="fingerprint length")
    search.add_argument("--smiles-column", default="smiles", help="for .csv inputs")
    search.add_argument(
        "--tile-rows", type=int, default=0, help="library rows per tile task (0: automatic)"
    )
    search.add_argument("--tenant", default="local", help="owner of the job (created if new)")
    search.add_argument("--out", type=Path, help="copy the neighbours CSV here (default: none)")
    search.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    search.add_argument(
        "--inline",
        action="store_true",
        help="compute in this process, no worker (always so with the embedded broker)",
    )
    compounds.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    import shutil

    from worker.queues import CHEM_QUEUE
    from worker.tasks import compounds as tasks

    if args.all_pairs == (args.query is not None):
        fail("give --query FILE or --all-pairs")
    if args.out:
        refuse_overwrite([args.out], force=args.force)
    inline = args.inline or settings.embedded_broker
    app = None if inline else celery(settings)
    with database(settings) as sessions:
        owner = tenant_id(sessions, args.tenant, create=True)
        try:
            job = tasks.submit(
                sessions,
                app,
                tenant_id=owner,
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
            fail(f"--{exc.field.replace('_', '-')}: {exc}")
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
            summary = follow(
                lambda: tasks.describe_id(sessions, job["id"]), app=app, queue=CHEM_QUEUE
            )
    if summary["status"] != "done":
        fail(f"job {job['id']} failed: {summary['error']}", code=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(summary["output"], args.out)
    print(f"  {args.out or summary['output']}")
    return 0
