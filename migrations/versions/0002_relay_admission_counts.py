"""PostgreSQL: relay_admission_counts(), the relay admission's counts taken after the wallet lock

Revision ID: 0002
Revises: 0001

"""
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
    (SELECT count(*) FROM usage_records
     WHERE user_id = p_user AND group_id = p_group AND status = 'pending'),
    (SELECT k.spent_micros + COALESCE((SELECT sum(u.hold_micros) FROM usage_records u
                                        WHERE u.key_id = p_key AND u.status = 'pending'), 0)::bigint
     FROM api_keys k WHERE k.id = p_key);
END
$$"""


def upgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION relay_admission_counts(bigint, bigint, bigint, boolean)")
