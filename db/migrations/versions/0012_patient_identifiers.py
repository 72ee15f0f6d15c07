"""patient identifiers for FHIR subject:identifier search

Create Date: 2026-12-03 08:00:00
"""

import sqlalchemy as sa
from alembic import op

from db.migrations.helpers import create_table, reference

revision: str = '0012'
down_revision: str | None = '0011'


def upgrade() -> None:
    create_table(
        'patient_identifiers',
        reference('tenant_id', 'tenants', ondelete='RESTRICT'),
        sa.Column('subject', sa.String(length=200), nullable=False),
        sa.Column('system', sa.String(length=300), nullable=False),
        sa.Column('value_sha256', sa.String(length=64), nullable=False),
        unique={'uq_patient_identifiers': ['tenant_id', 'subject', 'system', 'value_sha256']},
        indexes={'ix_patient_identifiers_lookup': ['tenant_id', 'value_sha256']},
    )


def downgrade() -> None:
    op.drop_table('patient_identifiers')
