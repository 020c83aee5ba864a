"""Ledger operations: one conditional statement each, ledger rows with balance after, append-only."""
from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from console import ledger
from console.extensions import db
from console.models import LedgerEntry, User
from tests.support.web import make_user

C = 1_000_000


@pytest.fixture
def uid(ctx):
    make_user()
    return db.session.scalar(select(User.id).where(User.email == "user@example.com"))


def entries(user_id):
    return db.session.execute(select(LedgerEntry.kind, LedgerEntry.amount_micros,
                                     LedgerEntry.balance_after_micros)
                              .where(LedgerEntry.user_id == user_id).order_by(LedgerEntry.id)).all()


def test_credit_charge_write_rows_with_balance_after(uid):
    """credit and charge move the balance and append a row carrying the balance after it."""
    assert ledger.credit(uid, 10 * C, kind="voucher_credit", ref_type="voucher", ref_id="1").balance_micros == 10 * C
    assert ledger.charge(uid, 3 * C, ref_type="usage", ref_id="req_1").balance_micros == 7 * C
    assert entries(uid) == [("voucher_credit", 10 * C, 10 * C), ("usage_charge", -3 * C, 7 * C)]
    assert ledger.verify() == []


def test_charge_never_overdraws(uid):
    """A charge larger than the available balance is refused and changes nothing."""
    ledger.credit(uid, 5 * C, kind="voucher_credit")
    with pytest.raises(ledger.InsufficientFunds) as exc:
        ledger.charge(uid, 5 * C + 1)
    assert exc.value.available_micros == 5 * C
    assert ledger.wallet_of(uid).balance_micros == 5 * C and len(entries(uid)) == 1


def test_hold_release_settle(uid):
    """A hold reserves available money without a ledger row; settle charges the real cost and frees the hold."""
    ledger.credit(uid, 10 * C, kind="voucher_credit")
    ledger.hold(uid, 4 * C)
    with pytest.raises(ledger.InsufficientFunds):
        ledger.charge(uid, 7 * C)  # only 6 available
    with pytest.raises(ledger.InsufficientFunds):
        ledger.hold(uid, 6 * C + 1)
    ledger.hold(uid, 2 * C)
    ledger.release(uid, 2 * C)
    with pytest.raises(ledger.LedgerError):
        ledger.release(uid, 5 * C)  # more than held
    m = ledger.settle(uid, hold_micros=4 * C, charge_micros=C, ref_type="usage", ref_id="req_2")
    assert (m.balance_micros, m.held_micros) == (9 * C, 0)
    assert ledger.settle(uid, hold_micros=0, charge_micros=0, ref_type="usage", ref_id="r").entry_id is None
    with pytest.raises(ledger.LedgerError):
        ledger.settle(uid, hold_micros=C, charge_micros=C, ref_type="usage", ref_id="r3")
    assert entries(uid)[-1] == ("usage_charge", -C, 9 * C)
    assert ledger.verify() == []


def test_adjust_needs_reason_and_never_overdraws(uid):
    """Staff adjustments need a reason; a debit cannot take more than is available."""
    with pytest.raises(ValueError):
        ledger.adjust(uid, C, actor_id=uid, reason="  ")
    ledger.adjust(uid, 2 * C, actor_id=uid, reason="goodwill")
    with pytest.raises(ledger.InsufficientFunds):
        ledger.adjust(uid, -3 * C, actor_id=uid, reason="chargeback")
    ledger.adjust(uid, -2 * C, actor_id=uid, reason="chargeback")
    assert [e[0] for e in entries(uid)] == ["admin_adjust", "admin_adjust"]
    assert ledger.wallet_of(uid).balance_micros == 0


@pytest.mark.parametrize("amount", [0, -1, True, 1.5, "1", None])
def test_amounts_must_be_positive_integers(uid, amount):
    """Zero, negative, bool, float and string amounts are programming errors, refused before any SQL."""
    for op in (lambda: ledger.credit(uid, amount, kind="refund"), lambda: ledger.charge(uid, amount),
               lambda: ledger.hold(uid, amount), lambda: ledger.release(uid, amount)):
        with pytest.raises(ValueError):
            op()
    assert entries(uid) == []


def test_missing_wallet(ctx):
    """Operations on a user without a wallet raise NoWallet."""
    with pytest.raises(ledger.NoWallet):
        ledger.credit(999, C, kind="refund")
    with pytest.raises(ledger.NoWallet):
        ledger.charge(999, C)


def test_ledger_rows_are_append_only_in_the_database(uid):
    """UPDATE and DELETE on ledger_entries fail in the database itself."""
    ledger.credit(uid, C, kind="voucher_credit")
    for sql in ("UPDATE ledger_entries SET amount_micros = 5", "DELETE FROM ledger_entries"):
        with pytest.raises(DBAPIError):
            db.session.execute(text(sql))
            db.session.flush()
        db.session.rollback()
    assert entries(uid) == [("voucher_credit", C, C)]


def test_verify_finds_drift(uid):
    """verify() reports a wallet whose balance differs from its ledger sum."""
    ledger.credit(uid, C, kind="voucher_credit")
    db.session.execute(text("UPDATE wallets SET balance_micros = 7"))
    db.session.commit()
    [m] = ledger.verify()
    assert (m.user_id, m.balance_micros, m.ledger_sum_micros, m.last_balance_after) == (uid, 7, C, C)
