"""Upstream address pinning (DNS rebinding): each connection resolves the channel's host once,
checks every address, and connects to the address it checked. Against the real fake upstream
on 127.0.0.1; only name resolution is replaced, to play a DNS server whose answer changes."""
from __future__ import annotations

import socket

import httpcore
import pytest
from sqlalchemy import select

from console import channels
from console.database import write_tx
from console.extensions import db
from console.models import Channel
from console.relay.upstream import PinnedBackend, close_client
from tests.conftest import make_app
from tests.support.upstream import (
    assert_consistent,
    fake_reset,
    fake_stats,
    fake_upstream,
    make_account,
    records,
    seed_catalog,
)

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream():
    with fake_upstream() as base:
        yield base


class Dns:
    """socket.getaddrinfo for `*.test` names: answers from a script, counts the questions."""

    def __init__(self, monkeypatch, *answers: str):
        self.answers, self.asked = list(answers), []
        real = socket.getaddrinfo

        def lookup(host, port, *args, **kwargs):
            if isinstance(host, str) and host.endswith(".test"):
                self.asked.append(host)
                address = self.answers[min(len(self.asked), len(self.answers)) - 1]
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
            return real(host, port, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", lookup)


def test_the_connection_goes_to_the_address_that_was_checked(monkeypatch, upstream):
    """One resolution per connection: a second answer (the rebinding) is never asked for."""
    port = int(upstream.rsplit(":", 1)[1])
    dns = Dns(monkeypatch, "127.0.0.1", "10.0.0.1")
    stream = PinnedBackend(allow_private=True).connect_tcp("api.rebind.test", port, timeout=2)
    try:
        assert stream.get_extra_info("server_addr")[0] == "127.0.0.1"
    finally:
        stream.close()
    assert dns.asked == ["api.rebind.test"]


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.0.10", "0.0.0.0"])
def test_a_host_resolving_to_a_non_public_address_is_refused(monkeypatch, address):
    Dns(monkeypatch, address)
    with pytest.raises(httpcore.ConnectError, match="non-public"):
        PinnedBackend(allow_private=False).connect_tcp("api.rebind.test", 443, timeout=2)


@pytest.fixture
def relay(db_url, upstream):
    fake_reset(upstream)
    app = make_app(db_url, ALLOW_PRIVATE_UPSTREAMS=False, RELAY_RETRY_BASE_S=0.01)
    with app.app_context():
        db.create_all()
        acct = make_account(seed_catalog())
        db.session.remove()
        yield app, app.test_client(), acct
        close_client(app)
        db.session.remove()
        db.engine.dispose()


def test_a_channel_whose_name_now_resolves_inside_is_never_called(relay, upstream, monkeypatch):
    """A channel saved while its host was public, whose DNS now answers a loopback address:
    the relay refuses to connect (502, nothing billed), counts the channel's failure, and the
    internal service never sees the request or the channel's key."""
    app, client, acct = relay
    port = int(upstream.rsplit(":", 1)[1])
    with write_tx():  # as saved when the name was public (creation would refuse it now)
        db.session.add(Channel(name="rebound", type="openai", base_url=f"http://api.rebind.test:{port}/v1",
                               secret_enc=channels.encrypt_secret("sk-rebound-channel-key"),
                               models="gpt-4o-mini", groups="", priority=0, weight=1, status="enabled",
                               fail_count=0))
    db.session.remove()
    Dns(monkeypatch, "127.0.0.1")
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI},
                    headers={"Authorization": f"Bearer {acct.key}"})
    assert r.status_code == 502, r.get_data(as_text=True)
    assert b"sk-rebound-channel-key" not in r.data and b"rebind" not in r.data
    assert fake_stats(upstream)["requests"] == 0
    ch = db.session.scalar(select(Channel).where(Channel.name == "rebound"))
    assert ch.fail_count >= 1 and "non-public" in ch.last_error
    assert [(x.status, x.charge_micros) for x in records()] == [("failed", 0)]
    assert_consistent(acct.user_id)


_READABLE_SCRIPT = r"""
import sys
if sys.argv[1] == "gevent":
    from gevent import monkey
    monkey.patch_all()
    import select

    def cooperative_poll(*args, **kwargs):
        raise AssertionError("the cooperative poll() was used")

    select.poll = cooperative_poll  # what httpcore's own check would call
import socket, time
from console.relay.upstream import PinnedBackend

def readable(stream, want):
    for _ in range(200):  # the peer's bytes cross loopback asynchronously
        if stream.get_extra_info("is_readable") == want:
            return want
        time.sleep(0.005)
    return not want

server = socket.create_server(("127.0.0.1", 0))
stream = PinnedBackend(allow_private=True).connect_tcp("127.0.0.1", server.getsockname()[1], timeout=2)
peer, _ = server.accept()
seen = [stream.get_extra_info("is_readable")]
peer.sendall(b"x")
seen.append(readable(stream, True))
seen.append(stream.read(10, timeout=2) == b"x")
seen.append(stream.get_extra_info("is_readable"))
peer.close()  # the upstream closed an idle keep-alive connection
seen.append(readable(stream, True))
stream.close()
print(" ".join(map(str, seen)))
"""


@pytest.mark.parametrize("runtime", ["threads", "gevent"])
def test_an_idle_connection_is_readable_only_when_the_upstream_sent_or_closed(runtime):
    """httpcore drops a pooled connection it finds readable while idle (the upstream closed it).
    The relay's streams answer that with the operating system's poll(), also under gevent,
    whose cooperative poll() costs a hub round trip per pooled connection per request."""
    import subprocess
    import sys

    from tests.support.server import ROOT

    res = subprocess.run([sys.executable, "-c", _READABLE_SCRIPT, runtime], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "True", "True", "False", "True"]


def test_every_pool_shares_one_verifying_tls_context():
    """Building a TLS context loads the CA bundle; one per shard stalled a new worker's first
    call for about a second. Sharing one must not loosen verification."""
    import ssl

    import httpx

    from console.relay.upstream import POOL_SHARDS, PinnedBackend, Pools

    pools = Pools(timeout=httpx.Timeout(5.0), allow_private=False)
    try:
        transports = [counted._inner for counted, _client in pools._shards]
        contexts = {id(t._pool._ssl_context) for t in transports}
        assert len(transports) == POOL_SHARDS and len(contexts) == 1
        ctx = transports[0]._pool._ssl_context
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        assert all(isinstance(t._pool._network_backend, PinnedBackend) for t in transports)
    finally:
        pools.close()
