"""The relay in process (Flask test client) against the real fake upstream on 127.0.0.1:
protocols, usage, errors, header hygiene, billing policy rows, retries, failover, reconcile."""
from __future__ import annotations

import gzip
import json
import logging
import math
import sqlite3
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select, update

from bench.fake_upstream import HUGE_EVENT
from console import channels, keys, ledger
from console.database import write_tx
from console.extensions import db
from console.models import ApiKey, Channel, ModelPrice, UsageRecord, User, utcnow
from console.pricing import Prices, Tokens, quote
from console.relay import proxy
from console.relay.metering import estimate, reconcile
from console.relay.upstream import close_client
from tests.conftest import make_app
from tests.support.server import free_port
from tests.support.upstream import (
    add_channels,
    assert_consistent,
    fake_last,
    fake_reset,
    fake_stats,
    fake_upstream,
    make_account,
    records,
    seed_catalog,
    wallet,
    zstd,
)

HI = [{"role": "user", "content": "hi"}]
HELLO = json.dumps({"model": "gpt-4o-mini", "messages": HI}).encode()


@pytest.fixture(scope="module")
def upstream():
    with fake_upstream(chunks=5) as base:
        yield base


@pytest.fixture
def relay(db_url, upstream):
    """(app, test client, account) with channels to the fake upstream."""
    fake_reset(upstream)
    app = make_app(db_url, ALLOW_PRIVATE_UPSTREAMS=True, RELAY_TOTAL_DEADLINE_S=3.0,
                   RELAY_IDLE_TIMEOUT_S=1.5, RELAY_RETRY_BASE_S=0.01, RECONCILE_GRACE_S=0.0,
                   RELAY_CHECKPOINT_S=0.05)
    with app.app_context():
        db.create_all()
        gid = seed_catalog()
        acct = make_account(gid)
        add_channels(upstream)
        db.session.remove()
        yield app, app.test_client(), acct
        close_client(app)
        db.session.remove()
        db.engine.dispose()


def bearer(acct):
    return {"Authorization": f"Bearer {acct.key}"}


def scenario(upstream: str, knobs: str, **kw) -> None:
    """Replace the channels by ones whose upstream model name carries a fake scenario."""
    with write_tx():
        db.session.execute(update(Channel).values(status="disabled"))
    n = len(db.session.scalars(select(Channel)).all())
    add_channels(upstream, openai_models=(f"gpt-4o-mini=fake-model@{knobs},"
                                          f"text-embedding-3-small=fake-embedding-model@{knobs}"),
                 anthropic_models=f"claude-haiku-4-5=fake-model@{knobs}", prefix=f"s{n}-", **kw)
    db.session.remove()


def sse_events(data: bytes) -> list[dict]:
    out = []
    for block in data.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                try:
                    out.append(json.loads(line[6:]))
                except ValueError:
                    out.append({"_malformed": line})
    return out


def stream_chat(client, acct):
    return client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI, "stream": True},
                       headers=bearer(acct))


def delta_texts(events: list[dict]) -> list[str]:
    """The non-empty content deltas of chat completion chunks."""
    contents = [e["choices"][0]["delta"].get("content") for e in events if e.get("choices")]
    return [c for c in contents if c]


def only_record() -> UsageRecord:
    recs = records()
    assert len(recs) == 1, [(r.request_id, r.status) for r in recs]
    return recs[0]


def recomputed(rec: UsageRecord) -> int:
    return quote(Tokens.of_record(rec), Prices.of_record(rec), rec.multiplier_ppm).charge_micros


def test_chat_non_stream_bills_upstream_usage(relay):
    """A chat call is passed through unchanged and billed exactly the upstream's usage."""
    _app, client, acct = relay
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers=bearer(acct))
    assert r.status_code == 200
    body = r.get_json()
    assert body["choices"][0]["message"]["content"] == "chunk 0 chunk 1 chunk 2 chunk 3 chunk 4"
    rec = only_record()
    assert rec.request_id == r.headers["x-request-id"]
    assert (rec.status, rec.usage_source) == ("ok", "upstream")
    assert rec.input_tokens + rec.cache_read_tokens == body["usage"]["prompt_tokens"]
    assert rec.output_tokens == body["usage"]["completion_tokens"] == 5
    assert rec.charge_micros == recomputed(rec) > 0
    assert wallet(acct.user_id).balance_micros == 100_000_000 - rec.charge_micros
    assert db.session.scalar(select(ApiKey.spent_micros).where(ApiKey.id == acct.key_id)) == rec.charge_micros
    assert_consistent(acct.user_id)



@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_settle_runs_when_the_server_closes_the_response(relay, stream):
    """The whole body (or the whole stream) is handed to the server first; the call is settled in
    the response's close(), which a WSGI server calls after writing the last byte."""
    _app, client, acct = relay
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI, "stream": stream},
                    headers=bearer(acct), buffered=False)
    body = b"".join(r.response)
    assert (b"data: [DONE]" in body) if stream else (b"chunk 4" in body)
    assert [x.status for x in records()] == ["pending"]
    r.close()
    assert [(x.status, x.usage_source) for x in records()] == [("ok", "upstream")]
    r.close()  # closing again settles nothing twice
    assert only_record().charge_micros == recomputed(only_record()) > 0
    assert_consistent(acct.user_id)


def test_a_locked_database_skips_checkpoints_but_never_cuts_the_stream(upstream, tmp_path, caplog):
    """A stream's progress checkpoint that cannot get the SQLite write lock is skipped (logged);
    the stream goes on to its end and is billed when the lock is free again."""
    path = tmp_path / "locked.db"
    app = make_app(f"sqlite:///{path}", ALLOW_PRIVATE_UPSTREAMS=True, RELAY_CHECKPOINT_S=0.01,
                   SQLITE_BUSY_TIMEOUT_MS=50)
    with app.app_context():
        db.create_all()
        acct = make_account(seed_catalog())
        add_channels(upstream, openai_models="gpt-4o-mini=fake-model@delay_ms=30")
        db.session.remove()
        r = app.test_client().post("/v1/chat/completions", headers=bearer(acct), buffered=False,
                                   json={"model": "gpt-4o-mini", "messages": HI, "stream": True})
        lock = sqlite3.connect(path, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            with caplog.at_level(logging.WARNING):
                body = b"".join(r.response)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        r.close()
        assert body.rstrip().endswith(b"data: [DONE]")
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(body) if e.get("choices"))
        assert text == "chunk 0 chunk 1 chunk 2 chunk 3 chunk 4"
        assert any("checkpoint skipped" in m for m in caplog.messages)
        rec = only_record()
        assert (rec.status, rec.usage_source) == ("ok", "upstream")
        assert_consistent(acct.user_id)
        close_client(app)
        db.session.remove()
        db.engine.dispose()

def test_stream_injects_usage_and_strips_the_extra_chunk(relay, upstream):
    """The relay asks upstream for usage but a client that did not ask never sees the usage chunk."""
    _app, client, acct = relay
    r = stream_chat(client, acct)
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = sse_events(r.data)
    assert all(e.get("choices") for e in events), "usage chunk leaked to a client that did not ask"
    assert r.data.endswith(b"data: [DONE]\n\n")
    assert fake_last(upstream)["body"]["stream_options"] == {"include_usage": True}
    rec = only_record()
    assert (rec.status, rec.usage_source, rec.output_tokens, rec.stream) == ("ok", "upstream", 5, True)
    assert rec.charge_micros == recomputed(rec)
    assert_consistent(acct.user_id)


def test_stream_keeps_usage_chunk_when_asked(relay):
    """A client that asked for include_usage gets the usage chunk unchanged."""
    _app, client, acct = relay
    r = client.post("/v1/chat/completions", headers=bearer(acct), json={
        "model": "gpt-4o-mini", "messages": HI, "stream": True, "stream_options": {"include_usage": True}})
    usage = [e for e in sse_events(r.data) if e.get("usage")]
    assert len(usage) == 1 and usage[0]["choices"] == []
    assert only_record().output_tokens == usage[0]["usage"]["completion_tokens"]


def test_anthropic_stream_bills_cache_write_then_cache_read(relay, upstream):
    """Messages usage incl. cache creation and cache read tokens comes from message_start/delta."""
    _app, client, acct = relay
    system = [{"type": "text", "text": "You are terse. " * 40, "cache_control": {"type": "ephemeral"}}]
    req = {"model": "claude-haiku-4-5", "max_tokens": 100, "system": system, "messages": HI, "stream": True}
    headers = {"x-api-key": acct.key, "anthropic-version": "2023-06-01", "anthropic-beta": "prompt-caching-2024-07-31"}
    first = client.post("/v1/messages", json=req, headers=headers)
    second = client.post("/v1/messages", json=req, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.data.endswith(b"message_stop\"}\n\n") and second.data
    assert fake_last(upstream)["headers"]["anthropic-beta"] == "prompt-caching-2024-07-31"
    a, b = records()
    assert a.cache_write_5m_tokens > 0 and a.cache_read_tokens == 0
    assert b.cache_read_tokens == a.cache_write_5m_tokens and b.cache_write_5m_tokens == 0
    assert a.output_tokens == b.output_tokens == 5
    assert a.charge_micros == recomputed(a) and b.charge_micros == recomputed(b) < a.charge_micros
    assert_consistent(acct.user_id)


def test_responses_and_embeddings_are_billed(relay):
    """Responses (stream) and embeddings read their own usage shapes."""
    _app, client, acct = relay
    r = client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hello", "stream": True},
                    headers=bearer(acct))
    assert r.status_code == 200 and b"response.completed" in r.data
    e = client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "hello"},
                    headers=bearer(acct))
    assert e.status_code == 200 and e.get_json()["data"]
    resp_rec, emb_rec = records()
    assert (resp_rec.endpoint, resp_rec.output_tokens, resp_rec.usage_source) == ("responses", 5, "upstream")
    assert (emb_rec.endpoint, emb_rec.output_tokens) == ("embeddings", 0)
    assert emb_rec.input_tokens == e.get_json()["usage"]["prompt_tokens"]
    assert_consistent(acct.user_id)


def test_a_responses_compaction_is_billed_from_its_usage(relay, upstream):
    """POST /v1/responses/compact (Codex CLI's remote compaction): passed through unchanged and
    billed from the Responses usage of its reply, never as a stream; a reply without usage is
    billed as estimated, its output from the compaction item's (encrypted) summary."""
    _app, client, acct = relay
    body = {"model": "gpt-4o-mini", "input": [{"role": "user", "content": "hello"}], "instructions": "x"}
    r = client.post("/v1/responses/compact", json=body, headers=bearer(acct))
    assert r.status_code == 200, r.data[:300]
    got = r.get_json()
    assert got["object"] == "response.compaction" and [o["type"] for o in got["output"]] == ["message", "compaction"]
    assert fake_last(upstream)["path"] == "/v1/responses/compact"
    scenario(upstream, "no_usage=1")
    assert client.post("/v1/responses/compact", json=body, headers=bearer(acct)).status_code == 200
    exact, estimated = records()
    assert (exact.endpoint, exact.stream, exact.status, exact.usage_source) == (
        "responses_compact", False, "ok", "upstream")
    assert (exact.input_tokens, exact.output_tokens) == (got["usage"]["input_tokens"], got["usage"]["output_tokens"])
    assert (estimated.usage_source, estimated.input_tokens > 0) == ("estimated", True)
    assert estimated.output_tokens == math.ceil(len(got["output"][-1]["encrypted_content"]) / 4)
    for rec in (exact, estimated):
        assert rec.charge_micros == recomputed(rec) > 0
    assert_consistent(acct.user_id)


