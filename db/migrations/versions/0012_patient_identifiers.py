"""patient identifiers for FHIR subject:identifier search

Create Date: 2026-12-03 08:00:00
"""

from alembic import op

from db.migrations.helpers import create_table, reference, string

revision, down_revision = '0012', '0011'


def upgrade() -> None:
    create_table(
        'patient_identifiers',
        reference('tenant_id', 'tenants', ondelete='RESTRICT'),
        string('subject', 200),
        string('system', 300),
        string('value_sha256', 64),
        unique={'uq_patient_identifiers': ['tenant_id', 'subject', 'system', 'value_sha256']},
        indexes={'ix_patient_identifiers_lookup': ['tenant_id', 'value_sha256']},
    )


def downgrade() -> None:
    op.drop_table('patient_identifiers')
