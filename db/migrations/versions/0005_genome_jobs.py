"""genome jobs

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 05:17:48
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('genome_jobs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('tenant_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('metric', sa.String(length=10), nullable=False),
    sa.Column('status', sa.Enum('queued', 'running', 'done', 'failed', name='jobstatus', native_enum=False, length=10), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('n_samples', sa.Integer(), nullable=False),
    sa.Column('n_rows', sa.Integer(), nullable=False),
    sa.Column('n_variants', sa.Integer(), nullable=False),
    sa.Column('tiles_total', sa.Integer(), nullable=False),
    sa.Column('tiles_done', sa.Integer(), nullable=False),
    sa.Column('output_prefix', sa.String(length=500), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_genome_jobs_tenant_id_tenants'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_genome_jobs'))
    )
    with op.batch_alter_table('genome_jobs', schema=None) as batch_op:
        batch_op.create_index('ix_genome_jobs_tenant', ['tenant_id', 'id'], unique=False)

    op.create_table('genome_pairs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('job_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('row', sa.Integer(), nullable=False),
    sa.Column('col', sa.Integer(), nullable=False),
    sa.Column('fid1', sa.String(length=100), nullable=False),
    sa.Column('iid1', sa.String(length=100), nullable=False),
    sa.Column('fid2', sa.String(length=100), nullable=False),
    sa.Column('iid2', sa.String(length=100), nullable=False),
    sa.Column('kinship', sa.Float(precision=53), nullable=False),
    sa.Column('degree', sa.String(length=30), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['genome_jobs.id'], name=op.f('fk_genome_pairs_job_id_genome_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_genome_pairs')),
    sa.UniqueConstraint('job_id', 'row', 'col', name='uq_genome_pairs_job_row_col')
    )
    with op.batch_alter_table('genome_pairs', schema=None) as batch_op:
        batch_op.create_index('ix_genome_pairs_job_kinship', ['job_id', 'kinship'], unique=False)

    op.create_table('genome_tiles',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('job_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('row_start', sa.Integer(), nullable=False),
    sa.Column('row_end', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('queued', 'running', 'done', 'failed', name='jobstatus', native_enum=False, length=10), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['genome_jobs.id'], name=op.f('fk_genome_tiles_job_id_genome_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_genome_tiles')),
    sa.UniqueConstraint('job_id', 'index', name='uq_genome_tiles_job_index')
    )


def downgrade() -> None:
    op.drop_table('genome_tiles')
    with op.batch_alter_table('genome_pairs', schema=None) as batch_op:
        batch_op.drop_index('ix_genome_pairs_job_kinship')

    op.drop_table('genome_pairs')
    with op.batch_alter_table('genome_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_genome_jobs_tenant')

    op.drop_table('genome_jobs')
