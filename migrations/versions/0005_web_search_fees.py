"""Web search fees: a per-search price in the catalog, and the searches and the price on each
usage record (a server tool's fee per use, billed on top of the tokens)

Revision ID: 0005
Revises: 0004

"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('model_prices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('web_search_price', sa.BigInteger(), nullable=True))
    # Existing records ran no billed search: 0, written by the server default.
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('web_searches', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('web_search_price', sa.BigInteger(), server_default='0', nullable=False))


def downgrade():
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_column('web_search_price')
        batch_op.drop_column('web_searches')
    with op.batch_alter_table('model_prices', schema=None) as batch_op:
        batch_op.drop_column('web_search_price')
