"""leases: the worker holding a case or tile, and until when

Create Date: 2026-12-03 08:00:00
"""

from alembic import op

from db.migrations.helpers import string, timestamp

revision, down_revision = '0010', '0009'

_TABLES = ('cases', 'genome_tiles', 'compound_tiles')


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(string('lease_owner', 200, nullable=True))
            batch_op.add_column(timestamp('lease_expires_at', nullable=True))
    with op.batch_alter_table('cases') as batch_op:
        batch_op.create_index('ix_cases_status_lease_expires_at', ['status', 'lease_expires_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('cases') as batch_op:
        batch_op.drop_index('ix_cases_status_lease_expires_at')
    for table in reversed(_TABLES):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column('lease_expires_at')
            batch_op.drop_column('lease_owner')