def test_a_compaction_refuses_a_tier_its_reply_would_not_report(relay, upstream):
    """A compaction's reply does not say which processing tier served it: service_tier priority
    or flex is refused there even for a model that prices them (a Responses call passes), as
    are the unbilled hosted tools; an unknown model is 404."""
    _app, client, acct = relay
    fake_reset(upstream)
    processing_tiers("gpt-4o-mini", priority=2_000_000, flex=500_000)
    body = {"model": "gpt-4o-mini", "input": "hello"}
    for extra in ({"service_tier": "priority"}, {"service_tier": "flex"}, {"tools": [{"type": "image_generation"}]}):
        r = client.post("/v1/responses/compact", json={**body, **extra}, headers=bearer(acct))
        assert r.status_code == 400 and r.get_json()["error"]["code"] == "unsupported_parameter", extra
    r = client.post("/v1/responses/compact", json={**body, "model": "nope"}, headers=bearer(acct))
    assert r.status_code == 404
    assert fake_stats(upstream)["requests"] == 0 and records() == []
    assert client.post("/v1/responses", json={**body, "service_tier": "priority"}, headers=bearer(acct)).status_code == 200
    assert client.post("/v1/responses/compact", json={**body, "service_tier": "default"},
                       headers=bearer(acct)).status_code == 200
    assert_consistent(acct.user_id)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_server_side_compaction_is_billed_with_the_call(relay, upstream, stream):
    """Anthropic reports a compaction pass only in usage.iterations, outside the top-level
    fields: its 2,000 input and 200 output tokens are billed on top of the answer's, and a
    request allowing compaction holds for the extra pass."""
    _app, client, acct = relay
    headers = {"x-api-key": acct.key, "anthropic-version": "2023-06-01", "anthropic-beta": "compact-2026-01-12"}
    body = {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": HI, "stream": stream}
    compact = {"context_management": {"edits": [{"type": "compact_20260112"}]}}
    assert client.post("/v1/messages", json=body, headers=headers).status_code == 200
    scenario(upstream, "compaction_tokens=2000")
    r = client.post("/v1/messages", json={**body, **compact}, headers=headers)
    assert r.status_code == 200 and b'"compaction"' in r.data
    plain, compacted = records()
    assert (compacted.input_tokens, compacted.output_tokens) == (plain.input_tokens + 2000, plain.output_tokens + 200)
    assert compacted.usage_source == "upstream" and compacted.charge_micros == recomputed(compacted)
    assert compacted.hold_micros > plain.hold_micros + 1000 * 5 * 3 // 10  # + a 1,000-token output cap at $5/M × 0.3
    assert_consistent(acct.user_id)


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4-6"}]},
    {"fallbacks": "default"},
    {"fallbacks": [{"model": "claude-sonnet-4-5"}]},
], ids=["advisor", "default-fallbacks", "fallback-list"])
def test_messages_served_by_another_model_are_refused(relay, upstream, extra):
    """The advisor tool's sub-inference and a server-side fallback are other models' tokens,
    at their prices: 400 before admission, nothing sent or held; an empty fallbacks list passes."""
    _app, client, acct = relay
    fake_reset(upstream)
    headers = {"x-api-key": acct.key, "anthropic-version": "2023-06-01"}
    body = {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": HI}
    r = client.post("/v1/messages", json={**body, **extra}, headers=headers)
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "invalid_request_error"
    assert fake_stats(upstream)["requests"] == 0 and records() == []
    assert wallet(acct.user_id).balance_micros == 100_000_000
    assert client.post("/v1/messages", json={**body, "fallbacks": []}, headers=headers).status_code == 200


def test_relay_ignores_console_cookies(relay):
    """/v1 gets no cookie session: a console cookie sent along is not decoded, nothing is set,
    and the answer does not vary on it."""
    _app, client, acct = relay
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI},
                    headers={**bearer(acct), "Cookie": "session=not-a-valid-signed-cookie"})
    assert r.status_code == 200
    assert "Set-Cookie" not in r.headers and "cookie" not in r.headers.get("Vary", "").lower()


def test_client_credentials_never_reach_the_upstream(relay, upstream):
    """Only the channel key and allowlisted headers go upstream; no cookie, X-Forwarded-*, scenario header."""
    _app, client, acct = relay
    client.set_cookie("session", "console-session-cookie")
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers={
        **bearer(acct), "X-Forwarded-For": "10.0.0.1", "x-fake-scenario": "status=500",
        "OpenAI-Organization": "org-x", "User-Agent": "sdk/1.0"})
    assert r.status_code == 200
    seen = fake_last(upstream)
    assert seen["credential"] == "sk-upstream-secret-0001" and seen["credential_header"] == "authorization"
    for header in ("cookie", "x-forwarded-for", "x-fake-scenario", "openai-organization", "x-api-key"):
        assert header not in seen["headers"]
    assert acct.key not in json.dumps(seen)
    assert seen["headers"]["user-agent"] == "sdk/1.0"


def test_upstream_cookies_are_never_kept_or_sent_back(db_url, upstream):
    """A provider behind a CDN sets cookies on its replies. The relay's pooled clients serve every
    user's calls, so a cookie one call received must not ride along with the next ones."""
    from console.relay.upstream import POOL_SHARDS

    fake_reset(upstream)
    app = make_app(db_url, ALLOW_PRIVATE_UPSTREAMS=True)
    with app.app_context():
        db.create_all()
        acct = make_account(seed_catalog())
        add_channels(upstream, openai_models="gpt-4o-mini=fake-model@set_cookie=1")
        db.session.remove()
        client, sent = app.test_client(), []
        try:
            for _ in range(2 * POOL_SHARDS + 1):  # every pooled client, each more than once
                r = client.post("/v1/chat/completions", headers=bearer(acct),
                                json={"model": "gpt-4o-mini", "messages": HI})
                assert r.status_code == 200
                assert "Set-Cookie" not in r.headers  # nor passed on to the client
                sent.append(fake_last(upstream)["headers"].get("cookie"))
        finally:
            close_client(app)
            db.session.remove()
            db.engine.dispose()
        assert sent == [None] * len(sent)


def _pools(app):
    return app.extensions["relay_http"][1].in_flight()


def test_calls_reuse_a_warm_upstream_connection_and_spread_over_pools_when_busy(relay, upstream):
    """One after another, calls take the same pool and its kept-alive connection (no new TCP or
    TLS handshake per call); calls in flight together go to the pools with the fewest, so no
    pool grows large. A pool counts a call until its response is closed, failed attempts too."""
    app, client, acct = relay
    body = {"model": "gpt-4o-mini", "messages": HI}
    ports = []
    for _ in range(4):
        assert client.post("/v1/chat/completions", headers=bearer(acct), json=body).status_code == 200
        ports.append(fake_last(upstream)["client_port"])
    assert len(set(ports)) == 1 and ports[0] > 0
    assert set(_pools(app)) == {0}

    open_streams = []
    for _ in range(3):
        r = client.post("/v1/chat/completions", headers=bearer(acct), buffered=False,
                        json={**body, "stream": True})
        assert r.status_code == 200
        open_streams.append(r)
        ports.append(fake_last(upstream)["client_port"])
    assert _pools(app)[:4] == [1, 1, 1, 0] and sum(_pools(app)) == 3
    assert len(set(ports[-3:])) == 3  # three connections at once
    for r in open_streams:
        b"".join(r.response)
        r.close()
    assert set(_pools(app)) == {0}

    scenario(upstream, "status=500")  # every attempt fails: each response is closed
    assert client.post("/v1/chat/completions", headers=bearer(acct), json=body).status_code == 502
    assert set(_pools(app)) == {0}


def test_auth_and_model_errors_use_each_api_shape(relay):
    """401 unknown/absent/disabled key, 404 unknown model, 403 model outside the group; no record."""
    _app, client, acct = relay
    body = {"model": "gpt-4o-mini", "messages": HI}
    assert client.post("/v1/chat/completions", json=body).status_code == 401
    r = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-" + "x" * 43})
    assert r.status_code == 401 and r.get_json()["error"]["type"] == "authentication_error"
    assert "sk-xxxx" not in r.get_data(as_text=True)
    r = client.post("/v1/messages", json={**body, "max_tokens": 5}, headers={"x-api-key": "nope"})
    assert r.status_code == 401 and r.get_json()["type"] == "error"
    r = client.post("/v1/chat/completions", json={**body, "model": "no-such"}, headers=bearer(acct))
    assert r.status_code == 404 and r.headers["x-request-id"].startswith("req_")
    r = client.post("/v1/chat/completions", json={**body, "model": "not-in-group"}, headers=bearer(acct))
    assert r.status_code == 403
    with write_tx():
        db.session.execute(update(ApiKey).values(status="disabled"))
    assert client.post("/v1/chat/completions", json=body, headers=bearer(acct)).status_code == 401
    assert records() == []


@pytest.mark.parametrize("kwargs, status", [
    ({"data": "{}", "content_type": "text/plain"}, 415),
    ({"data": "{not json", "content_type": "application/json"}, 400),
    ({"data": '{"model": "gpt-4o-mini", "temperature": NaN}', "content_type": "application/json"}, 400),
    ({"data": "[1, 2]", "content_type": "application/json"}, 400),
    ({"data": "[" * 100000, "content_type": "application/json"}, 400),
    ({"data": '{"model": "m", "x": ' + "[" * 129 + "]" * 129 + "}", "content_type": "application/json"}, 400),
    # Deep enough to fail a recursive re-encode, yet within what json.loads accepts.
    ({"data": '{"model": "gpt-4o-mini", "x": ' + "[" * 900 + "]" * 900 + "}", "content_type": "application/json"}, 400),
    # Under an image part, whose children the size estimate does not read.
    ({"data": '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [{"type": "image_url", '
              '"image_url": ' + "[" * 200 + "]" * 200 + "}]}]}", "content_type": "application/json"}, 400),
    # Valid JSON whose values cannot be passed on: a lone surrogate is not Unicode (escaped, or
    # as raw bytes), and a number too large for a double is not a number any upstream reads.
    ({"data": '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
      "content_type": "application/json"}, 400),
    ({"data": b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a\xed\xa0\x80b"}]}',
      "content_type": "application/json"}, 400),
    ({"data": '{"model": "gpt-4o-mini", "metadata": {"\\udc00": 1}}', "content_type": "application/json"}, 400),
    ({"data": '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [{"type": "image_url", '
              '"image_url": {"url": "\\ud83d"}}]}]}', "content_type": "application/json"}, 400),
    ({"data": '{"model": "gpt-4o-mini", "temperature": 1e999}', "content_type": "application/json"}, 400),
    ({"data": '{"model": "gpt-4o-mini", "temperature": -2E+400}', "content_type": "application/json"}, 400),
    ({"json": {"model": 7}}, 400),
    ({"json": {"model": "gpt-4o-mini", "stream": "yes"}}, 400),
    ({"json": {"model": "gpt-4o-mini", "max_tokens": -1}}, 400),
    ({"json": {"model": "gpt-4o-mini", "max_tokens": True}}, 400),
    ({"data": b'{"model": "' + b"a" * (17 * 1024 * 1024) + b'"}', "content_type": "application/json"}, 413),
    # Compressed bodies: a coding not accepted, bytes that are not what they claim, a small
    # body that decodes beyond the limit (16 MiB), more codings than accepted.
    ({"data": b"{}", "content_type": "application/json", "headers": {"Content-Encoding": "br"}}, 415),
    ({"data": b"{}", "content_type": "application/json", "headers": {"Content-Encoding": "gzip, gzip, gzip"}}, 415),
    ({"data": gzip.compress(HELLO)[:-9], "content_type": "application/json",
      "headers": {"Content-Encoding": "gzip"}}, 400),
    ({"data": HELLO, "content_type": "application/json", "headers": {"Content-Encoding": "zstd"}}, 400),
    ({"data": zstd(b'{"model": "gpt-4o-mini", "x": "' + b"0" * (17 * 1024 * 1024) + b'"}'),
      "content_type": "application/json", "headers": {"Content-Encoding": "zstd"}}, 413),
    ({"data": gzip.compress(b" " * (17 * 1024 * 1024) + HELLO), "content_type": "application/json",
      "headers": {"Content-Encoding": "gzip"}}, 413),
])
def test_bad_input_is_a_clear_4xx_and_changes_nothing(relay, kwargs, status):
    """Malformed, mistyped or oversize bodies get 400/413/415, never 500, and bill nothing."""
    _app, client, acct = relay
    kwargs = dict(kwargs)  # the parameters are shared by both databases' runs
    r = client.post("/v1/chat/completions", headers={**bearer(acct), **kwargs.pop("headers", {})}, **kwargs)
    assert r.status_code == status, r.data[:200]
    assert records() == [] and wallet(acct.user_id).balance_micros == 100_000_000


