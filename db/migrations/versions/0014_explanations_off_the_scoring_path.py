"""explanations off the scoring path: the explain stage's ledger (#17)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 13:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('explanations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('case_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('score_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('status', sa.Enum('queued', 'running', 'done', 'failed', name='jobstatus', native_enum=False, length=10), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], name=op.f('fk_explanations_case_id_cases'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['score_id'], ['scores.id'], name=op.f('fk_explanations_score_id_scores'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_explanations')),
    sa.UniqueConstraint('case_id', name=op.f('uq_explanations_case_id'))
    )
    with op.batch_alter_table('explanations', schema=None) as batch_op:
        batch_op.create_index('ix_explanations_status_enqueued_at', ['status', 'enqueued_at'], unique=False)
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
    with op.batch_alter_table('explanations', schema=None) as batch_op:
        batch_op.drop_index('ix_explanations_status_enqueued_at')
    op.drop_table('explanations')
