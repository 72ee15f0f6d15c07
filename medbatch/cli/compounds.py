"""``medbatch compounds search``: Tanimoto or Dice neighbours of query molecules in a library."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medbatch.cli._common import (
    add_follow,
    add_tenant,
    command,
    copy_out,
    fail,
    group,
    number,
    print_job,
    refuse_overwrite,
    require_chem_engine,
    tiled_run,
)

if TYPE_CHECKING:
    from medbatch.settings import Settings


def add_parsers(sub: Any) -> None:
    compounds, csub = group(sub, "compounds", "compound similarity (Tanimoto, Dice)")
    search = command(csub, "search", "nearest neighbours or threshold hits of queries in a library")
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
    search.add_argument("--radius", type=number(int, 0, 6), default=2, help="Morgan radius")
    search.add_argument(
        "--bits", type=number(int, 64, 16384), default=2048, help="fingerprint length"
    )
    search.add_argument("--smiles-column", default="smiles", help="for .csv inputs")
    search.add_argument(
        "--id-column",
        help="the .csv column or .sdf data item of the ids (default: a .csv's 'id' column if"
        " any, else line numbers; an .sdf's title lines)",
    )
    search.add_argument(
        "--tile-rows",
        type=number(int, 0),
        default=0,
        help="query rows per tile task (0: automatic, about 200 million pairs a tile)",
    )
    add_tenant(search)
    search.add_argument(
        "--out", type=Path, help="copy the neighbours CSV here, and wait (default: none)"
    )
    search.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_follow(search, csub)
    compounds.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.tasks import compounds as tasks

    if args.compounds_command == "status":
        return print_job(settings, tasks.TILES, args.job_id)
    if args.all_pairs == (args.query is not None):
        fail("give --query FILE or --all-pairs" + (", not both" if args.all_pairs else ""))
    if args.out:
        refuse_overwrite([args.out], force=args.force)
    if args.inline or settings.embedded_broker:
        require_chem_engine(settings)
    with tiled_run(args, settings) as run:
        job = run.submit(
            tasks.submit,
            library=args.library,
            query=args.query,
            **tasks.search_options(args),
            tile_rows=args.tile_rows,
        )
        print(
            f"compound search {job['id']}: {job['n_query']} queries x {job['n_library']} library "
            f"molecules ({job['fingerprint']}), {job['tiles_total']} tiles; "
            f"{job['unreadable']} records RDKit could not read"
        )
        for example in job["unreadable_examples"]:
            print(f"  skipped: {example}")
        for which, n in job["repeated_ids"].items():
            if n:
                print(f"  {which}: {n} molecules share an id with one before them")
        summary = run.finish_if(tasks.TILES, job["id"], wait=args.wait or args.out is not None)
        if summary is None:
            return 0
    if args.out:
        copy_out(summary["output"], args.out)
    print(f"  {args.out or summary['output']}")
    return 0
