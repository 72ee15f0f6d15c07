"""score explanations

Create Date: 2026-11-23 03:38:07.309710
"""

from alembic import op

from db.migrations.helpers import json

revision, down_revision = '0003', '0002'


def upgrade() -> None:
    with op.batch_alter_table('scores') as batch_op:
        batch_op.add_column(json('explanation', nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('scores') as batch_op:
        batch_op.drop_column('explanation')
