"""Long-context prices: a threshold of input-side tokens per model above which a call is priced
at scaled prices (Anthropic's 1M-context beta: above 200K input tokens, input ×2, output ×1.5)

Revision ID: 0006
Revises: 0005

"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('model_prices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('long_context_threshold', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('long_context_input_ppm', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('long_context_output_ppm', sa.BigInteger(), nullable=True))


def downgrade():
    with op.batch_alter_table('model_prices', schema=None) as batch_op:
        batch_op.drop_column('long_context_output_ppm')
        batch_op.drop_column('long_context_input_ppm')
        batch_op.drop_column('long_context_threshold')
