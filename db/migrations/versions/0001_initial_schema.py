"""initial schema: tenants, cases, scores

Create Date: 2026-11-23 02:00:03.763573
"""

import sqlalchemy as sa
from alembic import op

from db.migrations.helpers import create_table, reference, timestamp

revision: str = '0001'
down_revision: str | None = None


def upgrade() -> None:
    create_table(
        'tenants',
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('api_key_sha256', sa.String(length=64), nullable=False),
        timestamp('created_at'),
        unique={'uq_tenants_api_key_sha256': ['api_key_sha256'], 'uq_tenants_name': ['name']},
    )
    create_table(
        'cases',
        reference('tenant_id', 'tenants', ondelete='RESTRICT'),
        sa.Column('external_id', sa.String(length=200), nullable=False),
        sa.Column('model_name', sa.String(length=100), nullable=False),
        sa.Column('model_version', sa.String(length=50), nullable=False),
        sa.Column('priority', sa.Enum('stat', 'routine', 'bulk', name='priority', native_enum=False, create_constraint=True, length=10), nullable=False),
        sa.Column('features', sa.JSON(), nullable=False),
        sa.Column('status', sa.Enum('queued', 'running', 'done', 'failed', name='status', native_enum=False, create_constraint=True, length=10), nullable=False),
        sa.Column('delivery_count', sa.Integer(), nullable=False),
        sa.Column('last_error', sa.Text(), nullable=True),
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
        sa.Column('model_name', sa.String(length=100), nullable=False),
        sa.Column('model_version', sa.String(length=50), nullable=False),
        sa.Column('model_sha256', sa.String(length=64), nullable=False),
        sa.Column('score', sa.Float(precision=53), nullable=False),
        sa.Column('label', sa.String(length=50), nullable=False),
        timestamp('created_at'),
        unique={'uq_scores_case_model': ['case_id', 'model_name', 'model_version']},
        indexes={'ix_scores_created_at': ['created_at']},
    )


def downgrade() -> None:
    for table in ('scores', 'cases', 'tenants'):
        op.drop_table(table)
