"""Bad input corpus against the money forms: always a clear 4xx, never a 500, never a balance change."""
from __future__ import annotations

from sqlalchemy import func, select

from console import ledger, vouchers
from console.extensions import db
from console.models import LedgerEntry, User, VoucherBatch
from tests.conftest import make_app
from tests.support.web import HX, csrf_from, login, make_user

CORPUS = ["NaN", "Infinity", "-Infinity", "1E+9999", "٣", "１２", "1_000", " 7 ", "-1", "0.0000001",
          "9" * 20, "0", "", "' OR '1'='1' --", "'; DROP TABLE wallets; --", "<script>alert(1)</script>",
          '"><img src=x onerror=alert(1)>', "%00", "\x00", "\u202eABCD-EFGH-JKMN-PQRS-TUVW",
          "ABCD-EFGH-JKMN-PQRS-TUVW\n", "ＡＢＣＤ-EFGH-JKMN-PQRS-TUVW", "x" * 5000]
MEGABYTE = "7" * (1024 * 1024)


def _app(db_url):
    # The corpus is one user's worth of failures: lift the throttle for this test only.
    app = make_app(db_url, REDEEM_LIMITS="100000 per minute")
    with app.app_context():
        db.create_all()
    return app


def test_redeem_corpus_is_4xx_without_balance_change(db_url):
    """Every corpus entry as a voucher code: 4xx with a message (htmx and plain), nothing credited."""
    app = _app(db_url)
    with app.app_context():
        make_user()
        _, [real] = vouchers.mint_batch(1, 5_000_000)
        client = app.test_client()
        login(client)
        token = csrf_from(client.get("/wallet/").data)
        for raw in CORPUS + [real + "X", real[:-1], real.replace("-", "_")]:
            for headers in (HX, {}):
                resp = client.post("/wallet/redeem", data={"code": raw, "csrf_token": token}, headers=headers)
                assert resp.status_code == 422, (raw[:30], resp.status_code)
                assert b'class="form-error"' in resp.data
        huge = client.post("/wallet/redeem", data={"code": MEGABYTE, "csrf_token": token}, headers=HX)
        assert huge.status_code == 413
        assert db.session.scalar(select(func.count()).select_from(LedgerEntry)) == 0
        uid = db.session.scalar(select(User.id))
        assert ledger.wallet_of(uid).balance_micros == 0
        assert vouchers.redeem(uid, real).value_micros == 5_000_000  # the real code survived it all
        db.session.remove()
        db.engine.dispose()


def test_mint_value_corpus_is_422_and_creates_nothing(db_url):
    """Every corpus entry as a face value (and as a count) is refused with 422; no batch appears."""
    app = _app(db_url)
    with app.app_context():
        make_user("admin@example.com", role="admin")
        client = app.test_client()
        login(client, "admin@example.com")
        token = csrf_from(client.get("/admin/vouchers/").data)
        for raw in CORPUS:
            for field in ("value", "count", "expires_days"):
                data = {"count": "1", "value": "1", "expires_days": "", "csrf_token": token, field: raw}
                if field == "expires_days" and raw in ("", "0"):
                    data[field] = "0"
                resp = client.post("/admin/vouchers/", data=data)
                assert resp.status_code == 422, (field, raw[:30], resp.status_code)
                assert b'class="form-error"' in resp.data
        assert client.post("/admin/vouchers/", data={"count": "1", "value": MEGABYTE,
                                                     "csrf_token": token}).status_code == 413
        assert db.session.scalar(select(func.count()).select_from(VoucherBatch)) == 0
        db.session.remove()
        db.engine.dispose()
