"""compound jobs

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23 06:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('compound_jobs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('tenant_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('status', sa.Enum('queued', 'running', 'done', 'failed', name='jobstatus', native_enum=False, length=10), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('n_query', sa.Integer(), nullable=False),
    sa.Column('n_library', sa.Integer(), nullable=False),
    sa.Column('tiles_total', sa.Integer(), nullable=False),
    sa.Column('tiles_done', sa.Integer(), nullable=False),
    sa.Column('output_dir', sa.String(length=500), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_compound_jobs_tenant_id_tenants'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_compound_jobs'))
    )
    with op.batch_alter_table('compound_jobs', schema=None) as batch_op:
        batch_op.create_index('ix_compound_jobs_tenant', ['tenant_id', 'id'], unique=False)

    op.create_table('compound_neighbours',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('job_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('query_index', sa.Integer(), nullable=False),
    sa.Column('library_index', sa.Integer(), nullable=False),
    sa.Column('query_id', sa.String(length=200), nullable=False),
    sa.Column('library_id', sa.String(length=200), nullable=False),
    sa.Column('similarity', sa.Float(precision=53), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['compound_jobs.id'], name=op.f('fk_compound_neighbours_job_id_compound_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_compound_neighbours')),
    sa.UniqueConstraint('job_id', 'query_index', 'library_index', name='uq_neighbours_pair')
    )
    with op.batch_alter_table('compound_neighbours', schema=None) as batch_op:
        batch_op.create_index('ix_compound_neighbours_job_query', ['job_id', 'query_index', 'rank'], unique=False)

    op.create_table('compound_tiles',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('job_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('row_start', sa.Integer(), nullable=False),
    sa.Column('row_end', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('queued', 'running', 'done', 'failed', name='jobstatus', native_enum=False, length=10), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['compound_jobs.id'], name=op.f('fk_compound_tiles_job_id_compound_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_compound_tiles')),
    sa.UniqueConstraint('job_id', 'index', name='uq_compound_tiles_job_index')
    )


def downgrade() -> None:
    op.drop_table('compound_tiles')
    with op.batch_alter_table('compound_neighbours', schema=None) as batch_op:
        batch_op.drop_index('ix_compound_neighbours_job_query')

    op.drop_table('compound_neighbours')
    with op.batch_alter_table('compound_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_compound_jobs_tenant')

    op.drop_table('compound_jobs')