@pytest.mark.parametrize("coding, encode", [
    ("zstd", zstd),  # as Codex CLI sends its Responses requests
    ("gzip", gzip.compress),
    ("x-gzip", lambda b: gzip.compress(b[:20]) + gzip.compress(b[20:])),  # two members
    ("deflate", zlib.compress),
    ("deflate", lambda b: zlib.compress(b, wbits=-15)),  # a bare deflate stream
    ("gzip, zstd", lambda b: zstd(gzip.compress(b))),
    ("identity", lambda b: b),
])
def test_a_compressed_body_is_decoded_and_passed_on_plain(relay, upstream, coding, encode):
    """The upstream receives the same JSON uncompressed, without the client's Content-Encoding,
    and the call is billed as the same call sent plain."""
    _app, client, acct = relay
    body = {"model": "gpt-4o-mini", "input": "hi \u00e9", "stream": True}
    r = client.post("/v1/responses", data=encode(json.dumps(body).encode()), content_type="application/json",
                    headers={**bearer(acct), "Content-Encoding": coding})
    assert r.status_code == 200, r.data[:200]
    assert b"response.completed" in r.data
    sent = fake_last(upstream)
    assert sent["body"]["input"] == body["input"] and sent["body"]["stream"] is True
    assert "content-encoding" not in sent["headers"]
    (rec,) = records()
    assert rec.status == "ok" and rec.usage_source == "upstream" and rec.charge_micros > 0


def test_browser_apps_may_call_the_relay_from_any_origin_but_not_the_console(relay):
    """CORS on /v1 only, without credentials: a preflight is answered without a key and bills
    nothing; a cross-origin call (error or not) may be read with its x-request-id; a call with
    no Origin gets no CORS header; console pages never allow another origin."""
    _app, client, acct = relay
    origin = {"Origin": "https://chat.example"}
    pre = client.options("/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert pre.status_code == 200 and pre.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert pre.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-stainless-os"
    assert "Access-Control-Allow-Credentials" not in pre.headers
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI},
                    headers={**bearer(acct), **origin})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
    assert "x-request-id" in r.headers["Access-Control-Expose-Headers"]
    bad = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI},
                      headers={"Authorization": "Bearer sk-nope", **origin})
    assert bad.status_code == 401 and bad.headers["Access-Control-Allow-Origin"] == "*"
    plain = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers=bearer(acct))
    assert not [h for h in plain.headers.keys() if h.startswith("Access-Control-")]
    for page in (client.get("/login", headers=origin),
                 client.options("/login", headers={**origin, "Access-Control-Request-Method": "POST"})):
        assert not [h for h in page.headers.keys() if h.startswith("Access-Control-")]
    assert len(records()) == 2  # the two calls made with the key; the preflight is no call


def test_a_background_response_is_refused_because_it_could_not_be_billed(relay, upstream):
    """background=true makes the upstream answer "queued" and generate afterwards, unseen by
    the relay: 400 before admission, nothing sent upstream, nothing held or billed."""
    _app, client, acct = relay
    fake_reset(upstream)
    for stream in (False, True):
        r = client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi", "background": True,
                                               "stream": stream}, headers=bearer(acct))
        assert r.status_code == 400 and r.get_json()["error"]["code"] == "unsupported_parameter"
    assert fake_stats(upstream)["requests"] == 0
    assert records() == [] and wallet(acct.user_id).balance_micros == 100_000_000
    r = client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi", "background": False},
                    headers=bearer(acct))
    assert r.status_code == 200 and only_record().status == "ok"


@pytest.mark.parametrize("tool", ["image_generation", "code_interpreter", "file_search"])
def test_a_hosted_tool_whose_fee_is_not_billed_is_refused(relay, upstream, tool):
    """An image, a container or a file search costs a fee per use upstream that the relay does
    not bill: a request offering the tool gets 400 before admission, nothing sent or held;
    function tools and the (billed) web search pass."""
    _app, client, acct = relay
    fake_reset(upstream)
    function = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    for path, body in (("/v1/responses", {"model": "gpt-4o-mini", "input": "hi"}),
                       ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": HI})):
        for stream in (False, True):
            r = client.post(path, json={**body, "stream": stream, "tools": [function, {"type": tool}]},
                            headers=bearer(acct))
            assert r.status_code == 400 and r.get_json()["error"]["code"] == "unsupported_parameter"
            assert f"'{tool}'" in r.get_json()["error"]["message"]
    assert fake_stats(upstream)["requests"] == 0
    assert records() == [] and wallet(acct.user_id).balance_micros == 100_000_000
    for tools in ([function, {"type": "web_search"}], [{"type": "function", "name": tool}], "junk", [tool]):
        r = client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi", "tools": tools},
                        headers=bearer(acct))
        assert r.status_code == 200, tools
    assert_consistent(acct.user_id)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": HI}),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi"}),
], ids=["chat", "responses"])
def test_a_processing_tier_the_catalog_does_not_price_is_refused(relay, upstream, path, body):
    """service_tier priority (up to 2x the standard prices upstream), flex (half) or scale would
    be billed at the catalog's standard prices: 400 before admission, nothing sent or held;
    auto, default or none pass."""
    _app, client, acct = relay
    fake_reset(upstream)
    for tier in ("priority", "flex", "scale", "PRIORITY", 7, ["auto"]):
        r = client.post(path, json={**body, "service_tier": tier}, headers=bearer(acct))
        assert r.status_code == 400 and r.get_json()["error"]["code"] == "unsupported_parameter", tier
        assert "service_tier" in r.get_json()["error"]["message"]
    assert fake_stats(upstream)["requests"] == 0
    assert records() == [] and wallet(acct.user_id).balance_micros == 100_000_000
    for tier in ("auto", "default", None):
        r = client.post(path, json={**body, "service_tier": tier}, headers=bearer(acct))
        assert r.status_code == 200, tier
    assert [rec.status for rec in records()] == ["ok"] * 3
    assert_consistent(acct.user_id)


@pytest.mark.parametrize("field, refused, passed", [
    ("speed", ("fast", "FAST", 2, {"mode": "fast"}), ("standard", None)),
    ("inference_geo", ("us", "eu", ["us"]), ("global", None)),
], ids=["fast-mode", "us-only"])
def test_messages_options_priced_above_standard_are_refused(relay, upstream, field, refused, passed):
    """speed "fast" (Anthropic's fast mode, 2-6x the standard prices) while the catalog prices
    no fast mode for the model, and inference_geo "us" (1.1x): 400 in Anthropic's shape before
    admission, nothing sent or held; the standard value or none pass."""
    _app, client, acct = relay
    fake_reset(upstream)
    headers = {"x-api-key": acct.key, "anthropic-version": "2023-06-01", "anthropic-beta": "fast-mode-2026-02-01"}
    body = {"model": "claude-haiku-4-5", "max_tokens": 20, "messages": HI}
    for value in refused:
        r = client.post("/v1/messages", json={**body, field: value}, headers=headers)
        assert r.status_code == 400, value
        assert r.get_json()["type"] == "error" and r.get_json()["error"]["message"].startswith(field)
    assert fake_stats(upstream)["requests"] == 0
    assert records() == [] and wallet(acct.user_id).balance_micros == 100_000_000
    for value in passed:
        assert client.post("/v1/messages", json={**body, field: value}, headers=headers).status_code == 200
    assert_consistent(acct.user_id)


def reprice(model: str | None, **values) -> None:
    """Change a test model's catalog row (every model's with None), seen by the next call:
    the relay keeps the catalog for CATALOG_TTL_S."""
    from console.relay.auth import invalidate_catalog

    stmt = update(ModelPrice).values(**values)
    with write_tx():
        db.session.execute(stmt if model is None else stmt.where(ModelPrice.name == model))
    db.session.remove()
    invalidate_catalog()


