"""job tiles: one tile ledger for every tiled job kind (genome comparisons, compound searches)

The rows of genome_tiles (kind 'genome') and compound_tiles (kind 'chem') move into job_tiles,
status, attempts and leases as they were; the job tables and their results are kept as they are.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03 14:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0015'
down_revision: str | None = '0014'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COMMON = 'job_id, "index", row_start, row_end, status, attempts, lease_owner, lease_expires_at, updated_at'
#: The old tables, by kind: (table, its job table, has a column block).
_OLD = {'genome': ('genome_tiles', 'genome_jobs', True), 'chem': ('compound_tiles', 'compound_jobs', False)}


def _status() -> sa.Enum:
    return sa.Enum('queued', 'running', 'done', 'failed', name='jobstatus', native_enum=False, length=10)


def _tile_columns(*, cols: bool) -> list[sa.Column]:
    return [
        sa.Column('index', sa.Integer(), nullable=False),
        sa.Column('row_start', sa.Integer(), nullable=False),
        sa.Column('row_end', sa.Integer(), nullable=False),
        *([sa.Column('col_start', sa.Integer(), nullable=True),
           sa.Column('col_end', sa.Integer(), nullable=True)] if cols else []),
        sa.Column('status', _status(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('lease_owner', sa.String(length=200), nullable=True),
        sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    ]


def _id() -> sa.Column:
    return sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False)


def upgrade() -> None:
    op.create_table(
        'job_tiles',
        _id(),
        sa.Column('kind', sa.String(length=20), nullable=False),
        sa.Column('job_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        *_tile_columns(cols=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_job_tiles')),
        sa.UniqueConstraint('kind', 'job_id', 'index', name='uq_job_tiles_kind_job_index'),
    )
    op.create_index('ix_job_tiles_status_lease_expires_at', 'job_tiles', ['status', 'lease_expires_at'])
    for kind, (table, _, cols) in _OLD.items():
        block = 'col_start, col_end' if cols else 'NULL, NULL'
        op.execute(
            f'INSERT INTO job_tiles (kind, {_COMMON}, col_start, col_end) '
            f"SELECT '{kind}', {_COMMON}, {block} FROM {table} ORDER BY id"
        )
        op.drop_table(table)


def downgrade() -> None:
    for kind, (table, jobs, cols) in _OLD.items():
        op.create_table(
            table,
            _id(),
            sa.Column('job_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
            *_tile_columns(cols=cols),
            sa.ForeignKeyConstraint(['job_id'], [f'{jobs}.id'], name=op.f(f'fk_{table}_job_id_{jobs}'), ondelete='CASCADE'),
            sa.PrimaryKeyConstraint('id', name=op.f(f'pk_{table}')),
            sa.UniqueConstraint('job_id', 'index', name=f'uq_{table}_job_index'),
        )
        block = ', col_start, col_end' if cols else ''
        op.execute(
            f'INSERT INTO {table} ({_COMMON}{block}) '
            f"SELECT {_COMMON}{block} FROM job_tiles WHERE kind = '{kind}' ORDER BY id"
        )
    op.drop_index('ix_job_tiles_status_lease_expires_at', table_name='job_tiles')
    op.drop_table('job_tiles')
