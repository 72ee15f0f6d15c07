"""compound jobs

Create Date: 2026-11-23 06:10:00
"""

from alembic import op

from db.migrations.helpers import create_job_table, create_table, create_tile_table, double, integer, reference, string

revision, down_revision = '0009', '0008'


def upgrade() -> None:
    create_job_table('compound_jobs', sizes=['n_query', 'n_library'], output='output_dir')
    create_table(
        'compound_neighbours',
        reference('job_id', 'compound_jobs', ondelete='CASCADE'),
        integer('query_index'),
        integer('library_index'),
        string('query_id', 200),
        string('library_id', 200),
        double('similarity'),
        integer('rank'),
        unique={'uq_neighbours_pair': ['job_id', 'query_index', 'library_index']},
        indexes={'ix_compound_neighbours_job_query': ['job_id', 'query_index', 'rank']},
    )
    create_tile_table('compound_tiles', 'compound_jobs', col_block=False, leases=False)


def downgrade() -> None:
    for table in ('compound_tiles', 'compound_neighbours', 'compound_jobs'):
        op.drop_table(table)
