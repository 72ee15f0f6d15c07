"""``medbatch genome``: relationship matrices and related pairs of a cohort (or new samples
against it), in PLINK's formats."""

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
    tiled_run,
)

if TYPE_CHECKING:
    from medbatch.settings import Settings

#: PLINK's file of each metric's square matrix (``dot`` has none).
_PLINK = {"grm": ".rel", "king": ".king", "ibs": ".mibs"}
#: KING's degree names as the CLI prints them (models.genome_pairs.DEGREES).
DEGREE_ORDER = ("duplicate/MZ twin", "1st", "2nd", "3rd", "unrelated", "unknown")


def add_parsers(sub: Any) -> None:
    genome, gsub = group(sub, "genome", "genome comparisons: relationship matrices, relatives")
    compare = command(
        gsub, "compare", "a relationship matrix (and related pairs) of a PLINK 1 fileset or VCF"
    )
    source = compare.add_mutually_exclusive_group(required=True)
    source.add_argument("--bfile", type=Path, help="PLINK 1 fileset prefix (.bed/.bim/.fam)")
    source.add_argument("--vcf", type=Path, help="VCF or BCF file (biallelic, diploid)")
    # plink2's own option, for a PLINK 2 user's first try: refused with how to convert.
    source.add_argument("--pfile", type=Path, help=argparse.SUPPRESS)
    compare.add_argument(
        "--query",
        type=Path,
        help="new samples (fileset prefix or VCF, same variants) to compare against the cohort "
        "only (default: every cohort pair)",
    )
    compare.add_argument(
        "--metric", choices=["grm", "king", "ibs", "dot"], required=True, help="the matrix"
    )
    compare.add_argument(
        "--out",
        type=Path,
        help="copy the outputs to OUT.rel, OUT.king, OUT.<metric>.npy, OUT.kin0 … and wait "
        "(default: they stay under MEDBATCH_ARTIFACT_DIR)",
    )
    compare.add_argument("--force", action="store_true", help="overwrite existing --out files")
    compare.add_argument(
        "--threshold",
        type=float,
        default=2.0**-4.5,
        help="KING kinship above which a pair is recorded (2^-4.5: third degree)",
    )
    compare.add_argument(
        "--ibs-missing",
        choices=["frequency", "flat"],
        default="frequency",
        help="how IBS fills a missing call",
    )
    compare.add_argument(
        "--keep",
        type=Path,
        help="samples to keep: a file of 'IID' or 'FID IID' lines, as plink --keep (default: all)",
    )
    compare.add_argument(
        "--min-maf",
        type=float,
        help="drop variants with a lower minor allele frequency (default: keep all)",
    )
    compare.add_argument(
        "--tile-rows",
        type=number(int, 0),
        default=0,
        help="result rows per tile task (0: automatic)",
    )
    compare.add_argument(
        "--table",
        action="store_true",
        help="KING pairs only (kinship >= --threshold) as plink2's .kin0, in 2-D tiles: no "
        "N x N matrix (plink2 --make-king-table --king-table-filter)",
    )
    compare.add_argument(
        "--block",
        type=number(int, 0),
        default=0,
        help="with --table: samples per side of a tile (0: auto)",
    )
    add_tenant(compare)
    add_follow(compare, gsub)
    genome.set_defaults(func=run)


def out_name(out: Path, metric: str, produced: str) -> Path:
    """Where ``--out`` puts a produced file (``king.npy`` → ``OUT.king.npy``): the PLINK files
    keep their metric's own extension; the rest get the metric in their name, so that runs of
    several metrics into one ``--out`` never overwrite each other."""
    suffix = produced.removeprefix(metric)
    if suffix in (_PLINK.get(metric), f"{_PLINK.get(metric)}.id", ".kin0"):
        return Path(f"{out}{suffix}")
    return Path(f"{out}.{metric}{suffix}")


def expected_outputs(metric: str, *, query: bool, table: bool) -> list[str]:
    """The file names a job writes (as ``describe`` lists them), known before it runs."""
    from worker.jobs.genome import output_names

    return output_names(metric, query=query, pairs=table)


