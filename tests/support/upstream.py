"""Relay test support: the fake upstream as a subprocess, and a seeded account with channels."""
from __future__ import annotations

import select
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import zstandard
from sqlalchemy import func
from sqlalchemy import select as sql_select

from console import accounts, channels, keys, ledger
from console.database import write_tx
from console.extensions import db
from console.models import Group, GroupModel, ModelPrice, RelayInflight, UsageRecord, Wallet
from console.money import parse_usd

ROOT = Path(__file__).resolve().parents[2]

# (name, provider, kind, input, output, cache write 5m, cache write 1h, cache read, max out, ctx)
MODELS = [
    ("gpt-4o-mini", "openai", "chat", "0.15", "0.60", None, None, "0.075", 1000, 128000),
    ("claude-haiku-4-5", "anthropic", "chat", "1.00", "5.00", "1.25", "2.00", "0.10", 1000, 200000),
    ("text-embedding-3-small", "openai", "embedding", "0.02", "0", None, None, None, 1, 8191),
    ("not-in-group", "openai", "chat", "1.00", "1.00", None, None, None, 1000, 128000),
]
WEB_SEARCH_USD = {"gpt-4o-mini": "0.01", "claude-haiku-4-5": "0.01"}  # $10 / 1k searches


@contextmanager
def fake_upstream(*, chunks: int = 5, delay_ms: int = 0):
    """Base URL (http://127.0.0.1:PORT) of a fake provider subprocess."""
    cmd = [sys.executable, "-m", "bench.fake_upstream", "--port", "0", "--host", "127.0.0.1",
           "--chunks", str(chunks), "--delay-ms", str(delay_ms)]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE) as proc:
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 15)
            line = proc.stdout.readline().decode() if ready else ""
            assert line.startswith("LISTENING "), f"fake upstream did not start: {line!r}"
            yield f"http://127.0.0.1:{int(line.split()[1])}"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


# One client for the fake's control endpoints: httpx.get() builds a client, and so a TLS
# context (~25 ms), per call. No kept connections, so none outlives its fake upstream.
CONTROL = httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0))


def zstd(data: bytes) -> bytes:
    """A zstd frame without the content size, as streaming encoders (Codex CLI's) write it."""
    enc = zstandard.ZstdCompressor(level=3).compressobj()
    return enc.compress(data) + enc.flush()


def fake_stats(base: str) -> dict:
    return CONTROL.get(f"{base}/_fake/stats").json()


def fake_reset(base: str) -> None:
    CONTROL.post(f"{base}/_fake/reset")


def fake_last(base: str) -> dict:
    return CONTROL.get(f"{base}/_fake/last_request").json()


@dataclass
class Account:
    user_id: int
    key: str
    key_id: int
    group_id: int


def seed_catalog(*, multiplier: str = "0.3", concurrency: int = 50, rpm: int = 100000) -> int:
    """Test models and a group serving all but `not-in-group`; returns the group id."""
    from console.money import parse_multiplier

    with write_tx():
        ids = {}
        for name, prov, kind, i, o, w5, w1, cr, mo, ctx in MODELS:
            m = ModelPrice(name=name, provider=prov, kind=kind, input_price=parse_usd(i),
                           output_price=parse_usd(o),
                           cache_write_5m_price=parse_usd(w5) if w5 else None,
                           cache_write_1h_price=parse_usd(w1) if w1 else None,
                           cache_read_price=parse_usd(cr) if cr else None,
                           web_search_price=parse_usd(WEB_SEARCH_USD[name]) if name in WEB_SEARCH_USD else None,
                           max_output_tokens=mo, context_window=ctx)
            db.session.add(m)
            db.session.flush()
            ids[name] = m.id
        g = Group(slug="test", name="Test", multiplier_ppm=parse_multiplier(multiplier),
                  concurrency_limit=concurrency, rpm_limit=rpm)
        db.session.add(g)
        db.session.flush()
        for name, mid in ids.items():
            if name != "not-in-group":
                db.session.add(GroupModel(group_id=g.id, model_id=mid))
        return g.id


def make_account(group_id: int, *, email: str = "caller@example.com", credits: int = 100) -> Account:
    user = accounts.create_user(email, "correct horse battery staple")
    if credits:
        ledger.credit(user.id, credits * 1_000_000, kind="voucher_credit", ref_type="test", ref_id="seed")
    key, secret = keys.create_key(user.id, "test key", group_id=group_id)
    return Account(user.id, secret, key.id, group_id)


def add_channels(base: str, *, openai_models: str = "gpt-4o-mini=fake-model,text-embedding-3-small=fake-embedding-model",
                 anthropic_models: str = "claude-haiku-4-5=fake-model", secret: str = "sk-upstream-secret-0001",
                 prefix: str = "") -> None:
    channels.create_channel(name=f"{prefix}openai", type="openai", base_url=f"{base}/v1", api_key=secret,
                            models=openai_models)
    channels.create_channel(name=f"{prefix}anthropic", type="anthropic", base_url=base, api_key=secret,
                            models=anthropic_models)


def setup_relay(base: str, **group) -> Account:
    gid = seed_catalog(**group)
    acct = make_account(gid)
    add_channels(base)
    db.session.remove()
    return acct


def records() -> list[UsageRecord]:
    db.session.rollback()  # a fresh read: not the snapshot of a read transaction left open
    return list(db.session.scalars(sql_select(UsageRecord).order_by(UsageRecord.id)))


def wallet(user_id: int) -> Wallet:
    db.session.rollback()
    return db.session.scalar(sql_select(Wallet).where(Wallet.user_id == user_id))


def assert_consistent(user_id: int) -> None:
    """Ledger sum = balance, no hold left, no pending record, no call counted in flight."""
    assert ledger.verify() == []
    w = wallet(user_id)
    assert w.held_micros == 0
    assert [r.request_id for r in records() if r.status == "pending"] == []
    assert db.session.scalar(sql_select(func.count()).select_from(RelayInflight)) == 0
