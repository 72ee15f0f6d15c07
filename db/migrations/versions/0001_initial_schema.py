"""initial schema: tenants, cases, scores

Create Date: 2026-11-23 02:00:03.763573
"""

import sqlalchemy as sa
from alembic import op

from db.migrations.helpers import create_table, double, integer, json, reference, string, text, timestamp

revision, down_revision = '0001', None


def upgrade() -> None:
    create_table(
        'tenants',
        string('name', 100),
        string('api_key_sha256', 64),
        timestamp('created_at'),
        unique={'uq_tenants_api_key_sha256': ['api_key_sha256'], 'uq_tenants_name': ['name']},
    )
    create_table(
        'cases',
        reference('tenant_id', 'tenants', ondelete='RESTRICT'),
        string('external_id', 200),
        string('model_name', 100),
        string('model_version', 50),
        sa.Column('priority', sa.Enum('stat', 'routine', 'bulk', name='priority', native_enum=False, create_constraint=True, length=10), nullable=False),
        json('features'),
        sa.Column('status', sa.Enum('queued', 'running', 'done', 'failed', name='status', native_enum=False, create_constraint=True, length=10), nullable=False),
        integer('delivery_count'),
        text('last_error', nullable=True),
        timestamp('created_at'),
        timestamp('updated_at'),
        timestamp('enqueued_at', nullable=True),
        unique={'uq_cases_tenant_external': ['tenant_id', 'external_id']},
        indexes={
            'ix_cases_status_enqueued_at': ['status', 'enqueued_at'],
            'ix_cases_tenant_model': ['tenant_id', 'model_name'],
        },
    )
    create_table(
        'scores',
        reference('case_id', 'cases', ondelete='CASCADE'),
        string('model_name', 100),
        string('model_version', 50),
        string('model_sha256', 64),
        double('score'),
        string('label', 50),
        timestamp('created_at'),
        unique={'uq_scores_case_model': ['case_id', 'model_name', 'model_version']},
        indexes={'ix_scores_created_at': ['created_at']},
    )


def downgrade() -> None:
    for table in ('scores', 'cases', 'tenants'):
        op.drop_table(table)
