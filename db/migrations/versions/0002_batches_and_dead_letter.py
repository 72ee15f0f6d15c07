"""batches, score provenance, dead letter

Create Date: 2026-11-23 02:15:11.759344
"""

import sqlalchemy as sa
from alembic import op

from db.migrations.helpers import ID, create_table, double, integer, string, timestamp

revision, down_revision = '0002', '0001'


def upgrade() -> None:
    create_table(
        'batches',
        string('queue', 50),
        string('model_name', 100),
        string('model_version', 50),
        string('model_sha256', 64),
        string('device', 20),
        integer('size'),
        double('inference_ms'),
        timestamp('created_at'),
    )
    with op.batch_alter_table('cases') as batch_op:
        batch_op.add_column(sa.Column('dead_letter', sa.Boolean(), server_default=sa.false(), nullable=False))

    with op.batch_alter_table('scores') as batch_op:
        batch_op.add_column(sa.Column('batch_id', ID, nullable=True))
        batch_op.add_column(integer('position', nullable=True))
        batch_op.add_column(double('queue_wait_ms', nullable=True))
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
