"""worker capacity and job estimates

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 08:20:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('workers',
    sa.Column('id', sa.String(length=200), nullable=False),
    sa.Column('queues', sa.JSON(), nullable=False),
    sa.Column('ram_total_bytes', sa.BigInteger(), nullable=False),
    sa.Column('ram_available_bytes', sa.BigInteger(), nullable=False),
    sa.Column('gpu_name', sa.String(length=200), nullable=True),
    sa.Column('gpu_memory_bytes', sa.BigInteger(), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_workers_heartbeat_at'), ['heartbeat_at'], unique=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('estimate', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('estimate')
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_workers_heartbeat_at'))

    op.drop_table('workers')
