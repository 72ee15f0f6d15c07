"""idempotency keys

Create Date: 2026-11-23 05:40:00
"""

import sqlalchemy as sa
from alembic import op

from db.migrations.helpers import create_table, integer, reference, string, timestamp

revision, down_revision = '0006', '0005'


def upgrade() -> None:
    create_table(
        'idempotency_keys',
        reference('tenant_id', 'tenants', ondelete='CASCADE'),
        string('client_sha256', 64),
        string('key', 255),
        string('fingerprint', 64),
        integer('response_status', nullable=True),
        sa.Column('response_body', sa.LargeBinary(), nullable=True),
        string('response_content_type', 100, nullable=True),
        timestamp('created_at'),
        unique={'uq_idempotency_keys_client_key': ['client_sha256', 'key']},
        indexes={'ix_idempotency_keys_created_at': ['created_at']},
    )


def downgrade() -> None:
    op.drop_table('idempotency_keys')
