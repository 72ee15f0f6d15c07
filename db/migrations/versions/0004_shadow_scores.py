"""shadow scores

Create Date: 2026-11-23 05:00:00
"""

import sqlalchemy as sa
from alembic import op

revision, down_revision = '0004', '0003'


def upgrade() -> None:
    with op.batch_alter_table('scores') as batch_op:
        batch_op.add_column(sa.Column('shadow', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('scores') as batch_op:
        batch_op.drop_column('shadow')
