"""Every balance change: credit, charge, hold, release, settle, adjust — and verification.

The only code that writes wallets or ledger_entries. Each operation is one conditional
UPDATE … RETURNING (the check and the debit are one statement, checked by the row it
returns) plus, when the balance moves, one append-only ledger row carrying the balance
after it. Operations run inside `write_tx()` (joining the caller's transaction if there
is one), or on the relay's raw transaction (`tx=`), never across network I/O. For the
relay on PostgreSQL, hold() and settle() also exist as SQL fragments (PG_HOLD_CTE,
PG_SETTLE_CTES) that the relay joins to its own statement, so a call is one round trip.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

from sqlalchemy import String, bindparam, cast, func, insert, select, update

from console.database import Prepared, RawTx, write_tx
from console.extensions import db
from console.models import LedgerEntry, Voucher, Wallet, utcnow


class LedgerError(Exception):
    """Base of the ledger's domain errors."""


class InsufficientFunds(LedgerError):
    def __init__(self, available_micros: int | None = None):
        super().__init__("insufficient balance")
        self.available_micros = available_micros


class NoWallet(LedgerError):
    pass


@dataclass(frozen=True)
class Movement:
    entry_id: int | None
    balance_micros: int
    held_micros: int


def _positive(amount: int) -> None:
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise ValueError("amount must be a positive integer of micro-credits")


def create_wallet(user_id: int) -> None:
    with write_tx():
        db.session.execute(insert(Wallet).values(user_id=user_id, balance_micros=0, held_micros=0))


# Hot-path statements are built once with bound parameters and run on the session's
# connection (Core): per call there is then no statement construction, no cache-key walk over
# literal values and no ORM bookkeeping — a relay call runs these twice.
_W = Wallet.__table__
_L = LedgerEntry.__table__


def _move_statement(need_available: bool, need_held: bool):
    stmt = (
        update(_W)
        .where(_W.c.user_id == bindparam("p_user"))
        .values(balance_micros=_W.c.balance_micros + bindparam("p_balance_delta"),
                held_micros=_W.c.held_micros + bindparam("p_held_delta"),
                updated_at=bindparam("p_now", type_=_W.c.updated_at.type))
        .returning(_W.c.id, _W.c.balance_micros, _W.c.held_micros)
    )
    if need_available:
        stmt = stmt.where(_W.c.balance_micros - _W.c.held_micros >= bindparam("p_need_available"))
    if need_held:
        stmt = stmt.where(_W.c.held_micros >= bindparam("p_need_held"))
    return stmt


_MOVES = {(a, h): Prepared(_move_statement(a, h)) for a in (False, True) for h in (False, True)}
_INSERT_ENTRY = Prepared(insert(_L).returning(_L.c.id))
_AVAILABLE = Prepared(select(_W.c.balance_micros - _W.c.held_micros).where(_W.c.user_id == bindparam("p_user")))


def _run(tx: RawTx | None, stmt: Prepared, params: dict):
    """First row of a hot-path statement: on the relay's raw transaction when given, else on
    the session's (joining write_tx())."""
    if tx is not None:
        return tx.first(stmt, params)
    return db.session.connection().execute(stmt.stmt, params).first()


def _move(user_id: int, *, balance_delta: int = 0, held_delta: int = 0,
          need_available: int | None = None, need_held: int | None = None, tx: RawTx | None = None):
    """One conditional UPDATE; returns (wallet_id, balance, held) or None when the guard failed."""
    params = {"p_user": user_id, "p_balance_delta": balance_delta, "p_held_delta": held_delta,
              "p_now": utcnow()}
    if need_available is not None:
        params["p_need_available"] = need_available
    if need_held is not None:
        params["p_need_held"] = need_held
    return _run(tx, _MOVES[(need_available is not None, need_held is not None)], params)


def _guard_failed(user_id: int, tx: RawTx | None = None) -> LedgerError:
    row = _run(tx, _AVAILABLE, {"p_user": user_id})
    return NoWallet() if row is None else InsufficientFunds(row[0])


def _entry(wallet_id: int, user_id: int, kind: str, amount: int, balance_after: int,
           ref_type: str | None, ref_id: str | None, actor_id: int | None,
           reason: str | None, tx: RawTx | None = None) -> int:
    return _run(tx, _INSERT_ENTRY, {
        "wallet_id": wallet_id, "user_id": user_id, "kind": kind, "amount_micros": amount,
        "balance_after_micros": balance_after, "ref_type": ref_type, "ref_id": ref_id,
        "actor_id": actor_id, "reason": reason, "created_at": utcnow(),
    })[0]


