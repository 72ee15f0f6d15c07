"""batches, score provenance, dead letter

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 02:15:11.759344
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('batches',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('queue', sa.String(length=50), nullable=False),
    sa.Column('model_name', sa.String(length=100), nullable=False),
    sa.Column('model_version', sa.String(length=50), nullable=False),
    sa.Column('model_sha256', sa.String(length=64), nullable=False),
    sa.Column('device', sa.String(length=20), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('inference_ms', sa.Float(precision=53), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batches'))
    )
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dead_letter', sa.Boolean(), server_default=sa.false(), nullable=False))

    with op.batch_alter_table('scores', schema=None) as batch_op:
        batch_op.add_column(sa.Column('batch_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True))
        batch_op.add_column(sa.Column('position', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('queue_wait_ms', sa.Float(precision=53), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_scores_batch_id_batches'), 'batches', ['batch_id'], ['id'], ondelete='SET NULL')



def downgrade() -> None:
    with op.batch_alter_table('scores', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_scores_batch_id_batches'), type_='foreignkey')
        batch_op.drop_column('queue_wait_ms')
        batch_op.drop_column('position')
        batch_op.drop_column('batch_id')

    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.drop_column('dead_letter')

    op.drop_table('batches')
