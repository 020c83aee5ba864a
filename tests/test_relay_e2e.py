"""The relay end to end: a real gunicorn (gevent workers), the real fake upstream, the official
openai and anthropic SDKs; disconnects, a killed worker, concurrency races and a log canary."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from dataclasses import replace

import anthropic
import httpx
import openai
import psycopg
import pytest
from sqlalchemy import update

from console.database import write_tx
from console.extensions import db
from console.models import Group, GroupModel, ModelPrice
from console.pricing import Prices, Tokens, quote
from console.relay.protocols import estimate_output_tokens
from tests.conftest import make_app
from tests.support.server import BIN, ROOT, flask_cli, free_port, gunicorn
from tests.support.upstream import (
    add_channels,
    assert_consistent,
    fake_reset,
    fake_stats,
    fake_upstream,
    make_account,
    records,
    seed_catalog,
    wallet,
    zstd,
)

pytestmark = pytest.mark.slow

CANARY_CLIENT = None  # the client key is random per run; its value is grepped for in the logs
CANARY_CHANNEL = "sk-canary-channel-9f3e1d7c5b"
ENV = {"ALLOW_PRIVATE_UPSTREAMS": "1", "RELAY_TOTAL_DEADLINE_S": "4", "RECONCILE_GRACE_S": "0",
       "RECONCILE_EVERY_S": "3600", "RELAY_IDLE_TIMEOUT_S": "3", "RELAY_CHECKPOINT_S": "0.2"}


@pytest.fixture(scope="module")
def upstream():
    with fake_upstream(chunks=5) as base:
        yield base


@pytest.fixture(scope="module")
def slow_upstream():
    """Streams of 40 chunks, 100 ms apart (4 s)."""
    with fake_upstream(chunks=40, delay_ms=100) as base:
        yield base


_APPS: list = []


@pytest.fixture(autouse=True)
def _dispose_apps():
    yield
    while _APPS:
        app = _APPS.pop()
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


def prepare(db_url: str, upstream: str, *, concurrency: int = 1000, credits: int = 100, **channel_kw):
    """Schema, catalog, an account and channels, written before the server starts."""
    app = make_app(db_url, ALLOW_PRIVATE_UPSTREAMS=True)
    _APPS.append(app)
    with app.app_context():
        db.create_all()
        gid = seed_catalog(concurrency=concurrency)
        acct = make_account(gid, credits=credits)
        add_channels(upstream, secret=CANARY_CHANNEL, **channel_kw)
        db.session.remove()
    return app, acct


def recomputed(rec) -> int:
    return quote(Tokens.of_record(rec), Prices.of_record(rec), rec.multiplier_ppm).charge_micros


def test_sdk_round_trips_bill_exactly_and_never_log_keys(db_url, upstream, tmp_path):
    """OpenAI chat/responses/embeddings and Anthropic messages (tools, cache) via the SDKs, stream and
    not: content unchanged, every charge recomputable, ledger = balance, no key in any log line."""
    fake_reset(upstream)
    app, acct = prepare(db_url, upstream)
    log = tmp_path / "server.log"
    words = "chunk 0 chunk 1 chunk 2 chunk 3 chunk 4"
    # Every SDK client is closed: a pooled socket left to the garbage collector fails a later test.
    with (gunicorn(db_url, workers=2, env=ENV, log_path=log) as base,
          openai.OpenAI(base_url=f"{base}/v1", api_key=acct.key, max_retries=0) as oai,
          anthropic.Anthropic(base_url=base, api_key=acct.key, max_retries=0) as claude):
        msg = [{"role": "user", "content": "hello"}]
        r = oai.chat.completions.create(model="gpt-4o-mini", messages=msg)
        assert r.choices[0].message.content == words
        text = "".join(c.choices[0].delta.content or "" for c in
                       oai.chat.completions.create(model="gpt-4o-mini", messages=msg, stream=True) if c.choices)
        assert text == words
        tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
        r = oai.chat.completions.create(model="gpt-4o-mini", tools=[tool],
                                        messages=[{"role": "user", "content": "use tool please"}])
        assert r.choices[0].message.tool_calls[0].function.name == "lookup"
        assert oai.responses.create(model="gpt-4o-mini", input="hi").output_text == words
        with oai.responses.stream(model="gpt-4o-mini", input="hi") as stream:
            assert stream.get_final_response().output_text == words
        # Codex CLI signed in with a ChatGPT account sends its Responses requests zstd-compressed.
        codex = httpx.post(f"{base}/v1/responses", timeout=30,
                           content=zstd(json.dumps({"model": "gpt-4o-mini", "input": "hi", "stream": True}).encode()),
                           headers={"Authorization": f"Bearer {acct.key}", "Content-Type": "application/json",
                                    "Content-Encoding": "zstd"})
        assert codex.status_code == 200 and "event: response.completed" in codex.text
        # Codex CLI compacts a long conversation through /responses/compact.
        compacted = oai.responses.compact(model="gpt-4o-mini", input=[{"role": "user", "content": "hi"}])
        assert compacted.object == "response.compaction" and compacted.output[-1].type == "compaction"
        assert base64.b64decode(compacted.output[-1].encrypted_content).decode() == words
        assert len(oai.embeddings.create(model="text-embedding-3-small", input=["a", "b"]).data) == 2
        assert {m.id for m in oai.models.list()} == {"gpt-4o-mini", "claude-haiku-4-5", "text-embedding-3-small"}
        assert oai.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
        assert claude.models.retrieve("claude-haiku-4-5").id == "claude-haiku-4-5"
        with pytest.raises(openai.NotFoundError):
            oai.models.retrieve("not-in-group")
        with (pytest.raises(openai.AuthenticationError),
              openai.OpenAI(base_url=f"{base}/v1", api_key="sk-" + "n" * 43, max_retries=0) as stranger):
            stranger.models.list()

        system = [{"type": "text", "text": "Be brief. " * 50, "cache_control": {"type": "ephemeral"}}]
        tools = [{"name": "search", "description": "d", "input_schema": {"type": "object"}}]
        m = claude.messages.create(model="claude-haiku-4-5", max_tokens=200, system=system, tools=tools,
                                   messages=msg)
        assert m.content[0].text == words and m.usage.cache_creation_input_tokens > 0
        with claude.messages.stream(model="claude-haiku-4-5", max_tokens=200, system=system, tools=tools,
                                    messages=[{"role": "user", "content": "use tool now"}]) as s:
            final = s.get_final_message()
        assert final.content[0].type == "tool_use" and final.usage.cache_read_input_tokens > 0
        assert claude.messages.count_tokens(model="claude-haiku-4-5", messages=msg).input_tokens > 0

    with app.app_context():
        recs = records()
        assert len(recs) == 10 and all(r.status == "ok" and r.usage_source == "upstream" for r in recs)
        assert [r.endpoint for r in recs].count("responses_compact") == 1
        assert all(r.charge_micros == recomputed(r) for r in recs)
        assert sum(r.cache_write_5m_tokens for r in recs) > 0 and sum(r.cache_read_tokens for r in recs) > 0
        assert wallet(acct.user_id).balance_micros == 100_000_000 - sum(r.charge_micros for r in recs)
        assert_consistent(acct.user_id)
    text = log.read_text()
    assert "/v1/chat/completions" in text  # the access log was written
    assert acct.key not in text and CANARY_CHANNEL not in text and acct.key[3:15] not in text


def test_web_searches_through_both_sdks_are_billed_per_search(db_url, upstream):
    """Claude's web_search server tool and OpenAI's hosted web search, whole and streamed, via
    the official SDKs through gunicorn: the SDKs read the search blocks and items the relay
    passed on, and each record bills the 2 searches at the model's price on top of its tokens."""
    fake_reset(upstream)
    app, acct = prepare(db_url, upstream, openai_models="gpt-4o-mini=fake-model@web_searches=2",
                        anthropic_models="claude-haiku-4-5=fake-model@web_searches=2")
    msg = [{"role": "user", "content": "what is new?"}]
    claude_search = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]
    with (gunicorn(db_url, workers=2, env=ENV) as base,
          openai.OpenAI(base_url=f"{base}/v1", api_key=acct.key, max_retries=0) as oai,
          anthropic.Anthropic(base_url=base, api_key=acct.key, max_retries=0) as claude):
        m = claude.messages.create(model="claude-haiku-4-5", max_tokens=200, tools=claude_search, messages=msg)
        assert [b.type for b in m.content] == ["server_tool_use", "web_search_tool_result"] * 2 + ["text"]
        assert m.usage.server_tool_use.web_search_requests == 2
        with claude.messages.stream(model="claude-haiku-4-5", max_tokens=200, tools=claude_search,
                                    messages=msg) as s:
            final = s.get_final_message()
        assert [b.type for b in final.content] == ["server_tool_use", "web_search_tool_result"] * 2 + ["text"]
        r = oai.responses.create(model="gpt-4o-mini", input="what is new?", tools=[{"type": "web_search"}])
        assert [o.type for o in r.output] == ["web_search_call", "web_search_call", "message"]
        with oai.responses.stream(model="gpt-4o-mini", input="what is new?", tools=[{"type": "web_search"}]) as st:
            assert [o.type for o in st.get_final_response().output] == ["web_search_call"] * 2 + ["message"]

    with app.app_context():
        recs = records()
        assert [(r.endpoint, r.stream, r.status, r.web_searches, r.web_search_price) for r in recs] == [
            ("messages", False, "ok", 2, 10_000), ("messages", True, "ok", 2, 10_000),
            ("responses", False, "ok", 2, 10_000), ("responses", True, "ok", 2, 10_000)]
        for r in recs:
            assert r.charge_micros == recomputed(r)
            tokens_only = quote(replace(Tokens.of_record(r), web_searches=0), Prices.of_record(r), r.multiplier_ppm)
            assert r.official_cost_pico - tokens_only.official_pico == 2 * 10_000 * 10**6
        assert wallet(acct.user_id).balance_micros == 100_000_000 - sum(r.charge_micros for r in recs)
        assert_consistent(acct.user_id)


