"""api clients and audit

Create Date: 2026-11-23 05:40:00
"""

from alembic import op

from db.migrations.helpers import create_table, integer, json, reference, string, timestamp

revision, down_revision = '0007', '0006'


def upgrade() -> None:
    create_table(
        'api_clients',
        reference('tenant_id', 'tenants', ondelete='CASCADE'),
        string('name', 100),
        string('api_key_sha256', 64),
        json('scopes'),
        timestamp('created_at'),
        unique={'uq_api_clients_api_key_sha256': ['api_key_sha256']},
    )
    create_table(
        'audit_events',
        timestamp('at'),
        reference('tenant_id', 'tenants', ondelete='SET NULL', nullable=True),
        reference('client_id', 'api_clients', ondelete='SET NULL', nullable=True),
        string('action', 100),
        string('resource', 200),
        integer('status'),
        string('outcome', 20),
        indexes={'ix_audit_events_tenant_at': ['tenant_id', 'at']},
    )


def downgrade() -> None:
    for table in ('audit_events', 'api_clients'):
        op.drop_table(table)
