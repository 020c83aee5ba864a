"""Regenerate the initial revision (0001) from console/models.py.

Valid only until the first production deployment: after that, every schema change gets
its own reviewed revision (`flask db migrate`). Run with `make migration`.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRIGGERS = '''
    # Ledger and audit rows are append-only, enforced by the database itself.
    bind = op.get_bind()
    for table in ("ledger_entries", "audit_log"):
        if bind.dialect.name == "sqlite":
            op.execute(f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
                       f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END")
            op.execute(f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
                       f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END")
        elif bind.dialect.name == "postgresql":
            op.execute("CREATE OR REPLACE FUNCTION reject_change() RETURNS trigger LANGUAGE plpgsql AS "
                       "$$ BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END $$")
            op.execute(f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                       f"FOR EACH ROW EXECUTE FUNCTION reject_change()")
            op.execute(f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                       f"FOR EACH STATEMENT EXECUTE FUNCTION reject_change()")
'''


def main() -> int:
    versions = HERE / "versions"
    for old in versions.glob("0001_*.py"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, DATABASE_URL=f"sqlite:///{tmp}/empty.db", INSTANCE_PATH=tmp,
                   SECRET_KEY="migration-generation")
        flask = Path(sys.executable).with_name("flask")
        subprocess.run([str(flask), "--app", "app", "db", "migrate", "-m", "initial schema",
                        "--rev-id", "0001"], check=True, env=env, cwd=HERE.parent,
                       stdout=subprocess.DEVNULL)
    path = next(versions.glob("0001_*.py"))
    text = path.read_text()
    text = text.replace("console.models.TZDateTime(timezone=True)", "sa.DateTime(timezone=True)")
    text = re.sub(r"Create Date: .*\n", "", text)
    text = text.replace("    # ### end Alembic commands ###\n\n\ndef downgrade", "    # ### end Alembic commands ###\n" + TRIGGERS + "\n\ndef downgrade", 1)
    assert "console." not in text, "the migration must not import application code"
    path.write_text(text)
    print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
