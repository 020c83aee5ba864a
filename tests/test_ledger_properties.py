"""Hypothesis stateful test: random redeem / charge / hold / release / settle / adjust sequences
keep balance = Σ ledger, available ≥ 0, and the ledger append-only with a consistent chain."""
from __future__ import annotations

import itertools
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select

from console import ledger, vouchers
from console.extensions import db
from console.models import LedgerEntry, User, Wallet

C = 1_000_000
amounts = st.integers(min_value=1, max_value=50 * C)
_emails = itertools.count()


def machine_for():
    class LedgerMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            # A fresh user per example; password hashing is skipped on purpose (argon2 is slow).
            user = User(email=f"p{next(_emails)}@example.com", password_hash="-", session_token="-")
            db.session.add(user)
            db.session.commit()
            self.uid = user.id
            ledger.create_wallet(self.uid)
            self.balance = self.held = 0
            self.holds: list[int] = []
            self.used_codes: list[str] = []
            self.seen: list[tuple] = []

        @rule(value=amounts)
        def redeem(self, value):
            _, [code] = vouchers.mint_batch(1, value)
            assert vouchers.redeem(self.uid, code).balance_micros == self.balance + value
            self.balance += value
            self.used_codes.append(code)

        @precondition(lambda self: self.used_codes)
        @rule(data=st.data())
        def redeem_again(self, data):
            code = data.draw(st.sampled_from(self.used_codes))
            try:
                vouchers.redeem(self.uid, code)
            except vouchers.AlreadyRedeemed:
                return
            raise AssertionError("a used code credited twice")

        @rule(amount=amounts)
        def charge(self, amount):
            try:
                ledger.charge(self.uid, amount, ref_type="usage", ref_id="p")
            except ledger.InsufficientFunds:
                assert amount > self.balance - self.held
                return
            assert amount <= self.balance - self.held
            self.balance -= amount

        @rule(amount=amounts)
        def hold(self, amount):
            try:
                ledger.hold(self.uid, amount)
            except ledger.InsufficientFunds:
                assert amount > self.balance - self.held
                return
            self.held += amount
            self.holds.append(amount)

        @precondition(lambda self: self.holds)
        @rule(data=st.data())
        def release(self, data):
            amount = self.holds.pop(data.draw(st.integers(0, len(self.holds) - 1)))
            ledger.release(self.uid, amount)
            self.held -= amount

        @precondition(lambda self: self.holds)
        @rule(data=st.data())
        def settle(self, data):
            amount = self.holds.pop(data.draw(st.integers(0, len(self.holds) - 1)))
            cost = data.draw(st.integers(0, amount))  # a hold is the call's upper bound
            ledger.settle(self.uid, hold_micros=amount, charge_micros=cost, ref_type="usage", ref_id="s")
            self.held -= amount
            self.balance -= cost

        @rule(amount=st.integers(min_value=-50 * C, max_value=50 * C).filter(bool))
        def adjust(self, amount):
            try:
                ledger.adjust(self.uid, amount, actor_id=self.uid, reason="property test")
            except ledger.InsufficientFunds:
                assert -amount > self.balance - self.held
                return
            self.balance += amount

        @invariant()
        def books_balance(self):
            db.session.expire_all()
            w = db.session.scalar(select(Wallet).where(Wallet.user_id == self.uid))
            total = db.session.scalar(select(func.coalesce(func.sum(LedgerEntry.amount_micros), 0))
                                      .where(LedgerEntry.user_id == self.uid))
            assert (w.balance_micros, w.held_micros) == (self.balance, self.held)
            assert w.balance_micros == total
            assert w.balance_micros - w.held_micros >= 0 and w.held_micros >= 0

        @invariant()
        def ledger_is_append_only_and_chained(self):
            rows = db.session.execute(
                select(LedgerEntry.id, LedgerEntry.kind, LedgerEntry.amount_micros,
                       LedgerEntry.balance_after_micros, LedgerEntry.created_at)
                .where(LedgerEntry.user_id == self.uid).order_by(LedgerEntry.id)).all()
            rows = [tuple(r) for r in rows]
            assert rows[:len(self.seen)] == self.seen  # nothing before was changed or removed
            running = 0
            for _, _, amount, after, _ in rows:
                running += amount
                assert after == running
            self.seen = rows

    return LedgerMachine


def test_random_operation_sequences_keep_the_books(ctx):
    """Random sequences of money operations keep every ledger invariant (500 examples on SQLite,
    150 on PostgreSQL, whose per-commit cost is higher; both run in CI)."""
    default = "500" if db.engine.dialect.name == "sqlite" else "150"
    examples = int(os.environ.get("LEDGER_PROPERTY_EXAMPLES", default))
    run_state_machine_as_test(machine_for(), settings=settings(
        max_examples=examples, stateful_step_count=12, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                               HealthCheck.filter_too_much]))
    assert ledger.verify() == []
