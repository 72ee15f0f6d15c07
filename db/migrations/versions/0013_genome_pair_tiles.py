"""genome pair tiles: 2-D tiles (a column range) and plink2's .kin0 counts on each pair

Create Date: 2026-12-03 07:40:00
"""

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'


def upgrade() -> None:
    with op.batch_alter_table('genome_tiles') as batch_op:
        batch_op.add_column(sa.Column('col_start', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('col_end', sa.Integer(), nullable=True))
    with op.batch_alter_table('genome_pairs') as batch_op:
        batch_op.add_column(sa.Column('nsnp', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('hethet', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('ibs0', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('genome_pairs') as batch_op:
        batch_op.drop_column('ibs0')
        batch_op.drop_column('hethet')
        batch_op.drop_column('nsnp')
    with op.batch_alter_table('genome_tiles') as batch_op:
        batch_op.drop_column('col_end')
        batch_op.drop_column('col_start')
