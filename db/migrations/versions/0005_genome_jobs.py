"""genome jobs

Create Date: 2026-11-23 05:17:48
"""

import sqlalchemy as sa
from alembic import op

from db.migrations.helpers import create_job_table, create_table, create_tile_table, reference

revision: str = '0005'
down_revision: str | None = '0004'


def upgrade() -> None:
    create_job_table(
        'genome_jobs',
        options=[sa.Column('metric', sa.String(length=10), nullable=False)],
        sizes=['n_samples', 'n_rows', 'n_variants'],
        output='output_prefix',
    )
    create_table(
        'genome_pairs',
        reference('job_id', 'genome_jobs', ondelete='CASCADE'),
        sa.Column('row', sa.Integer(), nullable=False),
        sa.Column('col', sa.Integer(), nullable=False),
        sa.Column('fid1', sa.String(length=100), nullable=False),
        sa.Column('iid1', sa.String(length=100), nullable=False),
        sa.Column('fid2', sa.String(length=100), nullable=False),
        sa.Column('iid2', sa.String(length=100), nullable=False),
        sa.Column('kinship', sa.Float(precision=53), nullable=False),
        sa.Column('degree', sa.String(length=30), nullable=False),
        unique={'uq_genome_pairs_job_row_col': ['job_id', 'row', 'col']},
        indexes={'ix_genome_pairs_job_kinship': ['job_id', 'kinship']},
    )
    create_tile_table('genome_tiles', 'genome_jobs', col_block=False, leases=False)


def downgrade() -> None:
    for table in ('genome_tiles', 'genome_pairs', 'genome_jobs'):
        op.drop_table(table)