def print_degrees(degrees: dict[str, int] | None, *, threshold: float, table: bool) -> None:
    degrees = degrees or {}
    relation = ">=" if table else ">"
    print(f"  {sum(degrees.values())} pairs with kinship {relation} {threshold:.3g}")
    for degree in DEGREE_ORDER:
        print(f"    {degree:<18} {degrees.get(degree, 0)}")


def keep_entries(text: str) -> list[str | tuple[str, str]]:
    """A ``--keep`` file's samples: ``IID`` or ``FID IID`` lines (more columns are ignored, so a
    .fam serves). ``#`` lines are a header or comments, as plink2 reads them: its own ``#FID IID``
    (a .king.id, an .id file); after ``#IID`` the first column is the IID."""
    iid_only = False
    entries: list[str | tuple[str, str]] = []
    for line in text.splitlines():
        # ASCII whitespace only, as the .fam is split (models.genome.io.plink): a no-break space
        # belongs to its IID.
        fields = [field.decode("utf-8") for field in line.encode("utf-8").split()]
        if not fields:
            continue
        if fields[0].startswith("#"):
            iid_only = iid_only or (not entries and fields[0] == "#IID")
            continue
        entries.append(fields[0] if iid_only or len(fields) == 1 else (fields[0], fields[1]))
    return entries


def _option(field: str, *, vcf: bool) -> str:
    """The option behind a refused submission's ``field``."""
    if field == "bfile" and vcf:
        return "vcf"
    return "table" if field == "output" else field.replace("_", "-")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.tasks import genome as tasks

    if args.genome_command == "status":
        return print_job(settings, tasks.TILES, args.job_id)
    if args.pfile is not None:
        from models.genome.io.plink import PGEN_HINT

        fail(f"--pfile: {PGEN_HINT}; then give --bfile PREFIX")
    if args.vcf is not None:
        from models.genome.io.vcf import VCF_SUFFIXES, is_vcf

        if not is_vcf(args.vcf):
            # It was read as a PLINK prefix: "PLINK fileset x.txt: x.txt.bed not found".
            kinds = f"{', '.join(VCF_SUFFIXES[:-1])} or {VCF_SUFFIXES[-1]}"
            fail(f"--vcf: {args.vcf} is not a {kinds} file (a PLINK fileset goes to --bfile)")
    if args.out:
        planned = expected_outputs(args.metric, query=args.query is not None, table=args.table)
        refuse_overwrite(
            [out_name(args.out, args.metric, name) for name in planned], force=args.force
        )
    keep = None
    if args.keep is not None:
        try:
            # utf-8-sig: a byte order mark (Windows tools write one) is not part of the first IID.
            keep = keep_entries(args.keep.read_text(encoding="utf-8-sig"))
        except OSError as exc:
            fail(f"--keep: {exc}")
        except UnicodeDecodeError as exc:
            fail(f"--keep: {args.keep} is not UTF-8 text (byte {exc.start + 1})")
        if not keep:
            fail(f"--keep: {args.keep} names no sample (plink --keep would keep none)")
    with tiled_run(args, settings) as run:
        job = run.submit(
            tasks.submit,
            option=lambda field: _option(field, vcf=args.vcf is not None),
            metric=args.metric,
            bfile=args.bfile or args.vcf,
            query=args.query,
            threshold=args.threshold,
            ibs_missing=args.ibs_missing,
            tile_rows=args.tile_rows or settings.genome_tile_rows,
            keep=keep,
            min_maf=args.min_maf,
            output="pairs" if args.table else "square",
            block=args.block,
        )
        where = "in this process" if run.inline else "on the genome queue"
        shape = "pairs only, " if args.table else ""
        print(
            f"genome comparison {job['id']}: {job['metric']}, {shape}{job['n_rows']} x "
            f"{job['n_samples']} samples, {job['n_variants']} variants"
            f"{' before --min-maf' if args.min_maf is not None else ''}, {job['tiles_total']} "
            f"tiles {where}"
        )
        summary = run.finish_if(tasks.TILES, job["id"], wait=args.wait or args.out is not None)
        if summary is None:
            return 0
    for path in summary["outputs"]:
        target = Path(path)
        if args.out:
            target = out_name(args.out, job["metric"], target.name)
            copy_out(path, target)
        print(f"  {target}")
    if job["metric"] == "king":
        print_degrees(summary["degree_counts"], threshold=args.threshold, table=args.table)
    return 0
