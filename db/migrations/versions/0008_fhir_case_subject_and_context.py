"""fhir case subject and context

Create Date: 2026-11-23 05:45:00
"""

from alembic import op

from db.migrations.helpers import json, string

revision, down_revision = '0008', '0007'


def upgrade() -> None:
    with op.batch_alter_table('cases') as batch_op:
        batch_op.add_column(string('subject', 200, nullable=True))
        batch_op.add_column(json('context', nullable=True))
        batch_op.create_index('ix_cases_tenant_subject', ['tenant_id', 'subject'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('cases') as batch_op:
        batch_op.drop_index('ix_cases_tenant_subject')
        batch_op.drop_column('context')
        batch_op.drop_column('subject')
