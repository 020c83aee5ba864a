"""relay_inflight: the calls between admission and settle, which the admission's limits count;
PostgreSQL: relay_admission_counts(), those counts taken after the wallet lock

Revision ID: 0002
Revises: 0001

"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# A copy of console.models.RELAY_ADMISSION_COUNTS_SQL as of this revision (a migration does not
# follow later edits of the models); tests/test_schema.py checks that the two agree.
FUNCTION = """\
CREATE OR REPLACE FUNCTION relay_admission_counts(p_user bigint, p_group bigint, p_key bigint,
                                                  p_async boolean)
RETURNS TABLE (in_flight bigint, key_committed bigint)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  IF p_async THEN
    PERFORM set_config('synchronous_commit', 'off', true);
  END IF;
  PERFORM 1 FROM wallets WHERE user_id = p_user FOR UPDATE;
  RETURN QUERY SELECT
    (SELECT count(*) FROM relay_inflight WHERE user_id = p_user AND group_id = p_group),
    (SELECT k.spent_micros + COALESCE((SELECT sum(i.hold_micros) FROM relay_inflight i
                                        WHERE i.key_id = p_key), 0)::bigint
     FROM api_keys k WHERE k.id = p_key);
END
$$"""


def upgrade():
    op.create_table('relay_inflight',
    sa.Column('record_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('group_id', sa.Integer(), nullable=True),
    sa.Column('key_id', sa.Integer(), nullable=True),
    sa.Column('hold_micros', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['record_id'], ['usage_records.id'], name=op.f('fk_relay_inflight_record_id_usage_records')),
    sa.PrimaryKeyConstraint('record_id', name=op.f('pk_relay_inflight'))
    )
    with op.batch_alter_table('relay_inflight', schema=None) as batch_op:
        batch_op.create_index('ix_inflight_key', ['key_id'], unique=False)
        batch_op.create_index('ix_inflight_user_group', ['user_id', 'group_id'], unique=False)
    # Calls in flight during the upgrade keep counting against their limits.
    op.execute("INSERT INTO relay_inflight (record_id, user_id, group_id, key_id, hold_micros) "
               "SELECT id, user_id, group_id, key_id, hold_micros FROM usage_records WHERE status = 'pending'")
    # Only the in-flight count read this index.
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_user_group_status')
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION relay_admission_counts(bigint, bigint, bigint, boolean)")
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.create_index('ix_usage_user_group_status', ['user_id', 'group_id', 'status'], unique=False)
    with op.batch_alter_table('relay_inflight', schema=None) as batch_op:
        batch_op.drop_index('ix_inflight_user_group')
        batch_op.drop_index('ix_inflight_key')
    op.drop_table('relay_inflight')
