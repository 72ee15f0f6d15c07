"""genome_pairs.kinship may be NULL: a pairs-only KING job keeps NaN kinships, as plink2 does

plink2's --king-table-filter drops a pair only when its kinship is below the filter, which a NaN
(no heterozygous call where both samples are called) never is; such pairs are written with 'nan'.
SQLite has no NaN (it stores one as NULL), so NULL stands for it.

Create Date: 2026-12-05 04:00:00
"""

import sqlalchemy as sa
from alembic import op

revision, down_revision = '0017', '0016'


def upgrade() -> None:
    with op.batch_alter_table('genome_pairs') as batch_op:
        batch_op.alter_column(
            'kinship', existing_type=sa.Float(precision=53), nullable=True
        )


def downgrade() -> None:
    # The schema before held no NaN pair: they are dropped, as jobs of that code dropped them.
    op.execute('DELETE FROM genome_pairs WHERE kinship IS NULL')
    with op.batch_alter_table('genome_pairs') as batch_op:
        batch_op.alter_column(
            'kinship', existing_type=sa.Float(precision=53), nullable=False
        )
