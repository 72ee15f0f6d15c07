"""job tiles: one tile ledger for every tiled job kind (genome comparisons, compound searches)

The rows of genome_tiles (kind 'genome') and compound_tiles (kind 'chem') move into job_tiles,
status, attempts and leases as they were; the job tables and their results are kept as they are.

Create Date: 2026-12-03 14:10:00
"""

import sqlalchemy as sa
from alembic import op

from db.migrations.helpers import ID, create_table, create_tile_table, string, tile_columns

revision, down_revision = '0015', '0014'

_COMMON = 'job_id, "index", row_start, row_end, status, attempts, lease_owner, lease_expires_at, updated_at'
#: The old tables, by kind: (table, its job table, has a column block).
_OLD = {'genome': ('genome_tiles', 'genome_jobs', True), 'chem': ('compound_tiles', 'compound_jobs', False)}


def upgrade() -> None:
    create_table(
        'job_tiles',
        string('kind', 20),
        sa.Column('job_id', ID, nullable=False),
        *tile_columns(col_block=True, leases=True),
        unique={'uq_job_tiles_kind_job_index': ['kind', 'job_id', 'index']},
        indexes={'ix_job_tiles_status_lease_expires_at': ['status', 'lease_expires_at']},
    )
    for kind, (table, _, cols) in _OLD.items():
        block = 'col_start, col_end' if cols else 'NULL, NULL'
        op.execute(
            f'INSERT INTO job_tiles (kind, {_COMMON}, col_start, col_end) '
            f"SELECT '{kind}', {_COMMON}, {block} FROM {table} ORDER BY id"
        )
        op.drop_table(table)


def downgrade() -> None:
    for kind, (table, jobs, cols) in _OLD.items():
        create_tile_table(table, jobs, col_block=cols, leases=True)
        block = ', col_start, col_end' if cols else ''
        op.execute(
            f'INSERT INTO {table} ({_COMMON}{block}) '
            f"SELECT {_COMMON}{block} FROM job_tiles WHERE kind = '{kind}' ORDER BY id"
        )
    op.drop_index('ix_job_tiles_status_lease_expires_at', table_name='job_tiles')
    op.drop_table('job_tiles')