def credit(user_id: int, amount: int, *, kind: str, ref_type: str | None = None,
           ref_id: str | None = None, actor_id: int | None = None,
           reason: str | None = None) -> Movement:
    """Add money (voucher, refund, positive adjustment)."""
    _positive(amount)
    with write_tx():
        row = _move(user_id, balance_delta=amount)
        if row is None:
            raise NoWallet()
        entry = _entry(row[0], user_id, kind, amount, row[1], ref_type, ref_id, actor_id, reason)
        return Movement(entry, row[1], row[2])


def charge(user_id: int, amount: int, *, kind: str = "usage_charge", ref_type: str | None = None,
           ref_id: str | None = None, actor_id: int | None = None,
           reason: str | None = None) -> Movement:
    """Take money only if the available balance covers it (one statement)."""
    _positive(amount)
    with write_tx():
        row = _move(user_id, balance_delta=-amount, need_available=amount)
        if row is None:
            raise _guard_failed(user_id)
        entry = _entry(row[0], user_id, kind, -amount, row[1], ref_type, ref_id, actor_id, reason)
        return Movement(entry, row[1], row[2])


def hold(user_id: int, amount: int, *, tx: RawTx | None = None) -> Movement:
    """Reserve money for an in-flight call; the balance does not move, so no ledger row.
    tx: the relay's raw write transaction (see database.raw_tx), else write_tx()."""
    _positive(amount)
    with _tx(tx):
        row = _move(user_id, held_delta=amount, need_available=amount, tx=tx)
        if row is None:
            raise _guard_failed(user_id, tx)
        return Movement(None, row[1], row[2])


def release(user_id: int, amount: int) -> Movement:
    """Give back a hold that will not be charged."""
    _positive(amount)
    with write_tx():
        row = _move(user_id, held_delta=-amount, need_held=amount)
        if row is None:
            raise LedgerError("release larger than the held amount")
        return Movement(None, row[1], row[2])


def settle(user_id: int, *, hold_micros: int, charge_micros: int, ref_type: str,
           ref_id: str, tx: RawTx | None = None) -> Movement:
    """Release a call's hold and charge what it actually cost, in one statement.

    The charge is not capped by the available balance: the upstream has already served the
    call, so the money is owed. Holds are upper-bound estimates, so the balance can dip
    below zero only by an estimate's error (documented in docs/billing.md).
    """
    if hold_micros < 0 or charge_micros < 0:
        raise ValueError("negative hold or charge")
    with _tx(tx):
        row = _move(user_id, balance_delta=-charge_micros, held_delta=-hold_micros,
                    need_held=hold_micros, tx=tx)
        if row is None:
            raise LedgerError("settle: the hold is not there")
        entry = None
        if charge_micros:
            entry = _entry(row[0], user_id, "usage_charge", -charge_micros, row[1],
                           ref_type, ref_id, None, None, tx)
        return Movement(entry, row[1], row[2])


# PostgreSQL: lock the wallets of a batch of relay calls before their statements, in user
# order, so two batches never wait for each other in a cycle. Parameter: keys (user ids).
PG_LOCK_WALLETS = "SELECT 1 FROM wallets WHERE user_id = ANY(%(keys)s) ORDER BY user_id FOR UPDATE"


# PostgreSQL: hold() above as a CTE named "h", for a caller's one-statement admission; it
# holds only when the caller's extra condition (SQL) is true too, and returns the wallet id.
# Parameters: p_user, p_hold, p_now. A hold of 0 always passes the balance check.
PG_HOLD_CTE = """
h AS (
  UPDATE wallets SET held_micros = held_micros + %(p_hold)s, updated_at = %(p_now)s
  WHERE user_id = %(p_user)s AND (%(p_hold)s::bigint = 0 OR balance_micros - held_micros >= %(p_hold)s)
    AND ({condition})
  RETURNING id
)"""


