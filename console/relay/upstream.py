"""The HTTP side of the relay: pooled httpx clients per process, headers, retries, failover.

- Per worker process, POOL_SHARDS httpx clients (`Pools`), created lazily after the fork (a
  client inherited across fork would share sockets between processes); each call takes the one
  with the fewest calls in flight. `follow_redirects=False`: the relay only ever talks to a
  channel's staff-configured base URL.
- Timeouts: connect, per-chunk idle read (bounded by what is left of the call's total
  deadline) and the total deadline itself, which the caller checks between chunks, so a
  drip-feeding upstream cannot hold a call forever.
- Addresses: every connection resolves the channel's host itself, refuses non-public addresses
  (unless ALLOW_PRIVATE_UPSTREAMS) and connects to the address it checked (PinnedBackend), so
  DNS rebinding cannot turn a channel into a request to an internal service.
- Headers: only an allowlist of the client's headers is forwarded; the channel's key is set
  here. Client credentials, cookies, X-Forwarded-* and hop-by-hop headers never go upstream,
  and cookies an upstream sets are dropped (the pooled clients are shared by all users).
- Retry / failover happen only here, i.e. before the first byte reaches the client: on
  connect errors, resets before the response, 5xx, 429 (Retry-After honoured up to a cap) and
  401/403 (the channel's key is bad), at most RELAY_MAX_ATTEMPTS attempts, with exponential
  backoff and jitter when the same channel is tried again. A read timeout before the response
  headers is not retried: the upstream may already be generating (and billing) the call.
"""
from __future__ import annotations

import functools
import math
import os
import random
import select
import socket
import ssl
import time
from dataclasses import dataclass

import httpcore
import httpx
from flask import current_app

from console import channels
from console.channels import Route
from console.logging_setup import redact
from console.relay import setting
from console.relay.protocols import Surface

FORWARDED_HEADERS = ("accept", "user-agent", "anthropic-version", "anthropic-beta", "openai-beta")
ANTHROPIC_VERSION = "2023-06-01"
MAX_ERROR_BODY = 64 * 1024


# httpcore's pool scans all its connections each time a request starts and a response closes,
# so one pool holding hundreds of streams costs time quadratic in its size. Calls therefore go
# to the pool with the fewest calls in flight, the first one on a tie: a few busy pools stay
# small, and at a light load every call goes to the first pool, whose idle connection is still
# alive (httpx drops one idle for 5 s), so no call pays a new TCP and TLS handshake.
POOL_SHARDS = 32


class PinnedBackend(httpcore.SyncBackend):
    """Connects only to addresses it has checked, and to exactly those.

    The host is resolved here, every address must be public (channels.is_public_address)
    unless private upstreams are allowed, and the socket connects to a checked address rather
    than resolving the name again: a DNS answer that changes between the check and the
    connection (DNS rebinding) cannot send a channel's key to an internal service. TLS is
    unchanged: httpcore still sends the host name as SNI and verifies the certificate against it.
    """

    def __init__(self, *, allow_private: bool):
        self.allow_private = allow_private

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"the upstream host does not resolve ({type(exc).__name__})") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not self.allow_private and not all(channels.is_public_address(a) for a in addresses):
            raise httpcore.ConnectError("the upstream host resolves to a non-public address; refused")
        last: Exception = httpcore.ConnectError("the upstream host has no address")
        for address in addresses:
            try:
                return _Stream(super().connect_tcp(address, port, timeout, local_address, socket_options))
            except httpcore.ConnectTimeout:
                raise
            except httpcore.ConnectError as exc:
                last = exc
        raise last


def _real_poll():
    """The operating system's poll(), also where gevent has patched the select module."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return select.poll
    return monkey.get_original("select", "poll")


_POLL = _real_poll()


class _Stream(httpcore.NetworkStream):
    """A connection to an upstream, as httpcore's own, but with a cheaper readability check.

    httpcore asks every pooled connection whether its idle socket is readable (the upstream
    closed it) each time a request starts or a response closes. Its check calls select.poll(),
    which gevent replaces with a cooperative version that sets up watchers and yields to the
    hub, per pooled connection: at 256 slow streams that cost about a third of the relay's
    throughput (bench/README.md, finding 16). A zero-timeout poll() never blocks, so the
    operating system's own is used; the answer is the same."""

    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def read(self, max_bytes, timeout=None):
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer, timeout=None):
        self._inner.write(buffer, timeout)

    def close(self):
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info):
        if info == "is_readable":
            sock = self._inner.get_extra_info("socket")
            if sock is None or sock.fileno() < 0:
                return True
            p = _POLL()
            p.register(sock.fileno(), select.POLLIN)
            return bool(p.poll(0))
        return self._inner.get_extra_info(info)


