"""Voucher codes: format, minting, exactly-once redemption, distinct errors, CLI, admin page, storage."""
from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from console import ledger, vouchers
from console.extensions import db
from console.models import AuditLog, LedgerEntry, User, Voucher, VoucherBatch, utcnow
from tests.conftest import make_app
from tests.support.server import flask_cli, migrate
from tests.support.web import HX, csrf_from, login, make_user

CODE_RE = re.compile(r"^[A-HJ-NP-Z2-9]{4}(-[A-HJ-NP-Z2-9]{4}){4}$")


def uid(email: str = "user@example.com") -> int:
    return db.session.scalar(select(User.id).where(User.email == email))


# ---- code format ---------------------------------------------------------------------

def test_code_alphabet_and_entropy():
    """Codes are XXXX-XXXX-XXXX-XXXX-XXXX over 32 unambiguous symbols: 100 bits of randomness."""
    assert len(vouchers.ALPHABET) == 32 and len(set(vouchers.ALPHABET)) == 32
    assert not set("01IO") & set(vouchers.ALPHABET)
    assert vouchers.CODE_LEN * 5 >= 80
    codes = {vouchers.format_code(vouchers.generate_code()) for _ in range(2000)}
    assert len(codes) == 2000 and all(CODE_RE.match(c) for c in codes)


@pytest.mark.parametrize("raw", [" abcd-efgh-jkmn-pqrs-tuvw ", "ABCDEFGHJKMNPQRSTUVW",
                                 "abcd efgh jkmn pqrs tuvw", "Abcd-Efgh-Jkmn-Pqrs-Tuvw"])
def test_normalize_accepts_case_dashes_spaces(raw):
    """Trimming, case, dashes and spaces do not matter."""
    assert vouchers.normalize_code(raw) == "ABCDEFGHJKMNPQRSTUVW"


@pytest.mark.parametrize("raw", ["", "ABCD", "ABCD-EFGH-JKMN-PQRS-TUV0", "ABCD-EFGH-JKMN-PQRS-TUVI",
                                 "ABCD-EFGH-JKMN-PQRS-TUVWX", "ABCD_EFGH_JKMN_PQRS_TUVW",
                                 "ABCD-EFGH-JKMN-PQRS-TUVı", "ＡBCD-EFGH-JKMN-PQRS-TUVW",
                                 "ABCD-EFGH-JKMN-PQRS-TUV٣", "ABCD\tEFGH-JKMN-PQRS-TUVW",
                                 "' OR 1=1 --", "<b>ABCD</b>", "A" * 65, None, 12345])
def test_normalize_rejects_everything_else(raw):
    """Anything outside the alphabet (incl. look-alike Unicode) is rejected before any lookup."""
    with pytest.raises(vouchers.InvalidCode):
        vouchers.normalize_code(raw)


# ---- service ---------------------------------------------------------------------------

def test_redeem_credits_exactly_once(ctx):
    """A code credits its face value once; the second try says it was already redeemed."""
    make_user()
    make_user("other@example.com")
    _, codes = vouchers.mint_batch(2, 25_000_000, note="promo")
    r = vouchers.redeem(uid(), codes[0])
    assert r.value_micros == 25_000_000 and r.balance_micros == 25_000_000
    for who in (uid(), uid("other@example.com")):
        with pytest.raises(vouchers.AlreadyRedeemed) as exc:
            vouchers.redeem(who, codes[0].lower())
        assert "user" not in str(exc.value) and "@" not in str(exc.value)  # never says who
    entry = db.session.scalars(select(LedgerEntry)).one()
    assert (entry.kind, entry.ref_type, entry.amount_micros) == ("voucher_credit", "voucher", 25_000_000)
    v = db.session.scalar(select(Voucher).where(Voucher.id == int(entry.ref_id)))
    assert v.redeemed_by == uid() and v.last4 == codes[0][-4:]
    assert ledger.verify() == []


def test_distinct_messages_for_unknown_expired_disabled(ctx):
    """Unknown, expired and disabled codes each get their own clear message and credit nothing."""
    make_user()
    u = uid()
    _, [expired] = vouchers.mint_batch(1, 1_000_000, expires_at=utcnow() - timedelta(seconds=1))
    batch, [disabled] = vouchers.mint_batch(1, 1_000_000)
    vouchers.set_batch_status(batch.id, "disabled", actor_id=u)
    messages = set()
    for code, err in (("ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ", vouchers.UnknownCode), (expired, vouchers.ExpiredCode),
                      (disabled, vouchers.DisabledCode), ("nope", vouchers.InvalidCode)):
        with pytest.raises(err) as exc:
            vouchers.redeem(u, code)
        messages.add(str(exc.value))
    assert len(messages) == 4
    assert ledger.wallet_of(u).balance_micros == 0
    vouchers.set_batch_status(batch.id, "active", actor_id=u)  # re-enabling makes it usable
    assert vouchers.redeem(u, disabled).value_micros == 1_000_000