# PostgreSQL: settle() above as two CTEs, to run in ONE statement with the caller's claim on
# the call (a CTE named "claim" that returns a row only when the call is settled now): one
# round trip, and the wallet row stays locked only for that statement and its commit. Each
# sub-statement re-checks its row after a lock wait (READ COMMITTED), so the guard and the
# arithmetic see the latest wallet. Parameters: s_user, s_hold, s_charge, s_ref_type,
# s_ref_id, s_now. The caller must fail the statement when claim has a row and w has none
# (see PG_SETTLE_GUARD): the hold is not there, and nothing may be written.
PG_SETTLE_CTES = """
w AS (
  UPDATE wallets SET balance_micros = balance_micros - %(s_charge)s,
                     held_micros = held_micros - %(s_hold)s, updated_at = %(s_now)s
  WHERE user_id = %(s_user)s AND held_micros >= %(s_hold)s AND EXISTS (SELECT 1 FROM claim)
  RETURNING id, balance_micros, held_micros
),
e AS (
  INSERT INTO ledger_entries (wallet_id, user_id, kind, amount_micros, balance_after_micros,
                              ref_type, ref_id, created_at)
  SELECT id, %(s_user)s, 'usage_charge', -%(s_charge)s::bigint, balance_after, %(s_ref_type)s,
         %(s_ref_id)s, %(s_now)s
  FROM (SELECT id, balance_micros AS balance_after FROM w) AS moved
  WHERE %(s_charge)s::bigint > 0
  RETURNING id
)"""
# An error raised at run time (the cast of a text that names the problem) aborts the whole
# statement; a constant expression would be folded, and raised, at plan time.
PG_SETTLE_GUARD = """CASE WHEN EXISTS (SELECT 1 FROM claim) AND NOT EXISTS (SELECT 1 FROM w)
  THEN CAST('settle: the hold is not there for ' || (SELECT min(id) FROM claim)::text AS integer) END"""


def _tx(tx: RawTx | None):
    """The caller's raw transaction (nothing to open), else a write_tx()."""
    return nullcontext() if tx is not None else write_tx()


def adjust(user_id: int, amount: int, *, actor_id: int, reason: str) -> Movement:
    """Staff adjustment with a mandatory reason; a debit never takes more than is available."""
    if not reason or not reason.strip():
        raise ValueError("an adjustment needs a reason")
    if amount > 0:
        return credit(user_id, amount, kind="admin_adjust", actor_id=actor_id, reason=reason)
    return charge(user_id, -amount, kind="admin_adjust", actor_id=actor_id, reason=reason)


def wallet_of(user_id: int) -> Wallet | None:
    return db.session.scalar(select(Wallet).where(Wallet.user_id == user_id))


HISTORY_PAGE = 25


@dataclass(frozen=True)
class HistoryRow:
    entry: LedgerEntry
    voucher_last4: str | None  # for voucher credits: the code's last 4 characters


@dataclass(frozen=True)
class HistoryPage:
    rows: list[HistoryRow]
    next_before: int | None  # pass as `before` for the next (older) page; None at the end


def history(user_id: int, *, before: int | None = None, limit: int = HISTORY_PAGE) -> HistoryPage:
    """One user's ledger, newest first, keyset-paginated on the entry id (no OFFSET scans)."""
    wallet_id = select(Wallet.id).where(Wallet.user_id == user_id).scalar_subquery()
    stmt = (
        select(LedgerEntry, Voucher.last4)
        .outerjoin(Voucher, (LedgerEntry.ref_type == "voucher")
                   & (LedgerEntry.ref_id == cast(Voucher.id, String)))
        # wallet_id uses ix_ledger_wallet_id_desc; user_id keeps the query owner-scoped.
        .where(LedgerEntry.wallet_id == wallet_id, LedgerEntry.user_id == user_id)
    )
    if before is not None:
        stmt = stmt.where(LedgerEntry.id < before)
    rows = db.session.execute(stmt.order_by(LedgerEntry.id.desc()).limit(limit + 1)).all()
    more = len(rows) > limit
    page = [HistoryRow(e, last4) for e, last4 in rows[:limit]]
    return HistoryPage(page, page[-1].entry.id if more else None)


@dataclass(frozen=True)
class Mismatch:
    user_id: int
    balance_micros: int
    ledger_sum_micros: int
    last_balance_after: int | None = None


def verify() -> list[Mismatch]:
    """Every wallet whose balance differs from the sum of its ledger entries, or from the
    balance_after of its newest entry (an entry written out of order or a lost update)."""
    sums = (
        select(LedgerEntry.wallet_id, func.sum(LedgerEntry.amount_micros).label("s"),
               func.max(LedgerEntry.id).label("last_id"))
        .group_by(LedgerEntry.wallet_id)
        .subquery()
    )
    last = LedgerEntry.__table__.alias("last_entry")
    rows = db.session.execute(
        select(Wallet.user_id, Wallet.balance_micros, func.coalesce(sums.c.s, 0),
               last.c.balance_after_micros)
        .outerjoin(sums, sums.c.wallet_id == Wallet.id)
        .outerjoin(last, last.c.id == sums.c.last_id)
        .order_by(Wallet.user_id)
    ).all()
    return [Mismatch(u, b, int(s), a) for u, b, s, a in rows
            if b != int(s) or (a is not None and a != b)]


def wallet_count() -> int:
    return db.session.scalar(select(func.count()).select_from(Wallet)) or 0
