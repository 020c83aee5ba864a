"""Settings from the environment. Nothing here talks to a service."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTANCE = Path(os.environ.get("INSTANCE_PATH", ROOT / "instance"))


def _secret_key() -> str:
    """SECRET_KEY from the environment; for development, one generated once under instance/."""
    key = os.environ.get("SECRET_KEY")
    if key:
        return key
    INSTANCE.mkdir(parents=True, exist_ok=True)
    path = INSTANCE / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def _bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def database_url() -> str:
    url = os.environ.get("DATABASE_URL") or f"sqlite:///{INSTANCE / 'console.db'}"
    # Heroku-style URLs name the old driver; we speak psycopg 3.
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


class Config:
    """Read once at app creation; tests pass overrides to create_app()."""

    def __init__(self) -> None:
        self.SECRET_KEY = _secret_key()
        self.SQLALCHEMY_DATABASE_URI = database_url()
        # No pool_pre_ping: it costs a round trip on every checkout, three per relay call;
        # database.py pings only connections that sat idle (PING_IDLE_S).
        self.SQLALCHEMY_ENGINE_OPTIONS = {}
        # Connections kept per worker process (see database.engine_options).
        self.DB_POOL_SIZE = int(os.environ.get("DB_POOL_SIZE", "20"))
        self.DB_MAX_OVERFLOW = int(os.environ.get("DB_MAX_OVERFLOW", "0"))
        self.REDIS_URL = os.environ.get("REDIS_URL") or None
        self.PORT = int(os.environ.get("PORT", "8000"))
        # Channel secrets are encrypted with a key derived from this (or SECRET_KEY).
        self.CHANNEL_KEY = os.environ.get("CHANNEL_KEY") or None

        secure = _bool("COOKIE_SECURE", False)
        self.SESSION_COOKIE_SECURE = secure
        # __Host- cookies need Secure, Path=/ and no Domain; only possible over HTTPS.
        self.SESSION_COOKIE_NAME = "__Host-session" if secure else "session"
        self.SESSION_COOKIE_HTTPONLY = True
        self.SESSION_COOKIE_SAMESITE = "Lax"
        self.PERMANENT_SESSION_LIFETIME = 12 * 3600
        self.REMEMBER_COOKIE_DURATION = 0  # remember-me is not offered
        self.PREFERRED_URL_SCHEME = "https" if secure else "http"

        # Console forms are small; the relay raises its own limit for LLM bodies.
        self.MAX_CONTENT_LENGTH = 16 * 1024 * 1024
        self.CONSOLE_MAX_BODY = 256 * 1024
        self.RELAY_MAX_BODY = 16 * 1024 * 1024

        self.WTF_CSRF_ENABLED = True
        # A boosted page keeps its <body hx-headers> token for as long as it is open.
        self.WTF_CSRF_TIME_LIMIT = None
        self.WTF_CSRF_SSL_STRICT = secure

        self.RATELIMIT_STORAGE_URI = self.REDIS_URL or "memory://"
        self.RATELIMIT_HEADERS_ENABLED = False
        self.RATELIMIT_KEY_PREFIX = os.environ.get("RATELIMIT_KEY_PREFIX", "relay-console")
        self.LOGIN_LIMITS = os.environ.get("LOGIN_LIMITS", "10 per 15 minutes")
        self.LOGIN_IP_LIMITS = os.environ.get("LOGIN_IP_LIMITS", "50 per 15 minutes")
        self.REDEEM_LIMITS = os.environ.get("REDEEM_LIMITS", "10 per 10 minutes")

        self.TRUST_PROXY = _bool("TRUST_PROXY", False)
        self.SQLITE_BUSY_TIMEOUT_MS = int(os.environ.get("SQLITE_BUSY_TIMEOUT_MS", "5000"))
        self.RELAY_TOTAL_DEADLINE_S = float(os.environ.get("RELAY_TOTAL_DEADLINE_S", "600"))
        self.RELAY_CONNECT_TIMEOUT_S = float(os.environ.get("RELAY_CONNECT_TIMEOUT_S", "5"))
        self.RELAY_IDLE_TIMEOUT_S = float(os.environ.get("RELAY_IDLE_TIMEOUT_S", "120"))
        self.RECONCILE_GRACE_S = float(os.environ.get("RECONCILE_GRACE_S", "60"))
        # Only for the demo and tests: lets a channel point at 127.0.0.1 over http.
        self.ALLOW_PRIVATE_UPSTREAMS = _bool("ALLOW_PRIVATE_UPSTREAMS", False)
