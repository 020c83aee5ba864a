"""Voucher cards: code format, minting batches, redemption, batch status.

A code is 20 characters of an unambiguous 32-symbol alphabet (100 bits of randomness),
shown as XXXX-XXXX-XXXX-XXXX-XXXX. The database keeps only its SHA-256 and the last 4
characters; the clear code exists once, in the mint's CSV or page. Redemption is one
conditional claim (unused, batch active, not expired) in the same transaction as the
ledger credit, so a code credits exactly once whatever the concurrency.
"""
from __future__ import annotations

import csv
import hashlib
import io
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, insert, or_, select, update

from console import audit, ledger, money
from console.database import write_tx
from console.extensions import db
from console.models import Voucher, VoucherBatch, utcnow

# No 0/O and 1/I: nothing a person can misread on a printed card. 32 symbols = 5 bits each.
ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
CODE_LEN = 20
GROUP = 4
RAW_MAX = 64          # longest raw input worth normalising (spaces and dashes included)
MAX_BATCH = 10_000
MAX_EXPIRY_DAYS = 3650
NOTE_MAX = 200
_ALPHABET_SET = frozenset(ALPHABET)
CSV_HEADER = ("code", "value", "expires_at")


class VoucherError(ValueError):
    """A redemption or minting error whose message is safe to show."""


class InvalidCode(VoucherError):
    def __init__(self) -> None:
        super().__init__(f"That is not a voucher code. Codes have {CODE_LEN} characters: letters "
                         "A–Z (no I or O) and digits 2–9, e.g. ABCD-EFGH-JKMN-PQRS-TUVW.")


class UnknownCode(VoucherError):
    def __init__(self) -> None:
        super().__init__("This code does not exist. Check it for typos and try again.")


class AlreadyRedeemed(VoucherError):
    def __init__(self) -> None:
        super().__init__("This code has already been redeemed.")


class ExpiredCode(VoucherError):
    def __init__(self, expires_at: datetime) -> None:
        super().__init__(f"This code expired on {expires_at:%Y-%m-%d}.")


class DisabledCode(VoucherError):
    def __init__(self) -> None:
        super().__init__("This code has been disabled. Contact support if you bought it recently.")


@dataclass(frozen=True)
class Redemption:
    voucher_id: int
    value_micros: int
    balance_micros: int


@dataclass(frozen=True)
class BatchRow:
    batch: VoucherBatch
    redeemed: int


# ---- code format -----------------------------------------------------------------------

def normalize_code(raw: object) -> str:
    """Trim, upper-case, drop dashes and spaces; reject anything outside the alphabet.

    Runs before any lookup. The ASCII check comes before upper(): str.upper() maps some
    non-ASCII letters onto ASCII ones ('ı' → 'I', 'ﬀ' → 'FF').
    """
    if not isinstance(raw, str) or len(raw) > RAW_MAX or not raw.isascii():
        raise InvalidCode()
    code = raw.strip().upper().replace("-", "").replace(" ", "")
    if len(code) != CODE_LEN or not _ALPHABET_SET.issuperset(code):
        raise InvalidCode()
    return code


def format_code(code: str) -> str:
    return "-".join(code[i:i + GROUP] for i in range(0, len(code), GROUP))


def generate_code() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(CODE_LEN))


def hash_code(code: str) -> str:
    # A fast hash suffices: 100 bits of randomness cannot be searched, even offline.
    return hashlib.sha256(code.encode("ascii")).hexdigest()


def check_note(note: object) -> str:
    if note is None:
        return ""
    if not isinstance(note, str) or len(note) > NOTE_MAX:
        raise VoucherError(f"The note must be at most {NOTE_MAX} characters.")
    if any(unicodedata.category(ch) in {"Cc", "Cf", "Co", "Cs"} for ch in note):
        raise VoucherError("The note must use printable characters only.")
    return note.strip()


def expiry_from_days(days: int | None) -> datetime | None:
    if days is None:
        return None
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_EXPIRY_DAYS:
        raise VoucherError(f"Expiry must be between 1 and {MAX_EXPIRY_DAYS} days.")
    return utcnow() + timedelta(days=days)


# ---- minting ---------------------------------------------------------------------------

