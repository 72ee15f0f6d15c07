"""leases: the worker holding a case or tile, and until when

Create Date: 2026-12-03 08:00:00
"""

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'

_TABLES = ('cases', 'genome_tiles', 'compound_tiles')


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column('lease_owner', sa.String(length=200), nullable=True))
            batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('cases') as batch_op:
        batch_op.create_index('ix_cases_status_lease_expires_at', ['status', 'lease_expires_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('cases') as batch_op:
        batch_op.drop_index('ix_cases_status_lease_expires_at')
    for table in reversed(_TABLES):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column('lease_expires_at')
            batch_op.drop_column('lease_owner')
