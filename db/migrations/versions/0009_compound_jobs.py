"""compound jobs

Create Date: 2026-11-23 06:10:00
"""

import sqlalchemy as sa
from alembic import op

from db.migrations.helpers import create_job_table, create_table, create_tile_table, reference

revision: str = '0009'
down_revision: str | None = '0008'


def upgrade() -> None:
    create_job_table('compound_jobs', sizes=['n_query', 'n_library'], output='output_dir')
    create_table(
        'compound_neighbours',
        reference('job_id', 'compound_jobs', ondelete='CASCADE'),
        sa.Column('query_index', sa.Integer(), nullable=False),
        sa.Column('library_index', sa.Integer(), nullable=False),
        sa.Column('query_id', sa.String(length=200), nullable=False),
        sa.Column('library_id', sa.String(length=200), nullable=False),
        sa.Column('similarity', sa.Float(precision=53), nullable=False),
        sa.Column('rank', sa.Integer(), nullable=False),
        unique={'uq_neighbours_pair': ['job_id', 'query_index', 'library_index']},
        indexes={'ix_compound_neighbours_job_query': ['job_id', 'query_index', 'rank']},
    )
    create_tile_table('compound_tiles', 'compound_jobs', col_block=False, leases=False)


def downgrade() -> None:
    for table in ('compound_tiles', 'compound_neighbours', 'compound_jobs'):
        op.drop_table(table)