def test_mint_validates_its_inputs(ctx):
    """Minting refuses bad counts, values, expiry days and notes with a message."""
    for kwargs in ({"count": 0, "value_micros": 1}, {"count": 10_001, "value_micros": 1},
                   {"count": 1, "value_micros": 0}, {"count": True, "value_micros": 1},
                   {"count": 1, "value_micros": 1, "note": "x" * 201},
                   {"count": 1, "value_micros": 1, "note": "evil\u202etxt"}):
        with pytest.raises(vouchers.VoucherError):
            vouchers.mint_batch(**kwargs)
    for days in (0, 3651, -1, True):
        with pytest.raises(vouchers.VoucherError):
            vouchers.expiry_from_days(days)
    assert db.session.scalar(select(VoucherBatch.id)) is None


def test_codes_csv_format(ctx):
    """The CSV has the header code,value,expires_at and one code per line."""
    exp = utcnow() + timedelta(days=30)
    body = vouchers.codes_csv(["AAAA-BBBB-CCCC-DDDD-EEEE"], 12_500_000, exp)
    rows = list(csv.reader(io.StringIO(body)))
    assert rows[0] == ["code", "value", "expires_at"]
    assert rows[1][:2] == ["AAAA-BBBB-CCCC-DDDD-EEEE", "12.500000"] and rows[1][2].startswith(str(exp.year))


# ---- CLI ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_mint_writes_csv_only_and_db_has_no_code(db_url, tmp_path):
    """mint-vouchers (on the migrated schema) writes the codes to the CSV only; the DB holds no code."""
    migrate(db_url)
    out = tmp_path / "cards.csv"
    res = flask_cli(db_url, "mint-vouchers", "--count", "5", "--value", "50", "--expires-days", "30",
                    "--note", "shop A", "--out", str(out))
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[0] == ["code", "value", "expires_at"] and len(rows) == 6
    codes = [r[0] for r in rows[1:]]
    assert all(CODE_RE.match(c) and r[1] == "50.000000" and r[2] for c, r in zip(codes, rows[1:]))
    assert out.stat().st_mode & 0o777 == 0o600
    for c in codes:
        assert c not in res.stdout + res.stderr and c.replace("-", "") not in res.stdout + res.stderr
    assert not list(tmp_path.glob(".mint-*"))
    again = flask_cli(db_url, "mint-vouchers", "--count", "1", "--value", "1", "--out", str(out), check=False)
    assert again.returncode != 0 and "exists" in again.stderr
    bad = flask_cli(db_url, "mint-vouchers", "--count", "1", "--value", "NaN",
                    "--out", str(tmp_path / "x.csv"), check=False)
    assert bad.returncode != 0 and not (tmp_path / "x.csv").exists()
    app = make_app(db_url)
    with app.app_context():
        _assert_no_clear_code(db_url, codes)
        make_user()
        assert vouchers.redeem(uid(), codes[0]).value_micros == 50_000_000
        batch = db.session.scalars(select(VoucherBatch)).one()
        assert (batch.count, batch.note, batch.face_value_micros) == (5, "shop A", 50_000_000)
        db.session.remove()
        db.engine.dispose()
    ok = flask_cli(db_url, "ledger-verify")
    assert "ledger ok" in ok.stdout


def _assert_no_clear_code(db_url: str, codes: list[str]) -> None:
    variants = [v for c in codes for v in (c, c.replace("-", ""), c.lower(), c.replace("-", "").lower())]
    # Every text cell of every table, on both databases.
    for table in db.metadata.sorted_tables:
        for row in db.session.execute(select(table)).all():
            blob = json.dumps([str(x) for x in row])
            assert not any(v in blob for v in variants), table.name
    if db_url.startswith("sqlite"):
        # The database file and its WAL, byte for byte.
        path = Path(db_url.removeprefix("sqlite:///"))
        db.session.remove()
        db.engine.dispose()
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        for f in path.parent.glob(path.name + "*"):
            data = f.read_bytes()
            assert not any(v.encode() in data for v in variants), f


# ---- admin page -----------------------------------------------------------------------

def test_admin_mints_shows_codes_once_and_lists_batches(ctx, client):
    """An admin mints from the page: codes shown once (no-store, no htmx history), then only counts remain."""
    make_user("admin@example.com", role="admin")
    login(client, "admin@example.com")
    token = csrf_from(client.get("/admin/vouchers/").data)
    resp = client.post("/admin/vouchers/", data={"count": "3", "value": "20", "expires_days": "90",
                                                "note": "launch", "output": "page", "csrf_token": token})
    assert resp.status_code == 200 and resp.headers["Cache-Control"] == "no-store"
    html = resp.get_data(as_text=True)
    codes = re.findall(r"[A-HJ-NP-Z2-9]{4}(?:-[A-HJ-NP-Z2-9]{4}){4}", html.split('id="minted-codes"')[1])
    assert len(set(codes)) == 3 and 'hx-history="false"' in html and "data:text/csv;base64," in html
    listing = client.get("/admin/vouchers/").get_data(as_text=True)
    assert not any(c in listing for c in codes) and "launch" in listing and "¥20.00" in listing
    audit = db.session.scalars(select(AuditLog).where(AuditLog.action == "voucher.mint")).one()
    assert not any(c in (audit.after or "") for c in codes)
    _assert_no_clear_code("postgres-or-sqlite-rows-only", codes)


