"""The bare forwarder: the ceiling of this stack for the relay benchmark.

Flask + the relay's own pooled httpx clients (console.relay.upstream.Pools), no auth, no
database, no billing: it passes every /v1 request to UPSTREAM_URL and streams the answer back
chunk by chunk, exactly the transport work the relay does. Served with the relay's own gunicorn
settings, so the gap between this and the relay is the cost of auth, admission and settlement:

    UPSTREAM_URL=http://127.0.0.1:9000 gunicorn -c python:console.gunicorn_conf bench.forwarder:app
"""
from __future__ import annotations

import os

import httpx
from flask import Flask, Response, request

from console.relay.upstream import POOL_SHARDS, Pools

UPSTREAM_URL = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:9000").rstrip("/")
# Hop-by-hop headers (RFC 9110 §7.6.1). Content-Length passes: iter_raw() yields the body
# bytes exactly as sent, so a plain reply keeps its length and is not re-chunked.
_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                  "trailer", "transfer-encoding", "upgrade", "host"))
_FORWARD = ("content-type", "accept", "x-fake-scenario", "anthropic-version", "anthropic-beta")

# The relay's pools (console/relay/upstream.py): several small httpx pools, each call on the
# one with the fewest calls in flight. FORWARDER_POOLS changes their number for experiments.
POOLS = max(1, int(os.environ.get("FORWARDER_POOLS", str(POOL_SHARDS))))

app = Flask(__name__)
_pools: list[Pools] = []


def _http() -> httpx.Client:
    # Created lazily, so each gunicorn worker builds its own pools after the fork (and after
    # the gevent worker has patched the socket module).
    if not _pools:
        _pools.append(Pools(timeout=httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=30.0),
                            allow_private=True, shards=POOLS))
    return _pools[0].pick()


@app.get("/healthz")
def healthz():
    return {"ok": True}


@app.route("/v1/<path:path>", methods=["GET", "POST"])
def forward(path: str):
    http = _http()
    headers = {k: v for k in _FORWARD if (v := request.headers.get(k))}
    headers["authorization"] = "Bearer bench-forwarder"
    upstream = http.send(
        http.build_request(request.method, f"{UPSTREAM_URL}/v1/{path}", headers=headers,
                           content=request.get_data()),
        stream=True,
    )

    def body():
        try:
            # iter_raw yields each read as it arrives: no buffering between upstream and client.
            yield from upstream.iter_raw()
        finally:
            upstream.close()

    out = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP]
    return Response(body(), status=upstream.status_code, headers=out)
