"""batches, score provenance, dead letter

Create Date: 2026-11-23 02:15:11.759344
"""

import sqlalchemy as sa
from alembic import op

from db.migrations.helpers import ID, create_table, timestamp

revision: str = '0002'
down_revision: str | None = '0001'


def upgrade() -> None:
    create_table(
        'batches',
        sa.Column('queue', sa.String(length=50), nullable=False),
        sa.Column('model_name', sa.String(length=100), nullable=False),
        sa.Column('model_version', sa.String(length=50), nullable=False),
        sa.Column('model_sha256', sa.String(length=64), nullable=False),
        sa.Column('device', sa.String(length=20), nullable=False),
        sa.Column('size', sa.Integer(), nullable=False),
        sa.Column('inference_ms', sa.Float(precision=53), nullable=False),
        timestamp('created_at'),
    )
    with op.batch_alter_table('cases') as batch_op:
        batch_op.add_column(sa.Column('dead_letter', sa.Boolean(), server_default=sa.false(), nullable=False))

    with op.batch_alter_table('scores') as batch_op:
        batch_op.add_column(sa.Column('batch_id', ID, nullable=True))
        batch_op.add_column(sa.Column('position', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('queue_wait_ms', sa.Float(precision=53), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_scores_batch_id_batches'), 'batches', ['batch_id'], ['id'], ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('scores') as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_scores_batch_id_batches'), type_='foreignkey')
        batch_op.drop_column('queue_wait_ms')
        batch_op.drop_column('position')
        batch_op.drop_column('batch_id')

    with op.batch_alter_table('cases') as batch_op:
        batch_op.drop_column('dead_letter')

    op.drop_table('batches')
