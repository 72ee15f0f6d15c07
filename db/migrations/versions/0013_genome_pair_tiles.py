"""genome pair tiles: 2-D tiles (a column range) and plink2's .kin0 counts on each pair

Create Date: 2026-12-03 07:40:00
"""

from alembic import op

from db.migrations.helpers import integer

revision, down_revision = '0013', '0012'


def upgrade() -> None:
    with op.batch_alter_table('genome_tiles') as batch_op:
        batch_op.add_column(integer('col_start', nullable=True))
        batch_op.add_column(integer('col_end', nullable=True))
    with op.batch_alter_table('genome_pairs') as batch_op:
        batch_op.add_column(integer('nsnp', nullable=True))
        batch_op.add_column(integer('hethet', nullable=True))
        batch_op.add_column(integer('ibs0', nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('genome_pairs') as batch_op:
        batch_op.drop_column('ibs0')
        batch_op.drop_column('hethet')
        batch_op.drop_column('nsnp')
    with op.batch_alter_table('genome_tiles') as batch_op:
        batch_op.drop_column('col_end')
        batch_op.drop_column('col_start')