def processing_tiers(model: str, *, priority: int | None, flex: int | None) -> None:
    """Price a test model's priority and flex tiers (ppm; None: refused)."""
    reprice(model, priority_ppm=priority, flex_ppm=flex)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": HI}),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi"}),
], ids=["chat", "responses"])
def test_a_priced_processing_tier_is_billed_at_the_tier_the_provider_served(relay, upstream, path, body, stream):
    """gpt-4o-mini with priority ×2 and flex ×0.5: a call served at priority is billed at twice
    every token price, one served at flex at half, one asked at priority but served at default
    (capacity exhausted) at the standard prices; the hold covers the dearer of the two."""
    _app, client, acct = relay
    processing_tiers("gpt-4o-mini", priority=2_000_000, flex=500_000)
    for tier in ("priority", "flex"):
        r = client.post(path, json={**body, "service_tier": tier, "stream": stream}, headers=bearer(acct))
        assert r.status_code == 200, r.data[:300]
    scenario(upstream, "standard_only=1")
    processing_tiers("gpt-4o-mini", priority=2_000_000, flex=500_000)
    r = client.post(path, json={**body, "service_tier": "priority", "stream": stream}, headers=bearer(acct))
    assert r.status_code == 200
    priority, flex, downgraded = records()
    assert [rec.service_tier for rec in (priority, flex, downgraded)] == ["priority", "flex", ""]
    prices = lambda rec: (rec.input_price, rec.output_price, rec.cache_read_price)  # noqa: E731
    assert prices(priority) == (300_000, 1_200_000, 150_000)
    assert prices(flex) == (75_000, 300_000, 37_500)
    assert prices(downgraded) == (150_000, 600_000, 75_000)
    for rec in (priority, flex, downgraded):
        assert rec.charge_micros == recomputed(rec) <= rec.hold_micros
    assert priority.hold_micros == downgraded.hold_micros > flex.hold_micros
    assert r.status_code == 200 and client.post(path, json={**body, "service_tier": "scale"},
                                                headers=bearer(acct)).status_code == 400
    assert_consistent(acct.user_id)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_priced_fast_mode_is_billed_at_the_speed_the_provider_served(relay, upstream, stream):
    """claude-haiku-4-5 with fast mode priced at ×6: a call the provider reports served fast
    (usage.speed) is billed at six times every token price, a fast request served at standard
    speed at the standard prices; the hold covers the fast prices either way. Above a
    long-context threshold the two ratios multiply (×6 × 2 input-side, ×6 × 1.5 output), as
    Anthropic prices them."""
    _app, client, acct = relay
    headers = {"x-api-key": acct.key, "anthropic-version": "2023-06-01", "anthropic-beta": "fast-mode-2026-02-01"}
    body = {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": HI, "stream": stream}
    processing_tiers("claude-haiku-4-5", priority=6_000_000, flex=None)
    for speed in ("fast", "standard"):
        r = client.post("/v1/messages", json={**body, "speed": speed}, headers=headers)
        assert r.status_code == 200, r.data[:300]
    assert fake_last(upstream)["body"]["speed"] == "standard"
    scenario(upstream, "standard_only=1")
    processing_tiers("claude-haiku-4-5", priority=6_000_000, flex=None)
    assert client.post("/v1/messages", json={**body, "speed": "fast"}, headers=headers).status_code == 200
    scenario(upstream, "")
    processing_tiers("claude-haiku-4-5", priority=6_000_000, flex=None)
    long_context("claude-haiku-4-5", 10)
    long = [{"role": "user", "content": "y" * 400}]
    assert client.post("/v1/messages", json={**body, "messages": long, "speed": "fast"},
                       headers=headers).status_code == 200
    fast, standard, fell_back, fast_long = records()
    assert [rec.service_tier for rec in (fast, standard, fell_back, fast_long)] == ["fast", "", "", "fast"]
    prices = lambda rec: (rec.input_price, rec.output_price, rec.cache_write_5m_price,  # noqa: E731
                          rec.cache_write_1h_price, rec.cache_read_price)
    assert prices(fast) == (6_000_000, 30_000_000, 7_500_000, 12_000_000, 600_000)
    assert prices(standard) == prices(fell_back) == (1_000_000, 5_000_000, 1_250_000, 2_000_000, 100_000)
    assert prices(fast_long) == (12_000_000, 45_000_000, 15_000_000, 24_000_000, 1_200_000)
    for rec in (fast, standard, fell_back, fast_long):
        assert rec.charge_micros == recomputed(rec) <= rec.hold_micros
    assert fast.hold_micros == fell_back.hold_micros > standard.hold_micros
    assert_consistent(acct.user_id)


def test_openai_fast_is_the_priority_tier(relay, upstream):
    """OpenAI renamed priority processing Fast mode and takes service_tier "fast" for it: priced
    by the priority ratio (refused while the catalog prices none), "ultrafast" refused."""
    _app, client, acct = relay
    body = {"model": "gpt-4o-mini", "input": "hi"}
    assert client.post("/v1/responses", json={**body, "service_tier": "fast"}, headers=bearer(acct)).status_code == 400
    processing_tiers("gpt-4o-mini", priority=2_000_000, flex=None)
    assert client.post("/v1/responses", json={**body, "service_tier": "fast"}, headers=bearer(acct)).status_code == 200
    r = client.post("/v1/responses", json={**body, "service_tier": "ultrafast"}, headers=bearer(acct))
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "unsupported_parameter"
    rec = only_record()
    assert (rec.input_price, rec.output_price) == (300_000, 1_200_000)
    assert rec.charge_micros == recomputed(rec) <= rec.hold_micros
    assert_consistent(acct.user_id)


def test_depth_counts_containers_not_brackets_inside_strings(relay):
    """128 levels (the top-level object included) pass, and brackets in text are only text:
    a coding agent's request full of code is not refused as too deep."""
    _app, client, acct = relay
    code = "def f(x): return [[[{x}]]]" * 200 + "[" * 1000
    data = ('{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ' + json.dumps(code) + '}], '
            '"metadata_like": ' + "[" * 127 + "]" * 127 + "}")
    r = client.post("/v1/chat/completions", data=data, content_type="application/json", headers=bearer(acct))
    assert r.status_code == 200, r.data[:200]
    deeper = data.replace("[" * 127 + "]" * 127, "[" * 128 + "]" * 128)
    r = client.post("/v1/chat/completions", data=deeper, content_type="application/json", headers=bearer(acct))
    assert r.status_code == 400 and "deeply" in r.get_json()["error"]["message"]
    assert len(records()) == 1


def test_text_is_passed_on_as_the_same_characters_however_it_was_escaped(relay, upstream):
    """An escaped surrogate pair is one character (an emoji), as is its raw UTF-8; a number
    beyond 64 bits stays an exact integer. The upstream receives the same values."""
    _app, client, acct = relay
    data = ('{"model": "gpt-4o-mini", "seed": 123456789012345678901234567890, "messages": [{"role": "user", '
            '"content": "hi \\ud83d\\ude00 \u00e9\\u00e9 \U0001F600 \\\\ud800"}]}')
    r = client.post("/v1/chat/completions", data=data.encode(), content_type="application/json",
                    headers=bearer(acct))
    assert r.status_code == 200, r.data[:200]
    sent = fake_last(upstream)["body"]
    assert sent["messages"][0]["content"] == "hi \U0001F600 \u00e9\u00e9 \U0001F600 \\ud800"
    assert sent["seed"] == 123456789012345678901234567890


def test_insufficient_balance_is_402_with_the_available_balance(relay):
    """A hold larger than the available balance is refused before any upstream call."""
    _app, client, _acct = relay
    poor = make_account(_acct.group_id, email="poor@example.com", credits=0)
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers=bearer(poor))
    assert r.status_code == 402
    err = r.get_json()["error"]
    assert err["available_credits"] == "0.00" and "/wallet/" in err["wallet_url"]
    assert records() == []


def test_models_lists_only_the_group_models(relay):
    """GET /v1/models: OpenAI list shape, Anthropic shape with anthropic-version."""
    _app, client, acct = relay
    names = {m["id"] for m in client.get("/v1/models", headers=bearer(acct)).get_json()["data"]}
    assert names == {"gpt-4o-mini", "claude-haiku-4-5", "text-embedding-3-small"}
    r = client.get("/v1/models", headers={"x-api-key": acct.key, "anthropic-version": "2023-06-01"})
    assert r.get_json()["data"][0]["type"] == "model" and "has_more" in r.get_json()


def test_a_model_of_the_group_is_retrieved_in_each_api_shape(relay):
    """GET /v1/models/{id} (models.retrieve in both SDKs): the group's model in the shape asked
    for; a model outside the group, or unknown, is a 404 in that API's error shape."""
    _app, client, acct = relay
    r = client.get("/v1/models/gpt-4o-mini", headers=bearer(acct))
    assert r.status_code == 200 and r.get_json() == {"id": "gpt-4o-mini", "object": "model",
                                                      "created": 1735689600, "owned_by": "openai"}
    r = client.get("/v1/models/claude-haiku-4-5", headers={"x-api-key": acct.key, "anthropic-version": "2023-06-01"})
    assert r.status_code == 200 and r.get_json()["type"] == "model" and r.get_json()["id"] == "claude-haiku-4-5"
    for name in ("not-in-group", "no-such/model"):
        r = client.get(f"/v1/models/{name}", headers=bearer(acct))
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "model_not_found"
    r = client.get("/v1/models/not-in-group", headers={"x-api-key": acct.key, "anthropic-version": "2023-06-01"})
    assert r.status_code == 404 and r.get_json()["type"] == "error"
    assert client.get("/v1/models/gpt-4o-mini", headers={"Authorization": "Bearer sk-nope"}).status_code == 401
    assert records() == []


def test_count_tokens_is_forwarded_and_free(relay):
    """count_tokens reaches the anthropic channel and writes no usage record."""
    _app, client, acct = relay
    r = client.post("/v1/messages/count_tokens", json={"model": "claude-haiku-4-5", "messages": HI},
                    headers={"x-api-key": acct.key, "anthropic-version": "2023-06-01"})
    assert r.status_code == 200 and r.get_json()["input_tokens"] > 0
    assert records() == []


# ---- fault matrix (each: status, attempts, amount billed, nothing left pending) ----------------

def test_upstream_500_retries_then_502_and_bills_nothing(relay, upstream):
    """status=500: three attempts, 502 to the client, 0 charged, record failed."""
    _app, client, acct = relay
    scenario(upstream, "status=500")
    fake_reset(upstream)
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers=bearer(acct))
    assert r.status_code == 502
    assert fake_stats(upstream)["requests"] == 3
    rec = only_record()
    assert (rec.status, rec.attempts, rec.charge_micros) == ("failed", 3, 0)
    assert wallet(acct.user_id).balance_micros == 100_000_000
    assert_consistent(acct.user_id)


def test_upstream_429_honours_retry_after_and_passes_it_on(relay, upstream):
    """status=429 with Retry-After: 1 → retried after the wait, then 429 with Retry-After; 0 charged."""
    app, client, acct = relay
    app.config["RELAY_MAX_ATTEMPTS"] = 2
    scenario(upstream, "status=429")
    fake_reset(upstream)
    r = client.post("/v1/messages", json={"model": "claude-haiku-4-5", "max_tokens": 10, "messages": HI},
                    headers={"x-api-key": acct.key})
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.get_json()["error"]["type"] == "rate_limit_error"
    assert fake_stats(upstream)["requests"] == 2
    rec = only_record()
    assert (rec.status, rec.attempts, rec.charge_micros) == ("failed", 2, 0)
    assert_consistent(acct.user_id)


@contextmanager
def raw_upstream(status: int, headers: dict[str, str], body_bytes: int = 0):
    """An upstream on 127.0.0.1 that answers every request with `status`, `headers` and a body of
    `body_bytes` bytes. Yields (base URL, bytes each reply managed to send before its reader left)."""
    sent: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(status)
            for k, v in {**headers, "content-type": "application/json", "content-length": str(body_bytes)}.items():
                self.send_header(k, v)
            self.end_headers()
            done, block = 0, b" " * 65536
            try:
                while done < body_bytes:
                    self.wfile.write(block[: body_bytes - done])
                    done += min(len(block), body_bytes - done)
            except OSError:
                pass
            sent.append(done)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", sent
    finally:
        server.shutdown()
        server.server_close()


def _only_channel(base: str) -> None:
    with write_tx():
        db.session.execute(update(Channel).values(status="disabled"))
    channels.create_channel(name="raw", type="openai", base_url=base, api_key="sk-raw-channel-key",
                            models="gpt-4o-mini")
    db.session.remove()


@pytest.mark.parametrize("value, passed_on", [("inf", "1"), ("1e400", "1"), ("nan", "1"), ("-3", "1"),
                                              ("Wed, 21 Oct 2015 07:28:00 GMT", "1"), ("1e300", "86400")])
def test_a_retry_after_that_is_no_number_of_seconds_is_a_clean_429(relay, value, passed_on):
    """Retry-After is read as a number of seconds up to a day; anything else as if absent."""
    _app, client, acct = relay
    with raw_upstream(429, {"retry-after": value}) as (base, _sent):
        _only_channel(base)
        r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI},
                        headers=bearer(acct))
    assert r.status_code == 429 and r.headers["Retry-After"] == passed_on
    assert (only_record().status, only_record().charge_micros) == ("failed", 0)
    assert_consistent(acct.user_id)


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_gzipped_against_the_request_reaches_the_client_plain(relay, upstream, stream):
    """An upstream that gzips although the relay asked for identity: the client gets the plain
    reply (it is sent no Content-Encoding) and the call is billed on the reported usage."""
    _app, client, acct = relay
    scenario(upstream, "gzip=1")
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI, "stream": stream},
                    headers=bearer(acct))
    assert r.status_code == 200 and "Content-Encoding" not in r.headers
    words = "chunk 0 chunk 1 chunk 2 chunk 3 chunk 4"
    if stream:
        assert "".join(delta_texts(sse_events(r.data))) == words
    else:
        assert r.get_json()["choices"][0]["message"]["content"] == words
    rec = only_record()
    assert (rec.status, rec.usage_source) == ("ok", "upstream") and rec.charge_micros == recomputed(rec)
    assert_consistent(acct.user_id)