def mint_batch(count: int, value_micros: int, *, expires_at: datetime | None = None,
               note: str = "", actor_id: int | None = None) -> tuple[VoucherBatch, list[str]]:
    """Create a batch and its codes; returns the clear codes, which are never stored."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_BATCH:
        raise VoucherError(f"Mint between 1 and {MAX_BATCH:,} codes at a time.")
    if isinstance(value_micros, bool) or not isinstance(value_micros, int) or value_micros <= 0:
        raise VoucherError("The face value must be above zero.")
    note = check_note(note)
    codes = set()
    while len(codes) < count:
        codes.add(generate_code())
    codes = sorted(codes)
    with write_tx():
        batch = VoucherBatch(note=note, face_value_micros=value_micros, count=count,
                             expires_at=expires_at, status="active", created_by=actor_id)
        db.session.add(batch)
        db.session.flush()
        db.session.execute(insert(Voucher), [
            {"batch_id": batch.id, "code_hash": hash_code(c), "last4": c[-4:],
             "value_micros": value_micros} for c in codes
        ])
        audit.record("voucher.mint", actor_id=actor_id, target_type="voucher_batch",
                     target_id=batch.id, after={"count": count, "value_micros": value_micros,
                                                "expires_at": expires_at.isoformat() if expires_at else None,
                                                "note": note})
    return batch, [format_code(c) for c in codes]


def codes_csv(codes: list[str], value_micros: int, expires_at: datetime | None) -> str:
    """The mint's CSV: a header `code,value,expires_at`, then one code per line."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    value = f"{money.to_decimal_credits(value_micros):f}"
    expiry = expires_at.isoformat(timespec="seconds") if expires_at else ""
    for code in codes:
        writer.writerow((code, value, expiry))
    return out.getvalue()


# ---- redemption ------------------------------------------------------------------------

def redeem(user_id: int, raw_code: object) -> Redemption:
    """Credit the voucher's value to user_id exactly once, or raise a VoucherError."""
    code = normalize_code(raw_code)
    code_hash = hash_code(code)
    with write_tx():
        now = utcnow()
        batch_usable = (
            select(VoucherBatch.id)
            .where(VoucherBatch.id == Voucher.batch_id, VoucherBatch.status == "active",
                   or_(VoucherBatch.expires_at.is_(None), VoucherBatch.expires_at > now))
            .exists()
        )
        # The claim and its guard are one statement; a concurrent claimer re-checks
        # `redeemed_at IS NULL` after the winner commits (PostgreSQL) or waits for the
        # write lock (SQLite BEGIN IMMEDIATE), and gets no row.
        claimed = db.session.execute(
            update(Voucher)
            .where(Voucher.code_hash == code_hash, Voucher.redeemed_at.is_(None), batch_usable)
            .values(redeemed_by=user_id, redeemed_at=now)
            .returning(Voucher.id, Voucher.value_micros)
        ).first()
        if claimed is None:
            raise _why_not(code_hash, now)
        voucher_id, value = claimed
        move = ledger.credit(user_id, value, kind="voucher_credit", ref_type="voucher",
                             ref_id=str(voucher_id))
    return Redemption(voucher_id, value, move.balance_micros)


def _why_not(code_hash: str, now: datetime) -> VoucherError:
    row = db.session.execute(
        select(Voucher.redeemed_at, VoucherBatch.status, VoucherBatch.expires_at)
        .join(VoucherBatch, VoucherBatch.id == Voucher.batch_id)
        .where(Voucher.code_hash == code_hash)
    ).first()
    if row is None:
        return UnknownCode()
    redeemed_at, status, expires_at = row
    if redeemed_at is not None:
        return AlreadyRedeemed()
    if status != "active":
        return DisabledCode()
    if expires_at is not None and expires_at <= now:
        return ExpiredCode(expires_at)
    return AlreadyRedeemed()  # claimed between our statement and this read


# ---- batches (admin) -------------------------------------------------------------------

def list_batches(limit: int = 200) -> list[BatchRow]:
    redeemed = (
        select(Voucher.batch_id, func.count(Voucher.redeemed_at).label("n"))
        .group_by(Voucher.batch_id).subquery()
    )
    rows = db.session.execute(
        select(VoucherBatch, func.coalesce(redeemed.c.n, 0))
        .outerjoin(redeemed, redeemed.c.batch_id == VoucherBatch.id)
        .order_by(VoucherBatch.id.desc()).limit(limit)
    ).all()
    return [BatchRow(b, int(n)) for b, n in rows]


def set_batch_status(batch_id: int, status: str, *, actor_id: int | None) -> VoucherBatch:
    """Disable (or re-enable) every unredeemed code of a batch; LookupError for an unknown id."""
    if status not in ("active", "disabled"):
        raise VoucherError("Unknown status.")
    with write_tx():
        batch = db.session.get(VoucherBatch, batch_id)
        if batch is None:
            raise LookupError(batch_id)
        before = batch.status
        db.session.execute(update(VoucherBatch).where(VoucherBatch.id == batch_id)
                           .values(status=status))
        audit.record("voucher.batch_status", actor_id=actor_id, target_type="voucher_batch",
                     target_id=batch_id, before={"status": before}, after={"status": status})
    db.session.refresh(batch)
    return batch
