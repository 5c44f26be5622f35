"""API key scopes, expiry and names; per-tenant quota overrides

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 20:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        # keys made before scopes existed keep doing what they did: read and write (not admin)
        batch_op.add_column(sa.Column('scopes', sa.JSON(), nullable=False, server_default='["read", "write"]'))
        batch_op.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('name', sa.String(length=200), nullable=True))
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.alter_column('scopes', server_default=None)
    op.create_table('tenant_quotas',
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('stored_bytes', sa.BigInteger(), nullable=True),
    sa.Column('running_jobs', sa.Integer(), nullable=True),
    sa.Column('queued_jobs', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('tenant_id')
    )


def downgrade() -> None:
    op.drop_table('tenant_quotas')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('name')
        batch_op.drop_column('expires_at')
        batch_op.drop_column('scopes')
