"""api key lifecycle: keys in their own table with expiry, revocation and last use

Create Date: 2026-12-03 08:00:00

Existing keys move over with no expiry (nobody chose one for them); `medbatch db list-clients`
shows them as such, and `medbatch db rotate-key` replaces them with expiring keys.
"""

from alembic import op

from db.migrations.helpers import create_table, reference, string, timestamp

revision, down_revision = '0011', '0010'


def upgrade() -> None:
    create_table(
        'api_keys',
        reference('tenant_id', 'tenants', ondelete='CASCADE'),
        reference('client_id', 'api_clients', ondelete='CASCADE', nullable=True),
        string('sha256', 64),
        timestamp('created_at'),
        timestamp('expires_at', nullable=True),
        timestamp('revoked_at', nullable=True),
        timestamp('last_used_at', nullable=True),
        unique={'uq_api_keys_sha256': ['sha256']},
        indexes={'ix_api_keys_tenant_client': ['tenant_id', 'client_id']},
    )
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
    op.add_column('api_clients', timestamp('revoked_at', nullable=True))


def downgrade() -> None:
    # Keys made after the upgrade are lost; each row keeps the key it was made with.
    op.execute("ALTER TABLE api_clients DROP COLUMN revoked_at")
    op.drop_table('api_keys')