def test_a_reply_in_a_coding_the_relay_does_not_read_is_a_502_billed_nothing(relay):
    """zstd (or br…) is refused before a byte reaches the client: 502, the call failed, 0 charged."""
    _app, client, acct = relay
    with raw_upstream(200, {"content-encoding": "zstd"}, body_bytes=100) as (base, _sent):
        _only_channel(base)
        r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI},
                        headers=bearer(acct))
    assert r.status_code == 502 and "content coding" in r.get_json()["error"]["message"]
    rec = only_record()
    assert (rec.status, rec.charge_micros, rec.attempts) == ("failed", 0, 1)
    assert_consistent(acct.user_id)


def test_a_failed_attempts_large_reply_is_not_read_to_its_end(relay):
    """A 500 with a 50 MB body: each attempt reads at most a little of it and drops the
    connection, so an upstream's error cannot fill the worker's memory or time."""
    _app, client, acct = relay
    with raw_upstream(500, {}, body_bytes=50 * 1024 * 1024) as (base, sent):
        _only_channel(base)
        r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI},
                        headers=bearer(acct))
        assert r.status_code == 502
        deadline = time.monotonic() + 5
        while len(sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(sent) == 3 and max(sent) < 20 * 1024 * 1024, sent
    assert (only_record().status, only_record().attempts) == ("failed", 3)
    assert_consistent(acct.user_id)


def test_connect_refused_fails_over_to_the_next_channel(relay, upstream):
    """A dead high-priority channel is skipped for a healthy one; the call is billed normally."""
    _app, client, acct = relay
    channels.create_channel(name="dead", type="openai", base_url=f"http://127.0.0.1:{free_port()}/v1",
                            api_key="sk-dead-channel-key", models="gpt-4o-mini=fake-model", priority=10)
    db.session.remove()
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers=bearer(acct))
    assert r.status_code == 200
    rec = only_record()
    dead = db.session.scalar(select(Channel).where(Channel.name == "dead"))
    assert rec.attempts == 2 and rec.channel_id != dead.id and rec.status == "ok"
    assert dead.fail_count == 1 and "ConnectError" in dead.last_error


def test_connect_refused_everywhere_is_502(relay):
    """Only dead channels: capped attempts, 502, nothing billed; the channel auto-disables at the threshold."""
    _app, client, acct = relay
    with write_tx():
        db.session.execute(update(Channel).values(status="disabled"))
    channels.create_channel(name="dead", type="openai", base_url=f"http://127.0.0.1:{free_port()}/v1",
                            api_key="sk-dead-channel-key", models="gpt-4o-mini")
    db.session.remove()
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers=bearer(acct))
    assert r.status_code == 502
    rec = only_record()
    assert (rec.status, rec.attempts, rec.charge_micros) == ("failed", 3, 0)
    client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers=bearer(acct))
    dead = db.session.scalar(select(Channel).where(Channel.name == "dead"))
    assert dead.status == "auto_disabled" and dead.disabled_until > utcnow()
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers=bearer(acct))
    assert r.status_code == 503  # no eligible channel until the re-probe time
    assert_consistent(acct.user_id)


def test_timeout_before_first_byte_is_504_without_retry(relay, upstream):
    """hang_before_ms beyond the idle timeout: one attempt, 504, nothing billed."""
    _app, client, acct = relay
    scenario(upstream, "hang_before_ms=2500")
    fake_reset(upstream)
    r = stream_chat(client, acct)
    assert r.status_code == 504
    rec = only_record()
    assert (rec.status, rec.attempts, rec.charge_micros) == ("failed", 1, 0)
    assert_consistent(acct.user_id)


def test_drip_below_idle_timeout_is_cut_at_the_total_deadline(relay, upstream):
    """An upstream dripping keepalives forever is cut at the 3 s total deadline; no output → 0 billed."""
    _app, client, acct = relay
    scenario(upstream, "drip_ms=200")
    r = stream_chat(client, acct)
    assert r.status_code == 200
    assert b"interrupted" in r.data
    rec = only_record()
    assert (rec.status, rec.charge_micros) == ("failed", 0)
    assert 3000 <= rec.latency_ms < 5000
    assert_consistent(acct.user_id)


def test_drip_non_stream_is_504_at_the_total_deadline(relay, upstream):
    """A non-stream reply that never finishes is a 504 at the deadline, not billed."""
    _app, client, acct = relay
    scenario(upstream, "drip_ms=200")
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers=bearer(acct))
    assert r.status_code == 504
    assert (only_record().status, only_record().charge_micros) == ("failed", 0)


def test_reset_mid_stream_bills_input_and_delivered_output_estimated(relay, upstream):
    """reset_after=3: the client got 3 deltas and an error event; billed input estimate + 3 deltas."""
    _app, client, acct = relay
    scenario(upstream, "reset_after=3")
    r = stream_chat(client, acct)
    assert delta_texts(sse_events(r.data)) == ["chunk 0", " chunk 1", " chunk 2"]
    assert sse_events(r.data)[-1]["error"]["code"] == "upstream_error"
    rec = only_record()
    assert (rec.status, rec.usage_source) == ("partial", "estimated")
    assert rec.output_tokens == max(3, -(-len("chunk 0 chunk 1 chunk 2") // 4))
    body = {"model": "gpt-4o-mini", "messages": HI, "stream": True}
    assert rec.input_tokens == estimate(body).input_tokens() == 5  # ⌈17 characters / 4⌉
    assert rec.charge_micros == recomputed(rec) > 0
    assert_consistent(acct.user_id)


def test_malformed_sse_is_passed_through_and_billed_from_usage(relay, upstream):
    """A non-JSON data line is passed on untouched; the final usage still bills the call."""
    _app, client, acct = relay
    scenario(upstream, "malformed_after=2")
    r = client.post("/v1/messages", json={"model": "claude-haiku-4-5", "max_tokens": 10, "messages": HI,
                                          "stream": True}, headers={"x-api-key": acct.key})
    assert b"{not json at all" in r.data
    rec = only_record()
    assert (rec.status, rec.usage_source, rec.output_tokens) == ("ok", "upstream", 5)


def test_an_event_larger_than_a_read_passes_through_whole(relay, upstream):
    """huge_after=2: a 1 MB event (many reads) reaches the client intact between the deltas."""
    _app, client, acct = relay
    scenario(upstream, "huge_after=2")
    r = stream_chat(client, acct)
    assert r.status_code == 200
    assert r.data.count(HUGE_EVENT) == 1 and r.data.endswith(b"data: [DONE]\n\n")
    assert delta_texts(sse_events(r.data)) == ["chunk 0", " chunk 1", " chunk 2", " chunk 3", " chunk 4"]
    rec = only_record()
    assert (rec.status, rec.usage_source, rec.output_tokens) == ("ok", "upstream", 5)
    assert_consistent(acct.user_id)


def test_an_event_beyond_the_reply_limit_cuts_the_stream(relay, upstream, monkeypatch):
    """An event that would hold more than MAX_REPLY_BYTES in memory ends the stream there with an
    error event, billed as a stream the upstream broke (partial, estimated)."""
    _app, client, acct = relay
    monkeypatch.setattr(proxy, "MAX_REPLY_BYTES", 256 * 1024)
    scenario(upstream, "huge_after=2")
    r = stream_chat(client, acct)
    assert r.status_code == 200 and b"xxxx" not in r.data
    events = sse_events(r.data)
    assert delta_texts(events[:-1]) == ["chunk 0", " chunk 1"]
    assert events[-1]["error"]["code"] == "upstream_error"
    rec = only_record()
    assert (rec.status, rec.usage_source, rec.error) == ("partial", "estimated", "upstream event beyond the size limit")
    assert rec.output_tokens == max(2, -(-len("chunk 0 chunk 1") // 4))
    assert rec.charge_micros == recomputed(rec) > 0
    assert_consistent(acct.user_id)


def test_stream_without_usage_is_estimated(relay, upstream):
    """no_usage=1: billed from the request estimate and the delivered text, marked estimated."""
    _app, client, acct = relay
    scenario(upstream, "no_usage=1")
    r = stream_chat(client, acct)
    assert r.status_code == 200 and r.data.endswith(b"[DONE]\n\n")
    rec = only_record()
    assert (rec.status, rec.usage_source) == ("ok", "estimated")
    assert rec.output_tokens == max(5, -(-len("chunk 0 chunk 1 chunk 2 chunk 3 chunk 4") // 4))
    assert rec.charge_micros == recomputed(rec) > 0
    assert_consistent(acct.user_id)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": HI}),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": HI, "stream": True}),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "stream": True}),
    ("/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": HI}),
    ("/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": HI, "stream": True}),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
], ids=["chat", "chat-stream", "responses-stream", "messages", "messages-stream", "embeddings"])
def test_usage_beyond_what_a_record_holds_is_estimated_not_charged(relay, upstream, path, body):
    """An upstream reporting 3,000,000,000 input tokens (beyond the record's columns, and no
    real call's size) is not believed: the call is billed as if it had reported none, marked
    estimated, the same on SQLite and PostgreSQL; nothing is left pending."""
    _app, client, acct = relay
    scenario(upstream, "input_tokens=3000000000")
    before = wallet(acct.user_id).balance_micros
    r = client.post(path, json=body, headers={"x-api-key": acct.key})
    assert r.status_code == 200, r.data[:300]
    rec = only_record()
    assert (rec.status, rec.usage_source) == ("ok", "estimated")
    assert rec.error == "usage from upstream out of range"
    assert rec.input_tokens == estimate(body).input_tokens() < 100
    assert rec.charge_micros == recomputed(rec) <= rec.hold_micros
    assert before - wallet(acct.user_id).balance_micros == rec.charge_micros
    assert_consistent(acct.user_id)


ANTHROPIC_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
SEARCH_CALLS = {
    "messages": ("/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": HI,
                                  "tools": [ANTHROPIC_SEARCH]}),
    "responses": ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "tools": [{"type": "web_search"}]}),
}
SEARCH_PRICE = 10_000  # micro-USD per search: $10 / 1k (tests/support/upstream.WEB_SEARCH_USD)