def test_admin_mint_csv_download(ctx, client):
    """'Mint and download CSV' answers with the CSV attachment itself."""
    make_user("admin@example.com", role="admin")
    login(client, "admin@example.com")
    token = csrf_from(client.get("/admin/vouchers/").data)
    resp = client.post("/admin/vouchers/", data={"count": "2", "value": "5.5", "output": "csv",
                                                "csrf_token": token})
    assert resp.status_code == 200 and resp.mimetype == "text/csv"
    assert resp.headers["Content-Disposition"].startswith("attachment;")
    assert resp.headers["Cache-Control"] == "no-store"
    rows = list(csv.reader(io.StringIO(resp.get_data(as_text=True))))
    assert rows[0] == ["code", "value", "expires_at"] and len(rows) == 3 and rows[1][1] == "5.500000"
    make_user()
    assert vouchers.redeem(uid(), rows[1][0]).value_micros == 5_500_000


def test_admin_mint_bad_input_is_422(ctx, client):
    """Bad mint input re-renders the form with 422 and a message; no batch is created."""
    make_user("admin@example.com", role="admin")
    login(client, "admin@example.com")
    token = csrf_from(client.get("/admin/vouchers/").data)
    for field, value in [("count", "0"), ("count", "1e3"), ("count", "١٠"), ("count", "10001"),
                         ("value", "NaN"), ("value", "-5"), ("value", "1_000"), ("expires_days", "0"),
                         ("expires_days", "x"), ("note", "a\u202eb"), ("note", "n" * 201)]:
        data = {"count": "1", "value": "1", "expires_days": "", "note": "", "csrf_token": token}
        data[field] = value
        resp = client.post("/admin/vouchers/", data=data)
        assert resp.status_code == 422 and b'class="form-error"' in resp.data, (field, value)
    assert db.session.scalar(select(VoucherBatch.id)) is None


def test_admin_disables_batch_over_htmx(ctx, client):
    """Disabling a batch returns the batch table fragment with a toast; its codes stop working."""
    make_user("admin@example.com", role="admin")
    make_user()
    batch, [code] = vouchers.mint_batch(1, 1_000_000)
    login(client, "admin@example.com")
    token = csrf_from(client.get("/admin/vouchers/").data)
    resp = client.post(f"/admin/vouchers/{batch.id}/disable", data={"csrf_token": token}, headers=HX)
    assert resp.status_code == 200
    assert resp.get_data(as_text=True).lstrip().startswith('<section id="batch-table"')
    assert json.loads(resp.headers["HX-Trigger"])["toast"]["message"] == f"Batch {batch.id} disabled."
    with pytest.raises(vouchers.DisabledCode):
        vouchers.redeem(uid(), code)
    plain = client.post(f"/admin/vouchers/{batch.id}/enable", data={"csrf_token": token})
    assert plain.status_code == 302
    assert client.post("/admin/vouchers/999/disable", data={"csrf_token": token}).status_code == 404


def test_admin_vouchers_is_admin_only(ctx, client):
    """Users and support staff get 404 on the voucher admin, for GET and POST."""
    make_user()
    make_user("support@example.com", role="support")
    for email in ("user@example.com", "support@example.com"):
        c = client.application.test_client()
        login(c, email)
        token = csrf_from(c.get("/wallet/").data)
        assert c.get("/admin/vouchers/").status_code == 404
        assert c.post("/admin/vouchers/", data={"count": "1", "value": "1", "csrf_token": token}).status_code == 404
    assert db.session.scalar(select(VoucherBatch.id)) is None


def test_ledger_verify_cli_reports_mismatch(ctx):
    """ledger-verify covers every wallet and exits non-zero naming a wallet whose balance drifted."""
    make_user()
    make_user("b@example.com")
    ledger.credit(uid(), 5_000_000, kind="voucher_credit")
    runner = ctx.test_cli_runner()
    ok = runner.invoke(args=["ledger-verify"])
    assert ok.exit_code == 0 and "ledger ok" in ok.output and "2 wallets" in ok.output
    db.session.execute(text("UPDATE wallets SET balance_micros = balance_micros + 1 WHERE user_id = :u"),
                       {"u": uid("b@example.com")})
    db.session.commit()
    bad = runner.invoke(args=["ledger-verify"])
    assert bad.exit_code == 1 and f"user {uid('b@example.com')}" in bad.output