def test_client_disconnect_closes_upstream_and_bills_delivered(db_url, slow_upstream):
    """A client leaving after 3 chunks: the upstream sees the close within 2 s; billed input + delivered."""
    upstream = slow_upstream
    fake_reset(upstream)
    app, acct = prepare(db_url, upstream)
    with gunicorn(db_url, workers=2, env=ENV) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {acct.key}"},
                          json={"model": "gpt-4o-mini", "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]}, timeout=10) as resp:
            got = 0
            for line in resp.iter_lines():
                got += '"content":" chunk' in line or '"content":"chunk' in line
                if got == 3:
                    break
            left = time.monotonic()
        while fake_stats(upstream)["closed_early"] < 1:
            assert time.monotonic() - left < 2.0, "upstream never saw the client leave"
            time.sleep(0.05)
        deadline = time.monotonic() + 5
        with app.app_context():
            while records()[0].status == "pending":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            rec = records()[0]
            assert (rec.status, rec.usage_source) == ("partial", "estimated")
            # 3 chunks read, a few more were in flight when the close was seen
            assert len("chunk 0 chunk 1 chunk 2") <= rec.delivered_chars <= len(" chunk 10") * 10
            assert rec.output_tokens == estimate_output_tokens(rec.delivered_chars, 0)
            assert rec.charge_micros == recomputed(rec) > 0
            assert_consistent(acct.user_id)


def _gunicorn_proc(db_url: str, port: int) -> subprocess.Popen:
    env = {**os.environ, **ENV, "DATABASE_URL": db_url, "BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "1"}
    return subprocess.Popen([str(BIN / "gunicorn"), "-c", "python:console.gunicorn_conf", "app:app"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_killed_worker_is_settled_by_reconcile(db_url, slow_upstream):
    """kill -9 of the worker mid-stream leaves a pending record; `flask reconcile` settles it once."""
    upstream = slow_upstream
    fake_reset(upstream)
    app, acct = prepare(db_url, upstream)
    port = free_port()
    proc = _gunicorn_proc(db_url, port)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        with httpx.stream("POST", f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {acct.key}"},
                          json={"model": "gpt-4o-mini", "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]}, timeout=10) as resp:
            lines = resp.iter_lines()
            for _ in range(8):
                next(lines)
            # The stream has checkpointed what it delivered (what the reconciler bills) before the kill.
            for _ in range(100):
                with app.app_context():
                    if records()[0].delivered_chars > 0:
                        break
                time.sleep(0.05)
            workers = subprocess.run(["pgrep", "-P", str(proc.pid)], check=False, capture_output=True, text=True).stdout.split()
            assert workers
            for pid in workers:
                os.kill(int(pid), signal.SIGKILL)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    with app.app_context():
        assert [r.status for r in records()] == ["pending"]
        assert wallet(acct.user_id).held_micros > 0
    time.sleep(4.2)  # past the deadline (4 s total, no grace in this test)
    assert "reconciled 1 " in flask_cli(db_url, "reconcile", env=ENV).stdout
    assert "reconciled 0 " in flask_cli(db_url, "reconcile", env=ENV).stdout
    with app.app_context():
        rec = records()[0]
        assert (rec.status, rec.usage_source) == ("partial", "estimated") and "reconciler" in rec.error
        assert rec.charge_micros == recomputed(rec) > 0
        assert_consistent(acct.user_id)


def _hold_wallet_lock(db_url: str, user_id: int):
    """Takes what a settle must wait for (the SQLite write lock, the PostgreSQL wallet row) on a
    connection of the test's own; returns the function that lets it go."""
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
    else:
        conn = psycopg.connect(db_url.replace("+psycopg", "", 1))
        conn.execute("SELECT 1 FROM wallets WHERE user_id = %s FOR UPDATE", (user_id,))

    def release():
        conn.execute("ROLLBACK")
        conn.close()
    return release


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_the_client_has_the_whole_reply_before_the_settle(db_url, slow_upstream, stream):
    """The settle runs when the server closes the response, after its last byte: while a lock
    holds the settle up, the client already has the complete reply (the end of the stream, or
    the whole JSON body), the record is still pending, and it is billed once the lock goes."""
    fake_reset(slow_upstream)
    app, acct = prepare(db_url, slow_upstream)
    got: dict = {}
    env = {**ENV, "RELAY_TOTAL_DEADLINE_S": "30", "RELAY_IDLE_TIMEOUT_S": "10", "RELAY_CHECKPOINT_S": "60"}
    with gunicorn(db_url, workers=1, env=env) as base:
        def call():
            body = {"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=20,
                              headers={"Authorization": f"Bearer {acct.key}"}) as resp:
                got["body"] = resp.read().decode()
        client = threading.Thread(target=call)
        client.start()
        with app.app_context():
            for _ in range(200):  # admitted: the upstream now takes 4 s to answer
                if records():
                    break
                time.sleep(0.02)
        release = _hold_wallet_lock(db_url, acct.user_id)
        try:
            client.join(timeout=15)
            assert not client.is_alive(), "the reply waited for the settle"
            words = " ".join(f"chunk {i}" for i in range(40))
            if stream:
                assert got["body"].rstrip().endswith("data: [DONE]")
            else:
                assert json.loads(got["body"])["choices"][0]["message"]["content"] == words, got["body"]
            with app.app_context():
                assert [r.status for r in records()] == ["pending"]
        finally:
            release()
        with app.app_context():
            deadline = time.monotonic() + 10
            while records()[0].status == "pending":
                assert time.monotonic() < deadline, "never settled after the lock went"
                time.sleep(0.05)
            rec = records()[0]
            assert (rec.status, rec.usage_source) == ("ok", "upstream")
            assert rec.charge_micros == recomputed(rec) > 0
            assert_consistent(acct.user_id)


async def _fire(base: str, key: str, n: int, body: dict, stream: bool = False) -> list[int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def one():
            if not stream:
                r = await client.post(f"{base}/v1/chat/completions", json=body,
                                      headers={"Authorization": f"Bearer {key}"})
                return r.status_code
            async with client.stream("POST", f"{base}/v1/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {key}"}) as r:
                await r.aread()
                return r.status_code
        return await asyncio.gather(*(one() for _ in range(n)))


def test_thousand_concurrent_calls_never_overdraw(db_url, upstream):
    """Balance for exactly 500 calls, 1,000 at once: at most 500 succeed, the rest 402, no overdraft."""
    fake_reset(upstream)
    app, acct = prepare(db_url, upstream, credits=0, openai_models="per-call=fake-model")
    with app.app_context():
        from console import ledger
        with write_tx():
            m = ModelPrice(name="per-call", provider="openai", kind="chat", input_price=0, output_price=0,
                           per_call_price=10_000, max_output_tokens=100, context_window=1000)
            db.session.add(m)
            db.session.flush()
            db.session.add(GroupModel(group_id=acct.group_id, model_id=m.id))
        per_call = quote(Tokens(), Prices(per_call=10_000), 300_000).charge_micros
        ledger.credit(acct.user_id, 500 * per_call, kind="voucher_credit", ref_type="test", ref_id="race")
    # Money, not latency, is under test: 1,000 calls on 2 shared cores may take longer than 4 s.
    with gunicorn(db_url, workers=2, env={**ENV, "RELAY_TOTAL_DEADLINE_S": "120"}) as base:
        codes = asyncio.run(_fire(base, acct.key, 1000, {"model": "per-call", "messages": [{"role": "user", "content": "x"}]}))
    assert set(codes) <= {200, 402}
    assert codes.count(200) <= 500 and codes.count(200) >= 100
    with app.app_context():
        w = wallet(acct.user_id)
        assert w.balance_micros >= 0 and w.balance_micros == (500 - codes.count(200)) * per_call
        assert len(records()) == codes.count(200)
        assert_consistent(acct.user_id)


def test_group_concurrency_limit_holds_across_workers(db_url, slow_upstream):
    """Limit 5, 50 parallel streams over 2 workers: the upstream never sees more than 5; the rest 429."""
    upstream = slow_upstream
    fake_reset(upstream)
    app, acct = prepare(db_url, upstream, concurrency=5)
    with gunicorn(db_url, workers=2, env=ENV) as base:
        fake_reset(upstream)
        codes = asyncio.run(_fire(base, acct.key, 50, {"model": "gpt-4o-mini", "stream": True,
                                                     "messages": [{"role": "user", "content": "x"}]}, stream=True))
    assert set(codes) <= {200, 429} and 5 <= codes.count(200) < 50
    assert fake_stats(upstream)["max_in_flight"] <= 5
    with app.app_context():
        assert len(records()) == codes.count(200)
        with write_tx():
            db.session.execute(update(Group).values(concurrency_limit=5))
        assert_consistent(acct.user_id)
