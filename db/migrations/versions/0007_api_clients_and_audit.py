"""api clients and audit

Create Date: 2026-11-23 05:40:00
"""

import sqlalchemy as sa
from alembic import op

from db.migrations.helpers import create_table, reference, timestamp

revision: str = '0007'
down_revision: str | None = '0006'


def upgrade() -> None:
    create_table(
        'api_clients',
        reference('tenant_id', 'tenants', ondelete='CASCADE'),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('api_key_sha256', sa.String(length=64), nullable=False),
        sa.Column('scopes', sa.JSON(), nullable=False),
        timestamp('created_at'),
        unique={'uq_api_clients_api_key_sha256': ['api_key_sha256']},
    )
    create_table(
        'audit_events',
        timestamp('at'),
        reference('tenant_id', 'tenants', ondelete='SET NULL', nullable=True),
        reference('client_id', 'api_clients', ondelete='SET NULL', nullable=True),
        sa.Column('action', sa.String(length=100), nullable=False),
        sa.Column('resource', sa.String(length=200), nullable=False),
        sa.Column('status', sa.Integer(), nullable=False),
        sa.Column('outcome', sa.String(length=20), nullable=False),
        indexes={'ix_audit_events_tenant_at': ['tenant_id', 'at']},
    )


def downgrade() -> None:
    for table in ('audit_events', 'api_clients'):
        op.drop_table(table)
