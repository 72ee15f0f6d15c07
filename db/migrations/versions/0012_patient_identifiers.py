"""patient identifiers for FHIR subject:identifier search

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 08:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('patient_identifiers',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('tenant_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('subject', sa.String(length=200), nullable=False),
    sa.Column('system', sa.String(length=300), nullable=False),
    sa.Column('value_sha256', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('tenant_id', 'subject', 'system', 'value_sha256', name='uq_patient_identifiers')
    )
    with op.batch_alter_table('patient_identifiers', schema=None) as batch_op:
        batch_op.create_index('ix_patient_identifiers_lookup', ['tenant_id', 'value_sha256'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('patient_identifiers', schema=None) as batch_op:
        batch_op.drop_index('ix_patient_identifiers_lookup')
    op.drop_table('patient_identifiers')
