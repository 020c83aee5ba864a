"""Drop ix_usage_user_id_desc (user_id, id): no query reads it since the usage pages page by
(created_at, id) over ix_usage_user_time, which also serves every lookup by user alone; every
relay call paid for it (an entry written at admission, and on PostgreSQL again at settle)

Revision ID: 0004
Revises: 0003

"""
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_user_id_desc')


def downgrade():
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.create_index('ix_usage_user_id_desc', ['user_id', 'id'], unique=False)
