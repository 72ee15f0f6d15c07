"""genome jobs

Create Date: 2026-11-23 05:17:48
"""

from alembic import op

from db.migrations.helpers import create_job_table, create_table, create_tile_table, double, integer, reference, string

revision, down_revision = '0005', '0004'


def upgrade() -> None:
    create_job_table(
        'genome_jobs',
        options=[string('metric', 10)],
        sizes=['n_samples', 'n_rows', 'n_variants'],
        output='output_prefix',
    )
    create_table(
        'genome_pairs',
        reference('job_id', 'genome_jobs', ondelete='CASCADE'),
        integer('row'),
        integer('col'),
        string('fid1', 100),
        string('iid1', 100),
        string('fid2', 100),
        string('iid2', 100),
        double('kinship'),
        string('degree', 30),
        unique={'uq_genome_pairs_job_row_col': ['job_id', 'row', 'col']},
        indexes={'ix_genome_pairs_job_kinship': ['job_id', 'kinship']},
    )
    create_tile_table('genome_tiles', 'genome_jobs', col_block=False, leases=False)


def downgrade() -> None:
    for table in ('genome_tiles', 'genome_pairs', 'genome_jobs'):
        op.drop_table(table)