def search_call(client, acct, surface: str, stream: bool):
    path, body = SEARCH_CALLS[surface]
    return client.post(path, json={**body, "stream": stream},
                       headers={"x-api-key": acct.key, "anthropic-version": "2023-06-01"})


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("surface", ["messages", "responses"])
def test_web_searches_are_billed_per_search_on_top_of_tokens(relay, upstream, surface, stream):
    """Three searches of which one failed: the two that ran are billed at the model's price
    per search (Anthropic usage.server_tool_use; Responses web_search_call items), on top of
    the tokens, and the record holds the count and the price it was billed at."""
    _app, client, acct = relay
    scenario(upstream, "web_searches=3;failed_searches=1")
    before = wallet(acct.user_id).balance_micros
    r = search_call(client, acct, surface, stream)
    assert r.status_code == 200, r.data[:300]
    shown = sse_events(r.data) if stream else [r.get_json()]
    assert b"web_search" in r.data and shown
    rec = only_record()
    assert (rec.status, rec.usage_source, rec.output_tokens) == ("ok", "upstream", 5)
    assert (rec.web_searches, rec.web_search_price) == (2, SEARCH_PRICE)
    tokens_only = quote(replace(Tokens.of_record(rec), web_searches=0), Prices.of_record(rec), rec.multiplier_ppm)
    assert rec.official_cost_pico == tokens_only.official_pico + 2 * SEARCH_PRICE * 10**6
    assert rec.charge_micros == recomputed(rec) >= tokens_only.charge_micros + 2 * SEARCH_PRICE * 3 // 10
    # The hold covered every search the request allowed: max_uses 5, or 10 for OpenAI's tool.
    allowed = 5 if surface == "messages" else 10
    assert rec.hold_micros >= allowed * SEARCH_PRICE * 3 // 10 + tokens_only.charge_micros
    assert before - wallet(acct.user_id).balance_micros == rec.charge_micros
    assert_consistent(acct.user_id)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_responses_tool_usage_count_decides_the_searches_billed(relay, upstream, stream):
    """A response that reports tool_usage bills its count of billable searches: of 3 searches
    that ran, the provider counts 1 as discounted, so 2 are billed; with none discounted, 3."""
    _app, client, acct = relay
    for discounted, billed in ((1, 2), (0, 3)):
        scenario(upstream, f"web_searches=3;discounted_searches={discounted}")
        r = search_call(client, acct, "responses", stream)
        assert r.status_code == 200 and b"num_requests" in r.data
    few, all_ = records()
    assert (few.web_searches, all_.web_searches) == (2, 3)
    for rec in (few, all_):
        assert rec.charge_micros == recomputed(rec) and rec.usage_source == "upstream"
    assert_consistent(acct.user_id)


@pytest.mark.parametrize("count, billed", [(2, 2), (0, 0), (-1, 3), (True, 3), (2.0, 3), ("2", 3), (None, 3),
                                           (10**12, 2**31)])
def test_only_a_whole_tool_usage_count_replaces_the_items(count, billed):
    """tool_usage.web_search.num_requests counts when it is a whole number (one beyond the
    believable range is kept out of range, so the usage is not believed); anything else falls
    back to the 3 web_search_call items of the output."""
    from console.relay.protocols import believable, responses_tokens

    items = [{"type": "web_search_call", "status": "completed", "action": {"type": "search"}}] * 3
    resp = {"usage": {"input_tokens": 5, "output_tokens": 1}, "output": items,
            "tool_usage": {"web_search": {"num_requests": count}}}
    tokens = responses_tokens(resp)
    assert tokens.web_searches == billed and believable(tokens) == (billed < 2**31)


@pytest.mark.parametrize("surface", ["messages", "responses"])
def test_a_stream_cut_after_its_searches_bills_the_searches_delivered(relay, upstream, surface):
    """The upstream breaks after three searches (one failed) and one delta reached the client:
    partial, estimated, and the two searches that ran are billed with it."""
    _app, client, acct = relay
    scenario(upstream, "web_searches=3;failed_searches=1;reset_after=1")
    r = search_call(client, acct, surface, True)
    assert r.status_code == 200
    rec = only_record()
    assert (rec.status, rec.usage_source, rec.web_searches) == ("partial", "estimated", 2)
    assert rec.charge_micros == recomputed(rec) > 2 * SEARCH_PRICE * 3 // 10
    assert_consistent(acct.user_id)


@pytest.mark.parametrize("surface", ["messages", "responses"])
def test_a_reply_without_usage_still_bills_the_searches_it_shows(relay, upstream, surface):
    """no_usage=1: tokens are estimated, and the searches are counted from the reply's
    web_search_call items or web_search_tool_result blocks (a failed one is not)."""
    _app, client, acct = relay
    scenario(upstream, "web_searches=3;failed_searches=2;no_usage=1")
    r = search_call(client, acct, surface, False)
    assert r.status_code == 200
    rec = only_record()
    assert (rec.status, rec.usage_source, rec.web_searches) == ("ok", "estimated", 1)
    assert rec.charge_micros == recomputed(rec)
    assert_consistent(acct.user_id)


def test_searches_are_free_where_the_catalog_sets_no_price(relay, upstream):
    """A model without a search price bills the searches' count at $0, holds nothing for them."""
    _app, client, acct = relay
    reprice(None, web_search_price=None)
    scenario(upstream, "web_searches=2")
    r = search_call(client, acct, "messages", False)
    assert r.status_code == 200
    rec = only_record()
    assert (rec.web_searches, rec.web_search_price) == (2, 0)
    assert rec.official_cost_pico == quote(replace(Tokens.of_record(rec), web_searches=0),
                                           Prices.of_record(rec), rec.multiplier_ppm).official_pico
    assert rec.hold_micros < 5 * SEARCH_PRICE * 3 // 10
    assert_consistent(acct.user_id)


def test_the_search_hold_can_be_refused_for_balance(relay):
    """A balance that covers the tokens but not the searches a request allows is a 402 before
    anything is sent upstream."""
    _app, client, acct = relay
    path, body = SEARCH_CALLS["messages"]
    plain = client.post(path, json={**body, "tools": []}, headers={"x-api-key": acct.key})
    assert plain.status_code == 200
    hold = only_record().hold_micros
    spend = wallet(acct.user_id).balance_micros - hold - 1_000  # left: the plain hold + 0.001
    ledger.charge(acct.user_id, spend, kind="admin_adjust", ref_type="test", ref_id="drain")
    many = {**body, "tools": [dict(ANTHROPIC_SEARCH, max_uses=100)]}
    r = client.post(path, json=many, headers={"x-api-key": acct.key})
    assert r.status_code == 402 and r.get_json()["error"]["message"].startswith("Insufficient balance")
    assert len(records()) == 1
    assert_consistent(acct.user_id)


@pytest.mark.parametrize("item, counted", [
    ({"type": "web_search_call", "status": "completed", "action": {"type": "search", "query": "q"}}, True),
    ({"type": "web_search_call", "status": "completed"}, True),  # web_search_preview: no action
    ({"type": "web_search_call", "status": "in_progress", "action": {"type": "search"}}, True),
    ({"type": "web_search_call", "status": "failed", "action": {"type": "search"}}, False),
    ({"type": "web_search_call", "status": "completed", "action": {"type": "open_page", "url": "u"}}, False),
    ({"type": "web_search_call", "status": "completed", "action": {"type": "find_in_page"}}, False),
    ({"type": "web_search_call", "status": "completed", "action": "search"}, False),
    ({"type": "web_search_tool_result", "content": [{"type": "web_search_result"}]}, True),
    ({"type": "web_search_tool_result", "content": []}, True),
    ({"type": "web_search_tool_result", "content": {"type": "web_search_tool_result_error"}}, False),
    ({"type": "server_tool_use", "name": "web_search"}, False),
    ({"type": "message"}, False), ("web_search_call", False), (None, False),
])
def test_a_search_is_counted_as_the_providers_bill_it(item, counted):
    """OpenAI bills web_search_call items whose action is a search (open_page and find_in_page
    are free), Anthropic each web_search_tool_result that holds results; failed ones are free."""
    from console.relay.protocols import ran_search

    assert ran_search(item) is counted


@pytest.mark.parametrize("tools, bound", [
    ([{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}], 3),
    ([{"type": "web_search_20250305", "name": "web_search"}], 10),
    ([{"type": "web_search_20260209", "name": "web_search", "max_uses": 0}], 0),
    ([{"type": "web_search"}], 10),
    ([{"type": "web_search_preview"}, {"type": "web_search_preview_2025_03_11"}], 20),
    ([{"type": "web_search_20250305", "max_uses": 2}, {"type": "web_search_20250305", "max_uses": 4}], 6),
    ([{"type": "web_search_20250305", "max_uses": bad} for bad in (-1, "5", True, 10**6, 2.0)], 50),
    ([{"type": "function", "name": "web_search"}, {"name": "web_search", "input_schema": {}}], 0),
    ([{"type": "custom"}, "web_search", None, {"type": ["web_search"]}], 0),
    ({"type": "web_search"}, 0),
    (None, 0),
], ids=["max_uses", "no-max", "zero", "openai", "preview-twice", "two", "bad-max", "client-tools",
        "junk", "not-a-list", "none"])
def test_the_search_bound_reads_each_search_tool(tools, bound):
    """Each server-side web search tool adds its max_uses (10 without one, or with one that is
    not a whole number up to 10,000); client tools named web_search do not count."""
    assert estimate({"messages": HI, "tools": tools}).web_searches == bound


@pytest.mark.parametrize("max_tool_calls, tools, bound", [
    (3, [{"type": "web_search"}], 3),
    (40, [{"type": "web_search"}], 40),
    (40, [{"type": "web_search"}, {"type": "web_search_preview"}], 40),
    (40, [{"type": "web_search_20250305", "max_uses": 2}], 2),
    (0, [{"type": "web_search"}], 0),
    (-1, [{"type": "web_search"}], 10),
    ("3", [{"type": "web_search"}], 10),
    (5, [], 0),
])
def test_max_tool_calls_bounds_the_searches_of_a_response(max_tool_calls, tools, bound):
    """The Responses API's max_tool_calls limits every built-in tool call of the response: a
    search tool without its own limit may run that many, and all of them no more."""
    body = {"input": "hi", "tools": tools, "max_tool_calls": max_tool_calls}
    assert estimate(body).web_searches == bound


def long_context(model: str, threshold: int, up: int = 2_000_000, out: int = 1_500_000) -> None:
    """Give a test model a long-context tier."""
    reprice(model, long_context_threshold=threshold, long_context_input_ppm=up, long_context_output_ppm=out)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_prompt_above_the_long_context_threshold_is_priced_whole_at_the_tier(relay, stream):
    """claude-haiku-4-5 given a tier above 100 input-side tokens (input ×2, output ×1.5): a call
    whose prompt (input + cache write) exceeds it has every token priced at the tier, the record
    holds the tier's prices, and its charge recomputes from the row; a short call stays at the
    regular prices."""
    _app, client, acct = relay
    long_context("claude-haiku-4-5", 100)
    headers = {"x-api-key": acct.key, "anthropic-version": "2023-06-01"}
    system = [{"type": "text", "text": "Be brief. " * 60, "cache_control": {"type": "ephemeral"}}]
    short = client.post("/v1/messages", json={"model": "claude-haiku-4-5", "max_tokens": 50,
                                              "messages": HI, "stream": stream}, headers=headers)
    long = client.post("/v1/messages", json={"model": "claude-haiku-4-5", "max_tokens": 50, "system": system,
                                             "messages": HI, "stream": stream}, headers=headers)
    assert short.status_code == long.status_code == 200
    a, b = records()
    assert Tokens.of_record(a).input_side <= 100 < Tokens.of_record(b).input_side
    assert b.cache_write_5m_tokens > 0  # the tier counts cache writes too
    regular = (1_000_000, 5_000_000, 1_250_000, 2_000_000, 100_000)
    assert (a.input_price, a.output_price, a.cache_write_5m_price, a.cache_write_1h_price, a.cache_read_price) == regular
    assert (b.input_price, b.output_price, b.cache_write_5m_price, b.cache_write_1h_price, b.cache_read_price) == (
        2_000_000, 7_500_000, 2_500_000, 4_000_000, 200_000)
    for rec in (a, b):
        assert rec.charge_micros == recomputed(rec) <= rec.hold_micros
    assert_consistent(acct.user_id)


