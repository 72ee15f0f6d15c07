"""What the revisions in versions/ build their tables from, so that each spells out only its own.

A revision is history: every database it ran on has what it built then, and the next revisions
start from that. So a helper here keeps building exactly what it builds once a revision calls it
(on PostgreSQL and on SQLite, where a table's SQL is kept as written: the order of its columns and
constraints counts); a table of another shape gets another helper, or stays in its revision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

#: db/tables.py's ``Id``: SQLite auto-increments only a column declared exactly INTEGER PRIMARY KEY.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def reference(name: str, table: str, *, ondelete: str, nullable: bool = False) -> sa.Column[Any]:
    """A column holding an id of ``table``; :func:`create_table` declares its foreign key."""
    return sa.Column(name, ID, nullable=nullable, info={"references": (table, ondelete)})


def timestamp(name: str, *, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def string(name: str, length: int, *, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.String(length=length), nullable=nullable)


def integer(name: str, *, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.Integer(), nullable=nullable)


def double(name: str, *, nullable: bool = False) -> sa.Column[Any]:
    """A DOUBLE PRECISION column (db/tables.py's ``Float(53)``)."""
    return sa.Column(name, sa.Float(precision=53), nullable=nullable)


def json(name: str, *, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.JSON(), nullable=nullable)


def text(name: str, *, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.Text(), nullable=nullable)


def job_status() -> sa.Enum:
    """db/tables.py's ``JobStatus``: a VARCHAR(10), with no CHECK constraint."""
    return sa.Enum(
        "queued", "running", "done", "failed", name="jobstatus", native_enum=False, length=10
    )


def create_table(
    name: str,
    *columns: sa.Column[Any],
    unique: Mapping[str, Sequence[str]] | None = None,
    indexes: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Create a table whose first column is its key, ``id``, then the indexes on it.

    ``unique`` and ``indexes`` map a name to the columns. The keys are named as db/tables.py's
    naming convention names them (``pk_<table>``, ``fk_<table>_<column>_<referred table>``, one
    for each :func:`reference`) and come in the order Alembic's autogenerate wrote them: the
    foreign keys by column name, then the unique constraints.
    """
    references = sorted((c.name, *c.info["references"]) for c in columns if "references" in c.info)
    op.create_table(
        name,
        sa.Column("id", ID, nullable=False),
        *columns,
        *(
            sa.ForeignKeyConstraint(
                [column],
                [f"{referred}.id"],
                name=op.f(f"fk_{name}_{column}_{referred}"),
                ondelete=ondelete,
            )
            for column, referred, ondelete in references
        ),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{name}")),
        *(sa.UniqueConstraint(*cols, name=uq) for uq, cols in (unique or {}).items()),
    )
    for index, cols in (indexes or {}).items():
        op.create_index(index, name, list(cols))


def create_job_table(
    name: str,
    *,
    options: Sequence[sa.Column[Any]] = (),
    sizes: Sequence[str],
    output: str,
) -> None:
    """A tiled job kind's table (db/tables.py's ``TiledJob``), as 0005 (genome) and 0009
    (compounds) made theirs: the tenant, the kind's ``options``, status and spec, its ``sizes``
    (counts), the tile counts, where its outputs go (the ``output`` column), the error and the
    times; indexed by tenant."""
    create_table(
        name,
        reference("tenant_id", "tenants", ondelete="RESTRICT"),
        *options,
        sa.Column("status", job_status(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        *(sa.Column(size, sa.Integer(), nullable=False) for size in sizes),
        sa.Column("tiles_total", sa.Integer(), nullable=False),
        sa.Column("tiles_done", sa.Integer(), nullable=False),
        sa.Column(output, sa.String(length=500), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        timestamp("created_at"),
        timestamp("updated_at"),
        timestamp("finished_at", nullable=True),
        indexes={f"ix_{name}_tenant": ("tenant_id", "id")},
    )


def tile_columns(*, col_block: bool, leases: bool) -> list[sa.Column[Any]]:
    """A tile's columns after its job's: its index, its rows (and, with ``col_block``, its
    columns: a 2-D tile), status and attempts (and, with ``leases``, the worker holding it and
    until when), and when it last changed."""
    return [
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("row_start", sa.Integer(), nullable=False),
        sa.Column("row_end", sa.Integer(), nullable=False),
        *(
            [
                sa.Column("col_start", sa.Integer(), nullable=True),
                sa.Column("col_end", sa.Integer(), nullable=True),
            ]
            if col_block
            else []
        ),
        sa.Column("status", job_status(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        *(
            [
                sa.Column("lease_owner", sa.String(length=200), nullable=True),
                timestamp("lease_expires_at", nullable=True),
            ]
            if leases
            else []
        ),
        timestamp("updated_at"),
    ]


def create_tile_table(name: str, jobs: str, *, col_block: bool, leases: bool) -> None:
    """A kind's own tile table, one row per tile of a job in ``jobs``: made by 0005 (genome) and
    0009 (compounds), put back by 0015's downgrade (0015 moved the tiles into ``job_tiles``)."""
    create_table(
        name,
        reference("job_id", jobs, ondelete="CASCADE"),
        *tile_columns(col_block=col_block, leases=leases),
        unique={f"uq_{name}_job_index": ("job_id", "index")},
    )
