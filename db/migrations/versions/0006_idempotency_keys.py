"""idempotency keys

Create Date: 2026-11-23 05:40:00
"""

import sqlalchemy as sa
from alembic import op

from db.migrations.helpers import create_table, reference, timestamp

revision: str = '0006'
down_revision: str | None = '0005'


def upgrade() -> None:
    create_table(
        'idempotency_keys',
        reference('tenant_id', 'tenants', ondelete='CASCADE'),
        sa.Column('client_sha256', sa.String(length=64), nullable=False),
        sa.Column('key', sa.String(length=255), nullable=False),
        sa.Column('fingerprint', sa.String(length=64), nullable=False),
        sa.Column('response_status', sa.Integer(), nullable=True),
        sa.Column('response_body', sa.LargeBinary(), nullable=True),
        sa.Column('response_content_type', sa.String(length=100), nullable=True),
        timestamp('created_at'),
        unique={'uq_idempotency_keys_client_key': ['client_sha256', 'key']},
        indexes={'ix_idempotency_keys_created_at': ['created_at']},
    )


def downgrade() -> None:
    op.drop_table('idempotency_keys')