def _transport(allow_private: bool, ssl_context) -> httpx.HTTPTransport:
    transport = httpx.HTTPTransport(verify=ssl_context,
                                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
    # httpx takes no network backend; its connection pool does (httpcore 1.x, pinned in pyproject).
    pool = transport._pool
    if not isinstance(pool, httpcore.ConnectionPool) or not hasattr(pool, "_network_backend"):
        raise RuntimeError("unexpected httpx transport: cannot pin upstream addresses")
    pool._network_backend = PinnedBackend(allow_private=allow_private)
    return transport


class _NoCookies(httpx.Cookies):
    """A cookie jar that stays empty: the pooled clients serve every user's calls, so a cookie
    an upstream sets on one reply (a CDN's bot-management cookie, say) is neither kept nor sent
    with the calls after it. It also spares httpx's cookie parsing of every response."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass

    def set_cookie_header(self, request: httpx.Request) -> None:
        pass


class _Client(httpx.Client):
    """An httpx client whose cookies are always _NoCookies."""

    @property
    def cookies(self) -> httpx.Cookies:
        return _NoCookies()

    @cookies.setter
    def cookies(self, value) -> None:
        raise AttributeError("the upstream clients keep no cookies")


class _Counted(httpx.BaseTransport):
    """A transport that counts its calls in flight: from the request until its response is
    closed (or the request failed). Only a hint for choosing a pool (an event loop's calls do
    not race; threads could miscount by one, which only moves a call to another pool)."""

    def __init__(self, inner: httpx.BaseTransport):
        self._inner, self.active = inner, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.active += 1
        try:
            resp = self._inner.handle_request(request)
        except BaseException:
            self.active -= 1
            raise
        resp.stream = _CountedStream(resp.stream, self)
        return resp

    def close(self) -> None:
        self._inner.close()


class _CountedStream(httpx.SyncByteStream):
    def __init__(self, inner, owner: _Counted):
        self._inner, self._owner = inner, owner

    def __iter__(self):
        return iter(self._inner)

    def close(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.active -= 1
        self._inner.close()


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One TLS context per process, for every shard and app: building one loads the CA bundle
    (~30 ms of CPU), which per shard stalled a new worker's event loop for a second at its
    first call. It holds no connection state, so a context made before a fork stays usable."""
    return httpx.create_ssl_context()


class Pools:
    """A process's httpx clients to upstreams: `shards` clients, each with its own connection
    pool on a PinnedBackend, no cookies, no redirects. pick() gives the one with the fewest
    calls in flight, the first on a tie (see POOL_SHARDS). The benchmark's bare forwarder uses
    it too, so the two do the same transport work."""

    def __init__(self, *, timeout: httpx.Timeout, allow_private: bool, shards: int = POOL_SHARDS,
                 transport: httpx.BaseTransport | None = None):
        self._shards = []
        ssl_context = _ssl_context() if transport is None else None
        for _ in range(1 if transport is not None else shards):
            counted = _Counted(transport or _transport(allow_private, ssl_context))
            self._shards.append((counted, _Client(timeout=timeout, follow_redirects=False, transport=counted)))

    def pick(self) -> httpx.Client:
        return min(self._shards, key=_in_flight)[1]

    def in_flight(self) -> list[int]:
        return [counted.active for counted, _client in self._shards]

    def close(self) -> None:
        for _counted, c in self._shards:
            c.close()


def _in_flight(shard) -> int:
    return shard[0].active


def client() -> httpx.Client:
    """This process's pooled client with the fewest calls in flight (created after the fork)."""
    app = current_app._get_current_object()
    held = app.extensions.get("relay_http")
    if held is None or held[0] != os.getpid():
        cfg = app.config
        held = app.extensions["relay_http"] = (os.getpid(), Pools(
            timeout=httpx.Timeout(connect=cfg["RELAY_CONNECT_TIMEOUT_S"], read=cfg["RELAY_IDLE_TIMEOUT_S"],
                                  write=30.0, pool=5.0),
            allow_private=bool(cfg.get("ALLOW_PRIVATE_UPSTREAMS")),
            transport=cfg.get("RELAY_TRANSPORT")))  # tests may put an httpx.MockTransport at the network edge
    return held[1].pick()


def request_headers(route: Route, client_headers: dict[str, str]) -> dict[str, str]:
    h = {k: v for k, v in client_headers.items() if k in FORWARDED_HEADERS}
    h["content-type"] = "application/json"
    # Identity encoding: usage is read from the bytes on their way through.
    h["accept-encoding"] = "identity"
    if route.type == "anthropic":
        h.setdefault("anthropic-version", ANTHROPIC_VERSION)
        h["x-api-key"] = route.secret
    else:
        h["authorization"] = f"Bearer {route.secret}"
    return h


@dataclass
class Opened:
    route: Route
    response: httpx.Response
    attempts: int


class UpstreamFailure(Exception):
    """Every attempt failed before a response could be passed on; safe to show (no URL, no key)."""

    def __init__(self, status: int, message: str, attempts: int, channel_id: int | None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.attempts = status, message, attempts
        self.channel_id, self.retry_after = channel_id, retry_after


RETRY_AFTER_MAX_S = 86_400  # what a Retry-After is read as at most (and passed on as)
ERROR_BODY_MAX = 64 * 1024  # what is read of a failed attempt's reply before its connection is dropped


def _retry_after(resp: httpx.Response) -> float | None:
    """Seconds, if the upstream sent a number of them ("inf", "nan" and dates are no number)."""
    raw = resp.headers.get("retry-after")
    try:
        value = float(raw) if raw is not None else math.nan
    except ValueError:
        return None
    return min(max(0.0, value), RETRY_AFTER_MAX_S) if math.isfinite(value) else None


def discard(resp: httpx.Response) -> None:
    """A reply whose body is not wanted (a failed attempt, a probe): read to its end if it is
    small, so its connection can serve the next call; a larger one is not read on (nothing
    bounds what an upstream sends)."""
    try:
        size = 0
        for chunk in resp.iter_raw():
            size += len(chunk)
            if size > ERROR_BODY_MAX:
                break
    except (httpx.HTTPError, httpx.StreamError):  # cut short, or already read (a mock transport's)
        pass
    finally:
        resp.close()


def open_call(routes: list[Route], surface: Surface, body_for, client_headers: dict[str, str],
              deadline: float) -> Opened:
    """A 2xx or a client-error (4xx) response, headers read and body not yet; or UpstreamFailure.

    body_for(route) → (bytes, …): each channel may map the model name differently.
    """
    cfg = current_app.config
    max_attempts = int(setting("RELAY_MAX_ATTEMPTS"))
    base = setting("RELAY_RETRY_BASE_S")
    retry_after_cap = setting("RELAY_RETRY_AFTER_MAX_S")
    http = client()
    last = UpstreamFailure(502, "No upstream attempt was made.", 0, None)
    for attempt in range(max_attempts):
        route = routes[attempt % len(routes)]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamFailure(504, "The upstream did not answer within the deadline.", attempt,
                                  route.id)
        timeout = httpx.Timeout(connect=min(cfg["RELAY_CONNECT_TIMEOUT_S"], remaining),
                                read=min(cfg["RELAY_IDLE_TIMEOUT_S"], remaining), write=30.0, pool=5.0)
        req = http.build_request("POST", route.base_url + surface.path, content=body_for(route)[0],
                                 headers=request_headers(route, client_headers), timeout=timeout)
        wait = None
        try:
            resp = http.send(req, stream=True)
        except httpx.TimeoutException as exc:
            if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
                channels.record_failure(route.id, f"connect timeout: {type(exc).__name__}")
                last = UpstreamFailure(502, "The upstream could not be reached.", attempt + 1, route.id)
            else:
                channels.record_failure(route.id, f"read timeout before response: {type(exc).__name__}")
                raise UpstreamFailure(504, "The upstream timed out.", attempt + 1, route.id) from None
        except httpx.TransportError as exc:
            channels.record_failure(route.id, redact(f"{type(exc).__name__}: {exc}")[:300])
            last = UpstreamFailure(502, "The upstream could not be reached.", attempt + 1, route.id)
        else:
            code = resp.status_code
            if code < 400 or (code < 500 and code not in (401, 403, 429)):
                channels.record_success(route)
                return Opened(route, resp, attempt + 1)
            discard(resp)
            if code == 429:
                wait = _retry_after(resp)
                ra = int(wait) if wait is not None else 1
                last = UpstreamFailure(429, "The upstream is rate limited; retry later.", attempt + 1,
                                       route.id, retry_after=max(1, ra))
                if wait is not None and wait > retry_after_cap:
                    wait = None if len(routes) > 1 else wait
                    if wait is not None:
                        raise last
            else:
                channels.record_failure(route.id, f"upstream status {code}")
                last = UpstreamFailure(502, f"The upstream failed (status {code}).", attempt + 1, route.id)
        if attempt + 1 < max_attempts:
            next_route = routes[(attempt + 1) % len(routes)]
            if next_route.id == route.id:
                delay = wait if wait is not None else min(2.0, base * 2 ** attempt) * random.uniform(0.5, 1.5)
                if time.monotonic() + delay >= deadline:
                    break
                time.sleep(delay)
    raise last


def close_client(app) -> None:
    """Close this process's pooled client (app teardown, tests)."""
    held = app.extensions.pop("relay_http", None)
    if held is not None:
        held[1].close()