def test_the_hold_of_a_long_prompt_is_priced_at_the_tier(relay):
    """The hold's input bound above the threshold is priced at the tier: with ×3 input and ×1.5
    output it is higher than the same request's hold without the tier."""
    _app, client, acct = relay
    body = {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "y" * 4000}]}
    assert client.post("/v1/messages", json=body, headers={"x-api-key": acct.key}).status_code == 200
    long_context("claude-haiku-4-5", 1000, up=3_000_000)
    assert client.post("/v1/messages", json=body, headers={"x-api-key": acct.key}).status_code == 200
    plain, tiered = records()
    assert tiered.input_price == 3 * plain.input_price
    assert tiered.hold_micros > 2 * plain.hold_micros
    assert tiered.charge_micros == recomputed(tiered) <= tiered.hold_micros
    assert_consistent(acct.user_id)


def test_upstream_client_error_is_passed_on_unbilled(relay, upstream):
    """A 400 from the upstream reaches the client as is and costs nothing."""
    _app, client, acct = relay
    scenario(upstream, "status=400")
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers=bearer(acct))
    assert r.status_code == 400 and "scenario" in r.get_json()["error"]["message"]
    assert (only_record().status, only_record().charge_micros) == ("failed", 0)


# ---- admission, reconcile ---------------------------------------------------------------------

def test_hold_is_an_upper_bound_and_released_at_settle(relay):
    """The hold covers max_tokens at the dearest input price and disappears after settle."""
    _app, client, acct = relay
    r = client.post("/v1/messages", json={"model": "claude-haiku-4-5", "max_tokens": 700, "messages": HI},
                    headers={"x-api-key": acct.key})
    assert r.status_code == 200
    rec = only_record()
    assert rec.hold_micros >= rec.charge_micros
    # 700 output tokens × $5/M + input ≤ bytes × $2/M, × 0.3
    assert rec.hold_micros >= 700 * 5 * 3 // 10
    assert wallet(acct.user_id).held_micros == 0


def test_group_concurrency_limit_counts_pending_records(relay):
    """With `limit` calls pending in the group, the next admission is a 429 with Retry-After."""
    _app, client, acct = relay
    from console.models import Group
    with write_tx():
        db.session.execute(update(Group).values(concurrency_limit=1))
    from console.relay.auth import invalidate_catalog
    invalidate_catalog()
    _pending(acct, deadline_in=timedelta(minutes=5))
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers=bearer(acct))
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert len(records()) == 1


def test_admission_counts_what_committed_while_it_waited_for_the_wallet(relay):
    """An admission that waits for the wallet lock counts the call in flight committed by the
    transaction it waited for (PostgreSQL: the counts are taken after the lock, not from the
    statement's starting snapshot): with a limit of 1 it is refused, never a second call in flight."""
    import threading
    import time

    app, client, acct = relay
    from console.models import Group
    from console.relay.auth import invalidate_catalog
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers=bearer(acct))
    assert r.status_code == 200
    with write_tx():
        db.session.execute(update(Group).values(concurrency_limit=1))
    invalidate_catalog()
    cols = [c.name for c in UsageRecord.__table__.columns if c.name != "id"]
    copy = ", ".join({"request_id": "'race-blocker'", "status": "'pending'"}.get(c, c) for c in cols)
    insert_pending = [f"INSERT INTO usage_records ({', '.join(cols)}) SELECT {copy} FROM usage_records "
                      f"WHERE id = (SELECT max(id) FROM usage_records)",
                      "INSERT INTO relay_inflight (record_id, user_id, group_id, key_id, hold_micros) "
                      "SELECT id, user_id, group_id, key_id, hold_micros FROM usage_records "
                      "WHERE request_id = 'race-blocker'"]
    pg = db.engine.dialect.name == "postgresql"
    if pg:
        import psycopg
        blocker = psycopg.connect(db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False))
        blocker.execute("SELECT 1 FROM wallets WHERE user_id = %s FOR UPDATE", (acct.user_id,))
    else:
        import sqlite3
        blocker = sqlite3.connect(db.engine.url.database, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
    db.session.remove()
    result = {}

    def call():
        with app.app_context():
            result["r"] = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI},
                                      headers=bearer(acct))
    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 10
    if pg:
        with psycopg.connect(db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False),
                             autocommit=True) as probe:
            while not probe.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]:
                assert time.monotonic() < deadline, "the admission never waited for the wallet lock"
                time.sleep(0.01)
    else:
        time.sleep(0.5)  # the admission is polling for the write lock by now
    for statement in insert_pending:
        blocker.execute(statement)
    blocker.execute("COMMIT") if not pg else blocker.commit()
    blocker.close()
    t.join(15)
    assert result["r"].status_code == 429, result["r"].get_data(as_text=True)
    assert [x.status for x in records()].count("pending") == 1


def test_key_spend_limit_counts_open_holds(relay):
    """A key's spend limit refuses a call whose hold would pass it (402)."""
    _app, client, acct = relay
    with write_tx():
        db.session.execute(update(ApiKey).values(spend_limit_micros=100))
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers=bearer(acct))
    assert r.status_code == 402 and r.get_json()["error"]["code"] == "key_spend_limit"


# ---- keys the relay remembers between calls ----------------------------------------------

def _chat(client, acct, model: str = "gpt-4o-mini"):
    return client.post("/v1/chat/completions", json={"model": model, "messages": HI}, headers=bearer(acct))


def _count_lookups(monkeypatch) -> list:
    seen, real = [], keys.relay_lookup
    monkeypatch.setattr(keys, "relay_lookup", lambda secret: seen.append(1) or real(secret))
    return seen


def _disable(acct):
    keys.set_enabled(acct.user_id, acct.key_id, False)


def _delete(acct):
    keys.delete(acct.user_id, acct.key_id)


def _expire(acct):
    with write_tx():
        db.session.get(ApiKey, acct.key_id).expires_at = utcnow()


def _roll(acct):
    keys.roll(acct.user_id, acct.key_id)


def _disable_account(acct):
    with write_tx():
        db.session.get(User, acct.user_id).status = "disabled"


@pytest.mark.parametrize("revoke", [_disable, _delete, _expire, _roll, _disable_account],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_remembered_key_is_refused_as_soon_as_it_is_revoked(relay, revoke, monkeypatch):
    """The relay serves a key's calls from the row it read for an earlier call (no lookup), but
    each admission re-reads the key: the call right after a revocation is a 401, with nothing
    held or recorded. (Revoked here in this process, which tells the relay nothing: as from
    another worker or host.)"""
    _app, client, acct = relay
    assert _chat(client, acct).status_code == 200
    lookups = _count_lookups(monkeypatch)
    assert _chat(client, acct).status_code == 200
    assert lookups == [], "the second call read the key again instead of using the remembered row"
    revoke(acct)
    before = (wallet(acct.user_id).balance_micros, len(records()))
    r = _chat(client, acct)
    assert r.status_code == 401, r.get_data(as_text=True)
    assert r.get_json()["error"]["code"] == "invalid_api_key"
    assert (wallet(acct.user_id).balance_micros, len(records())) == before
    assert_consistent(acct.user_id)


def test_a_revoked_remembered_key_with_a_bad_body_is_told_401(relay):
    """The key is judged before the body, also when the relay remembers the key."""
    _app, client, acct = relay
    assert _chat(client, acct).status_code == 200
    _disable(acct)
    r = client.post("/v1/chat/completions", data=b"{not json", headers={**bearer(acct), "content-type": "application/json"})
    assert r.status_code == 401, r.get_data(as_text=True)


@pytest.mark.parametrize("change, status, code", [
    ({"model_allowlist": "claude-haiku-4-5"}, 403, "model_not_allowed"),
    ({"ip_allowlist": "10.0.0.0/8"}, 403, "ip_not_allowed"),
    ({"spend_limit_micros": 100}, 402, "key_spend_limit"),
])
def test_a_remembered_key_obeys_a_narrowed_restriction_at_once(relay, change, status, code):
    """A restriction added to a key the relay remembers refuses the very next call."""
    _app, client, acct = relay
    assert _chat(client, acct).status_code == 200
    with write_tx():
        db.session.execute(update(ApiKey).where(ApiKey.id == acct.key_id).values(**change))
    before = len(records())
    r = _chat(client, acct)
    assert (r.status_code, r.get_json()["error"]["code"]) == (status, code)
    assert len(records()) == before and wallet(acct.user_id).held_micros == 0


@pytest.mark.parametrize("narrow", [{"model_allowlist": "claude-haiku-4-5"}, {"ip_allowlist": "10.0.0.0/8"}],
                         ids=["model", "ip"])
def test_a_refusal_is_never_decided_on_a_stale_remembered_key(relay, narrow):
    """A call the key was refused a moment ago is served as soon as the key allows it: a
    refusal taken from the remembered row is checked against a fresh read first."""
    _app, client, acct = relay
    with write_tx():
        db.session.execute(update(ApiKey).where(ApiKey.id == acct.key_id).values(**narrow))
    assert _chat(client, acct).status_code == 403
    with write_tx():
        db.session.execute(update(ApiKey).where(ApiKey.id == acct.key_id).values(**{k: "" for k in narrow}))
    r = _chat(client, acct)
    assert r.status_code == 200, r.get_data(as_text=True)


def test_a_remembered_key_moved_to_another_group_is_billed_in_it_at_once(relay):
    """Moving a key to another group takes effect on the next call: its multiplier and group."""
    from console.models import Group, GroupModel, ModelPrice
    from console.money import parse_multiplier
    from console.relay.auth import invalidate_catalog

    app, client, acct = relay
    assert _chat(client, acct).status_code == 200
    with write_tx():
        other = Group(slug="other", name="Other", multiplier_ppm=parse_multiplier("1.5"),
                      concurrency_limit=50, rpm_limit=100000)
        db.session.add(other)
        db.session.flush()
        mid = db.session.scalar(select(ModelPrice.id).where(ModelPrice.name == "gpt-4o-mini"))
        db.session.add(GroupModel(group_id=other.id, model_id=mid))
        other_id = other.id
    keys.move_to_group(acct.user_id, acct.key_id, other_id)
    invalidate_catalog()  # the new group itself reaches the catalog cache within CATALOG_TTL_S
    r = _chat(client, acct)
    assert r.status_code == 200, r.get_data(as_text=True)
    rec = db.session.scalar(select(UsageRecord).where(UsageRecord.request_id == r.headers["x-request-id"]))
    assert (rec.group_id, rec.multiplier_ppm) == (other_id, 1_500_000)
    assert rec.charge_micros == recomputed(rec)


def _pending(acct, *, deadline_in: timedelta, delivered_chars: int = 0, web_searches: int = 0,
             service_tier: str = ""):
    from console.relay.auth import authenticate, resolve_model
    from console.relay.metering import admit, checkpoint, estimate, new_request_id

    caller = authenticate(acct.key, "127.0.0.1")
    model = resolve_model(caller, "gpt-4o-mini")
    adm = admit(caller, model, request_id=new_request_id(), endpoint="chat", stream=True,
                est=estimate({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 400}]}),
                client_ip=None)
    if delivered_chars:
        checkpoint(adm.record_id, delivered_chars, web_searches, service_tier)
    with write_tx():
        db.session.execute(update(UsageRecord).where(UsageRecord.id == adm.record_id)
                           .values(deadline_at=utcnow() + deadline_in))
    return adm


