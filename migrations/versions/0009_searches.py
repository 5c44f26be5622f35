"""searches to a quality budget, and the jobs that are their trials

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 08:10:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'searches',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('tenant_id', sa.String(length=40), nullable=False),
        sa.Column('model_id', sa.String(length=40), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('queue', sa.String(length=32), nullable=False),
        sa.Column('spec', sa.JSON(), nullable=False),
        sa.Column('trials', sa.JSON(), nullable=False),
        sa.Column('sensitivity', sa.JSON(), nullable=True),
        sa.Column('best', sa.JSON(), nullable=True),
        sa.Column('message', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('searches', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_searches_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_searches_model_id'), ['model_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_searches_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_searches_tenant_id'), ['tenant_id'], unique=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('search_id', sa.String(length=40), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_search_id'), ['search_id'], unique=False)
        batch_op.create_foreign_key('fk_jobs_search_id_searches', 'searches', ['search_id'], ['id'],
                                    ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_jobs_search_id_searches', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_jobs_search_id'))
        batch_op.drop_column('search_id')
    with op.batch_alter_table('searches', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_searches_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_searches_status'))
        batch_op.drop_index(batch_op.f('ix_searches_model_id'))
        batch_op.drop_index(batch_op.f('ix_searches_created_at'))
    op.drop_table('searches')
