"""The processing tier a usage record was billed at (fast mode, priority or flex; empty for
the standard one), so the record says why its prices are the tier's and a reconciler bills
a crashed stream at the tier it was served at

Revision ID: 0008
Revises: 0007

"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade():
    # Existing records were billed at their stored prices: '' (standard), the server default.
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('service_tier', sa.String(length=16), server_default='', nullable=False))


def downgrade():
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_column('service_tier')
