"""api key lifecycle: keys in their own table with expiry, revocation and last use

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 08:00:00

Existing keys move over with no expiry (nobody chose one for them); `medbatch db list-clients`
shows them as such, and `medbatch db rotate-key` replaces them with expiring keys.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', Id, nullable=False),
    sa.Column('tenant_id', Id, nullable=False),
    sa.Column('client_id', Id, nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['client_id'], ['api_clients.id'], name=op.f('fk_api_keys_client_id_api_clients'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_api_keys_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('sha256', name=op.f('uq_api_keys_sha256'))
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index('ix_api_keys_tenant_client', ['tenant_id', 'client_id'], unique=False)
    op.execute(
        "INSERT INTO api_keys (tenant_id, client_id, sha256, created_at) "
        "SELECT id, NULL, api_key_sha256, created_at FROM tenants"
    )
    op.execute(
        "INSERT INTO api_keys (tenant_id, client_id, sha256, created_at) "
        "SELECT tenant_id, id, api_key_sha256, created_at FROM api_clients"
    )
    # Added, never rebuilt: rebuilding api_clients or tenants on SQLite (batch mode) would fire
    # the foreign keys that reference them. Their api_key_sha256 columns stay, unused for auth.
    op.add_column('api_clients', sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Keys made after the upgrade are lost; each row keeps the key it was made with.
    op.execute("ALTER TABLE api_clients DROP COLUMN revoked_at")
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index('ix_api_keys_tenant_client')
    op.drop_table('api_keys')
