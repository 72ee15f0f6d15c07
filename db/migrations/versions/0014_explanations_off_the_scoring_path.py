"""explanations off the scoring path: the explain stage's ledger (#17)

Create Date: 2026-12-03 13:40:00
"""

import sqlalchemy as sa
from alembic import op

from db.migrations.helpers import create_table, integer, job_status, reference, string, text, timestamp

revision, down_revision = '0014', '0013'


def upgrade() -> None:
    create_table(
        'explanations',
        reference('case_id', 'cases', ondelete='CASCADE'),
        reference('score_id', 'scores', ondelete='CASCADE'),
        sa.Column('status', job_status(), nullable=False),
        integer('attempts'),
        text('error', nullable=True),
        timestamp('enqueued_at', nullable=True),
        string('lease_owner', 200, nullable=True),
        timestamp('lease_expires_at', nullable=True),
        timestamp('created_at'),
        timestamp('updated_at'),
        unique={'uq_explanations_case_id': ['case_id']},
        indexes={'ix_explanations_status_enqueued_at': ['status', 'enqueued_at']},
    )
    # Scores explained inline before this revision are done already (SQLite keeps a JSON
    # null as the text 'null').
    op.execute(
        "INSERT INTO explanations (case_id, score_id, status, attempts, created_at, updated_at) "
        "SELECT s.case_id, s.id, 'done', 1, s.created_at, s.created_at FROM scores s "
        "JOIN cases c ON c.id = s.case_id AND c.model_name = s.model_name "
        "AND c.model_version = s.model_version "
        "WHERE s.explanation IS NOT NULL AND CAST(s.explanation AS TEXT) <> 'null' "
        "AND s.shadow = false"
    )


def downgrade() -> None:
    op.drop_table('explanations')
