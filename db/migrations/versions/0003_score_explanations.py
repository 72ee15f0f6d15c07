"""score explanations

Create Date: 2026-11-23 03:38:07.309710
"""

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'


def upgrade() -> None:
    with op.batch_alter_table('scores') as batch_op:
        batch_op.add_column(sa.Column('explanation', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('scores') as batch_op:
        batch_op.drop_column('explanation')