def test_reconcile_settles_stale_records_once(relay):
    """Past-deadline pending calls are billed input estimate + checkpointed output; a rerun changes nothing."""
    _app, _client, acct = relay
    stale = _pending(acct, deadline_in=-timedelta(seconds=1), delivered_chars=40)
    fresh = _pending(acct, deadline_in=timedelta(minutes=5))
    assert wallet(acct.user_id).held_micros == stale.hold_micros + fresh.hold_micros
    assert reconcile() == 1
    balance = wallet(acct.user_id).balance_micros
    assert reconcile() == 0 and wallet(acct.user_id).balance_micros == balance
    rec = db.session.get(UsageRecord, stale.record_id)
    assert (rec.status, rec.usage_source, rec.output_tokens) == ("partial", "estimated", 10)
    assert rec.input_tokens == stale.est_input_tokens == 104  # ⌈415 characters / 4⌉
    assert rec.charge_micros == recomputed(rec) > 0
    assert wallet(acct.user_id).held_micros == fresh.hold_micros
    assert ledger.verify() == []


def test_a_long_stream_checkpoints_its_searches_for_the_reconciler(relay, upstream):
    """While a Responses stream with 2 searches runs, its pending record's checkpoint holds the
    searches delivered so far (what a reconciler would bill after a crash)."""
    _app, client, acct = relay
    scenario(upstream, "web_searches=2;chunks=8;delay_ms=60")
    path, body = SEARCH_CALLS["responses"]
    r = client.post(path, json={**body, "stream": True}, headers=bearer(acct), buffered=False)
    seen, checkpointed = b"", None
    for chunk in r.response:  # each step lets the stream run on, and checkpoint when it is due
        seen += chunk
        rec = only_record()
        if rec.status == "pending" and rec.web_searches:
            checkpointed = (rec.web_searches, rec.delivered_chars > 0)
    r.close()
    assert b"response.completed" in seen
    assert checkpointed == (2, True)
    rec = only_record()
    assert (rec.status, rec.web_searches) == ("ok", 2)
    assert_consistent(acct.user_id)


def test_reconcile_bills_the_checkpointed_web_searches(relay):
    """A crashed stream had checkpointed 40 characters and 2 web searches: the reconciler bills
    both, the searches at the price the record was admitted with."""
    _app, _client, acct = relay
    stale = _pending(acct, deadline_in=-timedelta(seconds=1), delivered_chars=40, web_searches=2)
    assert reconcile() == 1
    rec = db.session.get(UsageRecord, stale.record_id)
    assert (rec.output_tokens, rec.web_searches, rec.web_search_price) == (10, 2, SEARCH_PRICE)
    assert rec.charge_micros == recomputed(rec) > 2 * SEARCH_PRICE * 3 // 10
    assert_consistent(acct.user_id)


def test_reconcile_bills_the_checkpointed_processing_tier(relay):
    """A crashed stream had checkpointed that it was served at priority (×2 in the catalog): the
    reconciler bills its estimate at the tier's prices and the record names the tier."""
    _app, _client, acct = relay
    processing_tiers("gpt-4o-mini", priority=2_000_000, flex=None)
    stale = _pending(acct, deadline_in=-timedelta(seconds=1), delivered_chars=40, service_tier="priority")
    assert db.session.get(UsageRecord, stale.record_id).service_tier == "priority"
    db.session.remove()
    assert reconcile() == 1
    rec = db.session.get(UsageRecord, stale.record_id)
    assert (rec.service_tier, rec.input_price, rec.output_price) == ("priority", 300_000, 1_200_000)
    assert rec.charge_micros == recomputed(rec) > 0
    assert ledger.verify() == []


def test_reconcile_prices_a_long_prompt_at_its_models_tier(relay):
    """A crashed call of a model with a long-context tier, its estimated input (104 tokens)
    above the threshold: the reconciler bills it at the tier's prices, as its worker would."""
    _app, _client, acct = relay
    long_context("gpt-4o-mini", 100)
    stale = _pending(acct, deadline_in=-timedelta(seconds=1), delivered_chars=40)
    assert reconcile() == 1
    rec = db.session.get(UsageRecord, stale.record_id)
    assert rec.input_tokens == 104 and (rec.input_price, rec.output_price) == (300_000, 900_000)
    assert rec.charge_micros == recomputed(rec) > 0
    assert ledger.verify() == []


def test_settle_is_exactly_once_and_writes_nothing_when_the_hold_is_gone(relay):
    """settle() charges, releases, writes one ledger row and adds to the key's spend, once; a
    second settle is a no-op. If the hold has vanished (an invariant broken elsewhere), it
    fails as a whole: the record stays pending and no money moves."""
    from console.models import LedgerEntry
    from console.relay.metering import Outcome, settle

    _app, _client, acct = relay
    adm = _pending(acct, deadline_in=timedelta(minutes=5))
    before = wallet(acct.user_id)
    db.session.remove()  # end the read, so what follows sees the settle
    out = Outcome("ok", "upstream", Tokens(input=1000, output=500), latency_ms=5, attempts=1)
    assert settle(adm, out) is True
    rec = db.session.get(UsageRecord, adm.record_id)
    after = wallet(acct.user_id)
    assert rec.status == "ok" and rec.charge_micros == recomputed(rec) > 0
    assert after.balance_micros == before.balance_micros - rec.charge_micros
    assert after.held_micros == before.held_micros - adm.hold_micros == 0
    entries = db.session.scalars(select(LedgerEntry).where(LedgerEntry.ref_id == adm.request_id)).all()
    assert [(e.kind, e.amount_micros, e.balance_after_micros) for e in entries] == [
        ("usage_charge", -rec.charge_micros, after.balance_micros)]
    assert db.session.get(ApiKey, acct.key_id).spent_micros == rec.charge_micros
    db.session.remove()
    assert settle(adm, out) is False
    assert wallet(acct.user_id).balance_micros == after.balance_micros

    gone = _pending(acct, deadline_in=timedelta(minutes=5))
    ledger.release(acct.user_id, gone.hold_micros)
    db.session.remove()
    with pytest.raises(Exception, match="hold is not there"):
        settle(gone, out)
    db.session.remove()
    assert db.session.get(UsageRecord, gone.record_id).status == "pending"
    assert wallet(acct.user_id).balance_micros == after.balance_micros
    assert db.session.get(ApiKey, acct.key_id).spent_micros == rec.charge_micros
    assert ledger.verify() == []


def test_channel_secret_is_encrypted_and_urls_are_checked(relay):
    """The stored secret is ciphertext; private or plain-http URLs are refused unless allowed."""
    app, _client, _acct = relay
    row = db.session.scalars(select(Channel)).first()
    assert "sk-upstream-secret-0001" not in row.secret_enc
    assert channels.decrypt_secret(row.secret_enc) == "sk-upstream-secret-0001"
    app.config["ALLOW_PRIVATE_UPSTREAMS"] = False
    for url in ("http://api.example.com/v1", "https://127.0.0.1/v1", "https://10.1.2.3", "https://169.254.169.254",
                "https://user:pw@api.example.com", "ftp://x"):
        with pytest.raises(channels.ChannelError):
            channels.create_channel(name="x", type="openai", base_url=url, api_key="k", models="m")


def test_routing_prefers_priority_then_weight(relay):
    """Higher priority first; within a tier the weights decide the order."""
    import random
    _app, _client, _acct = relay
    with write_tx():
        db.session.execute(update(Channel).values(status="disabled"))
    for name, prio, weight in (("low", 0, 1), ("a", 5, 9), ("b", 5, 1)):
        channels.create_channel(name=name, type="openai", base_url="http://127.0.0.1:9/v1", api_key="k",
                                models="gpt-4o-mini", priority=prio, weight=weight)
    rng = random.Random(1)
    firsts = [channels.candidates("openai", "gpt-4o-mini", "test", rng)[0].name for _ in range(400)]
    assert [c.name for c in channels.candidates("openai", "gpt-4o-mini", "test", rng)][-1] == "low"
    assert 300 < firsts.count("a") < 395 and firsts.count("low") == 0


def test_admin_channel_page_adds_and_disables_without_showing_the_secret(relay):
    """Admins add a channel (PRG), the key never appears on the page, and can disable it."""
    from tests.support.web import HX, csrf_from, login, make_user
    _app, client, _acct = relay
    make_user("root@example.com", role="admin")
    login(client, "root@example.com")
    page = client.get("/admin/channels/")
    assert page.status_code == 200 and b"sk-upstream-secret-0001" not in page.data
    form = {"csrf_token": csrf_from(page.data), "name": "extra", "type": "openai",
            "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-admin-typed-secret", "models": "gpt-4o-mini",
            "groups": "", "priority": "1", "weight": "2"}
    assert client.post("/admin/channels/", data=form).status_code == 302
    bad = client.post("/admin/channels/", data={**form, "name": "x2", "models": ""}, headers=HX)
    assert bad.status_code == 422 and b'id="channel-form"' in bad.data and b"sk-admin-typed-secret" not in bad.data
    listing = client.get("/admin/channels/")
    assert b"extra" in listing.data and b"sk-admin-typed-secret" not in listing.data
    ch = db.session.scalar(select(Channel).where(Channel.name == "extra"))
    r = client.post(f"/admin/channels/{ch.id}/disable", data={"csrf_token": csrf_from(listing.data)}, headers=HX)
    assert r.status_code == 200 and b'id="channel-list"' in r.data
    db.session.expire_all()
    assert db.session.get(Channel, ch.id).status == "disabled"


def test_admin_channel_page_shows_a_paused_channel_and_enables_it_at_once(relay):
    """A paused channel says until when; staff can enable it without waiting for the probe."""
    from tests.support.web import HX, csrf_from, login, make_user
    _app, client, _acct = relay
    make_user("root@example.com", role="admin")
    login(client, "root@example.com")
    ch = db.session.scalar(select(Channel).where(Channel.type == "openai"))
    cid = ch.id
    with write_tx():
        db.session.execute(update(Channel).where(Channel.id == cid).values(
            status="auto_disabled", fail_count=5, disabled_until=utcnow() + timedelta(minutes=1)))
    listing = client.get("/admin/channels/")
    assert b"paused" in listing.data and b"probed again after" in listing.data
    r = client.post(f"/admin/channels/{cid}/enable", data={"csrf_token": csrf_from(listing.data)}, headers=HX)
    assert r.status_code == 200 and b"probed again after" not in r.data
    db.session.expire_all()
    ch = db.session.get(Channel, cid)
    assert (ch.status, ch.fail_count, ch.disabled_until) == ("enabled", 0, None)


@pytest.mark.parametrize("path,headers", [
    ("/v1/chat/completions", {}),
    ("/v1/messages", {"anthropic-version": "2023-06-01"}),
])
def test_database_unreachable_is_503_with_retry_after_not_500(path, headers):
    """No database connection (server down, too many clients): the client is told to retry
    (503 + Retry-After, in the API's own shape), never a 500."""
    app = make_app(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere")
    with app.app_context():
        client = app.test_client()
        r = client.post(path, json={"model": "gpt-4o-mini", "max_tokens": 5, "messages": HI},
                        headers={"Authorization": "Bearer sk-" + "a" * 43, **headers})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        body = r.get_json()
        if headers:
            assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
        else:
            assert body["error"]["code"] == "overloaded"
        db.engine.dispose()
