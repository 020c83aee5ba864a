"""OpenAI processing tiers: a price ratio per model for calls served at priority or flex
(service_tier); a model without one refuses that tier

Revision ID: 0007
Revises: 0006

"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('model_prices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority_ppm', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('flex_ppm', sa.BigInteger(), nullable=True))


def downgrade():
    with op.batch_alter_table('model_prices', schema=None) as batch_op:
        batch_op.drop_column('flex_ppm')
        batch_op.drop_column('priority_ppm')
