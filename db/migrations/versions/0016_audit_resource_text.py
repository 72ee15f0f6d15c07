"""audit_events.resource as text: a FHIR identifier search names every patient it answered for

200 characters held four or five ``Patient/<id>`` references; the rest of an answer's patients
were cut from its audit row.

Create Date: 2026-12-05 00:50:00
"""

import sqlalchemy as sa
from alembic import op

revision, down_revision = '0016', '0015'


def upgrade() -> None:
    with op.batch_alter_table('audit_events') as batch_op:
        batch_op.alter_column(
            'resource', type_=sa.Text(), existing_type=sa.String(200), existing_nullable=False
        )


def downgrade() -> None:
    # Rows longer than 200 characters keep their first 200, as they were written before.
    op.execute('UPDATE audit_events SET resource = substr(resource, 1, 200)')
    with op.batch_alter_table('audit_events') as batch_op:
        batch_op.alter_column(
            'resource', type_=sa.String(200), existing_type=sa.Text(), existing_nullable=False
        )
