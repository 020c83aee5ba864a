"""Accounts: registration, password hashing (argon2id), authentication, session revocation."""
from __future__ import annotations

import functools
import secrets
import unicodedata

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import select

from console import audit, ledger
from console.database import write_tx
from console.extensions import db
from console.models import User, utcnow

PASSWORD_MIN = 12
PASSWORD_MAX = 128

_hasher = PasswordHasher()  # argon2id, t=3, m=64 MiB, p=4: above the OWASP minimum


@functools.cache
def _dummy_hash() -> str:
    """Verified against for unknown e-mails, so they cost the same time as a wrong password.
    Made at the first login of the process, not at import: every CLI command and worker
    would pay its ~120 ms at start-up."""
    return _hasher.hash(secrets.token_urlsafe(16))


class AccountError(ValueError):
    """A message safe to show the user."""


def normalize_email(raw: str) -> str:
    if not isinstance(raw, str) or len(raw) > 254:
        raise AccountError("Enter a valid e-mail address.")
    try:
        info = validate_email(raw.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        raise AccountError("Enter a valid e-mail address.") from exc
    return info.normalized.lower()


def check_password_policy(password: str) -> None:
    if not isinstance(password, str) or not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise AccountError(f"Use a password of {PASSWORD_MIN} to {PASSWORD_MAX} characters.")
    if any(unicodedata.category(ch) == "Cc" for ch in password):
        raise AccountError("The password contains control characters.")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def new_session_token() -> str:
    return secrets.token_urlsafe(24)


def create_user(email: str, password: str, role: str = "user", *, ip: str | None = None,
                actor_id: int | None = None) -> User:
    """Create a user and an empty wallet in one transaction."""
    email = normalize_email(email)
    check_password_policy(password)
    if role not in ("user", "support", "admin"):
        raise AccountError("Unknown role.")
    pw_hash = hash_password(password)  # slow; done before the write lock is taken
    with write_tx():
        if db.session.scalar(select(User.id).where(User.email == email)) is not None:
            raise AccountError("An account with this e-mail already exists.")
        user = User(email=email, password_hash=pw_hash, role=role, status="active",
                    session_token=new_session_token())
        db.session.add(user)
        db.session.flush()
        ledger.create_wallet(user.id)
        audit.record("user.create", actor_id=actor_id or user.id, target_type="user",
                     target_id=user.id, after={"email": email, "role": role}, ip=ip)
    return user


def authenticate(email: str, password: str, *, ip: str | None = None) -> User | None:
    """The user for these credentials, or None; unknown e-mail and wrong password look alike."""
    try:
        email = normalize_email(email)
    except AccountError:
        email = None
    dummy = _dummy_hash()  # before the lookup: the first login costs the same either way
    user = db.session.scalar(select(User).where(User.email == email)) if email else None
    if not isinstance(password, str) or len(password) > PASSWORD_MAX:
        password = ""
    try:
        _hasher.verify(user.password_hash if user else dummy, password)
        ok = user is not None and user.is_active
    except (VerificationError, InvalidHashError):
        ok = False
    with write_tx():
        if ok and _hasher.check_needs_rehash(user.password_hash):
            user.password_hash = _hasher.hash(password)
        if ok:
            user.last_login_at = utcnow()
        audit.record("auth.login" if ok else "auth.login_failed",
                     actor_id=user.id if user else None, target_type="user",
                     target_id=user.id if user else None, ip=ip)
    return user if ok else None


def load_user(login_id: str) -> User | None:
    """Flask-Login loader: the id carries the session token, so a rotated token logs out."""
    uid, _, token = (login_id or "").partition(":")
    if not uid.isdigit() or not token:
        return None
    user = db.session.get(User, int(uid))
    if user is None or not user.is_active:
        return None
    if not secrets.compare_digest(user.session_token.encode(), token.encode()):
        return None
    return user


def rotate_session(user_id: int, *, reason: str, ip: str | None = None) -> None:
    """Invalidate every session cookie of this user (logout, password change)."""
    with write_tx():
        user = db.session.get(User, user_id)
        user.session_token = new_session_token()
        audit.record(reason, actor_id=user_id, target_type="user", target_id=user_id, ip=ip)


def change_password(user_id: int, current: str, new: str, *, ip: str | None = None) -> None:
    user = db.session.get(User, user_id)
    try:
        _hasher.verify(user.password_hash, current if isinstance(current, str) else "")
    except (VerificationError, InvalidHashError) as exc:
        raise AccountError("The current password is wrong.") from exc
    check_password_policy(new)
    pw_hash = hash_password(new)
    with write_tx():
        user = db.session.get(User, user_id)
        user.password_hash = pw_hash
        user.session_token = new_session_token()
        audit.record("auth.password_changed", actor_id=user_id, target_type="user",
                     target_id=user_id, ip=ip)
