"""relay_admission_counts() plans its queries once per connection (plan_cache_mode
force_generic_plan) instead of on every relay admission (PostgreSQL only)

Revision ID: 0003
Revises: 0002

"""
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# A copy of console.models.RELAY_ADMISSION_COUNTS_SQL as of this revision (a migration does not
# follow later edits of the models); tests/test_schema.py checks that the two agree.
FUNCTION = """\
CREATE OR REPLACE FUNCTION relay_admission_counts(p_user bigint, p_group bigint, p_key bigint,
                                                  p_async boolean)
RETURNS TABLE (in_flight bigint, key_committed bigint)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $$
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
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER FUNCTION relay_admission_counts(bigint, bigint, bigint, boolean) RESET plan_cache_mode")
