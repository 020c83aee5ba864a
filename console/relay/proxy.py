"""One relay call end to end: route → admit → forward → pass through → settle.

The relay views parse the request and call `relay_call()` (or `count_tokens()`); this module
never reads `flask.request`. It returns a `Reply` (status, headers, body bytes or a
generator). No database transaction is open while the upstream is being talked to: the
admission transaction commits and the session is closed before the first upstream byte, and
the streaming generator settles in its own short transaction in its `finally`, which runs
on every exit: normal end, upstream error, total deadline, or the client going away
(gunicorn closes the response iterator, raising GeneratorExit at the paused `yield`).
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import httpx
from flask import current_app

from console import channels
from console.extensions import db
from console.logging_setup import redact
from console.pricing import Tokens
from console.relay import metering, setting
from console.relay.auth import Caller, ModelInfo
from console.relay.errors import RelayError
from console.relay.metering import Admission, Outcome
from console.relay.protocols import (
    CHAT,
    COMPACT,
    MESSAGES,
    RESPONSES,
    UNBELIEVABLE_USAGE,
    StreamMeter,
    Surface,
    believable,
    dumps,
    loads,
    prepare_body,
    searches_in,
    text_from_json,
    usage_from_json,
)
from console.relay.upstream import UpstreamFailure, open_call

MAX_REPLY_BYTES = 64 * 1024 * 1024  # a whole reply, or one event of a stream, held in memory
PASSED_RESPONSE_HEADERS = ("content-type",)


@dataclass
class Reply:
    status: int
    body: bytes | Iterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Call:
    surface: Surface
    body: dict
    caller: Caller
    model: ModelInfo
    client_headers: dict[str, str]
    client_ip: str | None
    request_id: str

    @property
    def stream(self) -> bool:
        return self.surface.can_stream and self.body.get("stream") is True


def _ms(since: float) -> int:
    return int((time.monotonic() - since) * 1000)


def _upstream_id(resp: httpx.Response) -> str | None:
    return resp.headers.get("x-request-id") or resp.headers.get("request-id")


def _candidates(call: Call):
    found = channels.candidates(call.surface.channel_type, call.model.name, call.caller.group.slug)
    if not found:
        raise RelayError(503, "No upstream channel serves this model right now.", code="no_channel")
    return found


def _coding(resp: httpx.Response) -> str:
    return resp.headers.get("content-encoding", "").strip().lower()


def _check_coding(resp: httpx.Response, attempts: int, channel_id: int) -> None:
    """The relay asks for identity, but an upstream behind a misconfigured proxy may compress
    anyway. gzip and deflate are decoded (their ratio bounds what one read can expand to,
    ~1,000 × 64 KiB); any other coding is refused before a byte reaches the client: the client
    is sent no Content-Encoding, and the usage is read from these bytes."""
    coding = _coding(resp)
    if coding not in ("", "identity", "gzip", "deflate"):
        resp.close()
        raise UpstreamFailure(502, f"The upstream sent a reply in a content coding the relay does not read "
                                   f"({coding[:40]}).", attempts, channel_id)


def _body(resp: httpx.Response) -> Iterator[bytes]:
    """The reply's bytes as they come, decoded by httpx if the upstream gzipped them."""
    return resp.iter_raw() if _coding(resp) in ("", "identity") else resp.iter_bytes()


def _read_all(resp: httpx.Response, deadline: float) -> bytes:
    parts, size = [], 0
    for chunk in _body(resp):
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise RelayError(502, "The upstream reply is too large.")
        if time.monotonic() > deadline:
            raise RelayError(504, "The upstream did not finish within the deadline.")
        parts.append(chunk)
    return b"".join(parts)


def _fail(adm: Admission, started: float, error: str, attempts: int, channel_id: int | None,
          upstream_id: str | None = None) -> None:
    metering.settle(adm, Outcome("failed", "upstream", latency_ms=_ms(started), attempts=attempts,
                                 channel_id=channel_id, upstream_request_id=upstream_id, error=error))


def _release_session() -> None:
    """Close the request's ORM session, if it has one: most calls never open one (admission and
    settle run on raw transactions), and scoped_session.close() would first create it."""
    if db.session.registry.has():
        db.session.close()


# Request options with which the provider charges other than the catalog's standard prices:
# (surfaces, field, the values priced as standard, what the others cost). Refused, not
# stripped, so a client is told plainly what it does not get.
_UNPRICED_OPTIONS = (
    ((CHAT, RESPONSES, COMPACT), "service_tier", ("auto", "default"),
     "priority processing costs up to 2x the standard prices, flex half of them, and the "
     "catalog prices neither for this model"),
    ((MESSAGES,), "speed", ("standard",),
     "fast mode costs 2-6x the standard prices, and the catalog does not price it for this model"),
    ((MESSAGES,), "inference_geo", ("global",), "US-only inference costs 1.1x the standard prices"),
)


# OpenAI hosted tools the provider charges per use on top of the tokens, which the relay does
# not bill: refused, so a call never runs them on the channel's account unbilled.
_UNBILLED_TOOLS = {
    "image_generation": "each image costs $0.01-0.25",
    "code_interpreter": "each container costs $0.03 or more",
    "file_search": "it costs $2.50 per 1,000 calls",
}


def _refuse_unpriced_options(call: Call) -> None:
    tools = call.body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(kind, str):
            continue
        if call.surface in (CHAT, RESPONSES, COMPACT) and kind in _UNBILLED_TOOLS:
            raise RelayError(400, f"The hosted tool '{kind}' is not offered here: {_UNBILLED_TOOLS[kind]} on "
                                  "the provider's side, which this relay does not bill. Remove it from 'tools'.",
                             code="unsupported_parameter")
        if call.surface is MESSAGES and kind.startswith("advisor_"):
            # The advisor's own sampling is another model's, billed at that model's prices.
            raise RelayError(400, "The advisor tool is not offered here: its advice is another model's "
                                  "tokens, which this relay does not bill. Remove it from 'tools'.",
                             code="unsupported_parameter")
    fallbacks = call.body.get("fallbacks")
    if call.surface is MESSAGES and fallbacks is not None and fallbacks != []:
        raise RelayError(400, "Server-side fallbacks are not offered here: a substitute model would serve "
                              "the call at its own prices; leave 'fallbacks' out.", code="unsupported_parameter")
    for surfaces, name, standard, why in _UNPRICED_OPTIONS:
        value = call.body.get(name)
        if (name in ("service_tier", "speed") and isinstance(value, str) and call.model.prices.offers(value)
                and call.surface is not COMPACT):
            continue  # the catalog prices this tier (a compaction's reply never says which one served it)
        if call.surface in surfaces and value is not None and not (isinstance(value, str) and value in standard):
            shown = repr(value)[:40] if isinstance(value, str) else "that value"
            allowed = " or ".join(f"'{v}'" for v in standard)
            raise RelayError(400, f"{name} {shown} is not offered here: calls are billed at standard prices "
                                  f"({why}); send {allowed} or leave it out.", code="unsupported_parameter")


def relay_call(call: Call) -> Reply:
    """Admit, forward and bill one call (chat, responses, messages, embeddings)."""
    if call.surface is RESPONSES and call.body.get("background") is True:
        # The upstream would answer at once ("queued") and generate afterwards, on the
        # channel's account: the relay bills a call when it ends and would never see that end.
        raise RelayError(400, "Background responses are not supported here: send the request without "
                              "'background' (streaming is supported).", code="unsupported_parameter")
    _refuse_unpriced_options(call)
    est = metering.estimate(call.body)
    metering.check_rate(call.caller)
    routes = _candidates(call)
    # The catalog and channel caches may have refreshed through the session: give its
    # connection back before admission takes one of its own (holding one while waiting for
    # another lets a burst of calls exhaust the pool and wait on each other).
    _release_session()
    adm = metering.admit(call.caller, call.model, request_id=call.request_id,
                         endpoint=call.surface.name, stream=call.stream, est=est, client_ip=call.client_ip)
    _release_session()  # nothing of ours stays open while the upstream works
    try:
        return _forward(call, adm, routes)
    except RelayError as exc:
        exc.admitted = True
        raise


def _forward(call: Call, adm: Admission, routes) -> Reply:
    """Everything after the admission: open the upstream, pass the reply on, settle."""
    cfg = current_app.config
    started = adm.started
    deadline = started + cfg["RELAY_TOTAL_DEADLINE_S"]
    try:
        opened = _open(routes, call, deadline)
    except UpstreamFailure as exc:
        _fail(adm, started, exc.message, exc.attempts, exc.channel_id)
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
        raise RelayError(exc.status, exc.message, code="upstream_error", headers=headers) from None
    except BaseException:
        _fail(adm, started, "relay error before the upstream answered", 0, None)
        raise
    resp, route = opened.response, opened.route
    up_id = _upstream_id(resp)
    ctype = resp.headers.get("content-type", "application/json")

    if resp.status_code >= 300 or "text/event-stream" not in ctype:
        try:
            data = _read_all(resp, deadline)
        except (RelayError, httpx.HTTPError) as exc:
            status = exc.status if isinstance(exc, RelayError) else 502
            _fail(adm, started, redact(str(exc))[:300] or type(exc).__name__, opened.attempts, route.id, up_id)
            raise RelayError(status, "The upstream reply was cut short." if status == 502 else str(exc)) from None
        except BaseException:
            _fail(adm, started, "relay error while reading the reply", opened.attempts, route.id, up_id)
            raise
        finally:
            resp.close()
        if resp.status_code >= 300:
            # A client error the upstream rejected (bad parameters…): passed on as is, not billed.
            _fail(adm, started, f"upstream status {resp.status_code}", opened.attempts, route.id, up_id)
            return Reply(resp.status_code, data, {"content-type": ctype})
        try:
            obj = loads(data)
        except ValueError:
            _fail(adm, started, "upstream reply is not JSON", opened.attempts, route.id, up_id)
            raise RelayError(502, "The upstream sent an unreadable reply.") from None
        tokens = usage_from_json(call.surface, obj)
        if tokens is not None and believable(tokens):
            out = Outcome("ok", "upstream", tokens)
        else:
            text = text_from_json(call.surface, obj)
            out = Outcome("ok", "estimated", Tokens(
                input=adm.est_input_tokens,
                output=metering.estimate_output_tokens(len(text), 0),
                web_searches=searches_in(call.surface, obj),
                service_tier=obj.get("service_tier") if isinstance(obj.get("service_tier"), str) else ""),
                error=UNBELIEVABLE_USAGE if tokens is not None else None)
        out.latency_ms = out.ttfb_ms = _ms(started)
        out.attempts, out.channel_id, out.upstream_request_id = opened.attempts, route.id, up_id
        return Reply(200, _WholeBody(current_app._get_current_object(), data, adm, out),
                     {"content-type": ctype, "content-length": str(len(data))})

    meter = StreamMeter(call.surface, strip_usage_chunk=opened.strip)
    gen = _StreamBody(_stream(current_app._get_current_object(), call, adm, opened, meter, deadline, up_id))
    return Reply(200, gen, {"content-type": ctype, "cache-control": "no-cache",
                            "x-accel-buffering": "no"})


@dataclass
class _Opened:
    route: object
    response: httpx.Response
    attempts: int
    strip: bool


def _open(routes, call: Call, deadline: float) -> _Opened:
    # Each channel may map the public model name differently, so the body is built per route;
    # the common case (one mapping) serializes once.
    bodies: dict[str, tuple[bytes, bool]] = {}

    def body_for(route) -> tuple[bytes, bool]:
        name = route.models[call.model.name]
        if name not in bodies:
            b, strip = prepare_body(call.surface, call.body, name)
            bodies[name] = (dumps(b), strip)
        return bodies[name]

    opened = open_call(routes, call.surface, body_for, call.client_headers, deadline)
    _check_coding(opened.response, opened.attempts, opened.route.id)
    return _Opened(opened.route, opened.response, opened.attempts, body_for(opened.route)[1])


def _settle_logged(app, adm: Admission, out: Outcome) -> None:
    with app.app_context():
        try:
            metering.settle(adm, out)
        except Exception:  # the reconciler will settle it; never lose the error
            app.logger.exception("settle failed for %s", adm.request_id)


class _WholeBody:
    """A complete (non-streamed) reply. Its settle runs in close(), which the WSGI server calls
    after the last byte is written (gunicorn, werkzeug), so the client never waits for the
    billing commit; it runs also when that write failed: the upstream served the call, so it is
    billed in full, as before the body was sent. Exactly once, like a stream's settle."""

    def __init__(self, app, data: bytes, adm: Admission, out: Outcome):
        self._app, self._data, self._adm, self._out = app, data, adm, out

    def __iter__(self):
        return iter((self._data,))

    def close(self) -> None:
        adm, self._adm = self._adm, None
        if adm is not None:
            _settle_logged(self._app, adm, self._out)


class _StreamBody:
    """The response iterable. A generator closed before its first step never runs its
    `finally`, so close() first steps into it: the settle then runs on every path.

    The stream ends for the server at the generator's _END, where the generator waits: the
    server writes the end of the response (the last chunk) and only then calls close(), which
    settles. So the client has the whole reply before the billing commit starts."""

    def __init__(self, gen):
        self._gen = gen
        self._started = False

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        self._started = True
        chunk = next(self._gen)
        if chunk is _END:
            raise StopIteration
        return chunk

    def close(self) -> None:
        if not self._started:
            self._started = True
            try:
                next(self._gen)  # to the first (empty) yield
                self._gen.send(_NOT_STARTED)
            except StopIteration:
                pass
        self._gen.close()


_NOT_STARTED = object()
_END = object()


def _error_event(call: Call, message: str) -> bytes:
    if call.surface is MESSAGES:
        obj = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(obj).encode() + b"\n\n"
    obj = {"error": {"message": message, "type": "server_error", "param": None, "code": "upstream_error"}}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _stream(app, call: Call, adm: Admission, opened: _Opened, meter: StreamMeter, deadline: float,
            up_id: str | None) -> Iterator[bytes]:
    resp = opened.response
    with app.app_context():
        checkpoint_every = setting("RELAY_CHECKPOINT_S")
    next_checkpoint = time.monotonic() + checkpoint_every
    ttfb = None
    broke: str | None = None
    client_gone = done = False
    try:
        if (yield b"") is _NOT_STARTED:  # closed before the first step: nothing reached the client
            client_gone = True
            return
        try:
            for chunk in _body(resp):
                events = meter.feed(chunk)
                if events:
                    if ttfb is None:
                        ttfb = _ms(adm.started)
                    # One write per upstream read, however many events it held.
                    yield events[0] if len(events) == 1 else b"".join(events)
                if len(meter.buf) > MAX_REPLY_BYTES:  # one event this large: memory, not a reply
                    broke = "upstream event beyond the size limit"
                    break
                now = time.monotonic()
                if now > deadline:
                    broke = "total deadline exceeded"
                    break
                if now > next_checkpoint and (meter.chars or meter.searches_seen):
                    next_checkpoint = now + checkpoint_every
                    with app.app_context():
                        try:
                            metering.checkpoint(adm.record_id, meter.chars, meter.searches_seen,
                                                adm.prices.tier_served(meter.service_tier))
                        except Exception:  # progress only: a busy database must not cut the stream
                            app.logger.warning("checkpoint skipped for %s", adm.request_id, exc_info=True)
            else:
                rest = meter.rest()
                if rest:
                    yield rest
        except httpx.HTTPError as exc:
            broke = redact(f"upstream stream broke: {type(exc).__name__}")
        if broke:
            yield _error_event(call, "The upstream stream was interrupted.")
        done = True
        yield _END  # close() comes after the server has written the end of the response
    except GeneratorExit:
        client_gone = not done
        raise
    finally:
        resp.close()
        out = _stream_outcome(adm, meter, broke, client_gone)
        out.latency_ms, out.ttfb_ms = _ms(adm.started), ttfb
        out.attempts, out.channel_id, out.upstream_request_id = opened.attempts, opened.route.id, up_id
        out.delivered_chars = meter.chars
        _settle_logged(app, adm, out)


def _stream_outcome(adm: Admission, meter: StreamMeter, broke: str | None, client_gone: bool) -> Outcome:
    """The policy table (see metering) applied to what the stream delivered."""
    # A web search's call or results reached the client: output, even before any text.
    delivered = meter.chars > 0 or meter.deltas > 0 or meter.searches_seen > 0
    if meter.complete_usage:
        return Outcome("ok", "upstream", meter.usage)
    if broke or client_gone or meter.errored:
        reason = "client disconnected" if client_gone else (broke or "upstream error event")
        if not delivered:
            return Outcome("failed", "upstream", error=f"{reason} before any output")
        return Outcome("partial", "estimated", _estimated_usage(adm, meter), error=reason)
    return Outcome("ok", "estimated", _estimated_usage(adm, meter),
                   error=UNBELIEVABLE_USAGE if meter.unbelievable else "no usage from upstream")


def _estimated_usage(adm: Admission, meter: StreamMeter) -> Tokens:
    """Input as reported (Anthropic's message_start) or estimated, the output delivered, and
    the web searches whose results were delivered."""
    base = meter.usage if meter.input_reported else Tokens(input=adm.est_input_tokens)
    return replace(base, output=meter.output_tokens_estimate,
                   web_searches=max(base.web_searches, meter.searches_seen), service_tier=meter.service_tier)


def count_tokens(call: Call) -> Reply:
    """Anthropic's free token counter: authenticated, rate limited and routed, but not billed."""
    metering.estimate(call.body)  # the same field checks as a billed call (400 on bad values)
    metering.check_rate(call.caller)
    routes = _candidates(call)
    _release_session()
    deadline = time.monotonic() + current_app.config["RELAY_TOTAL_DEADLINE_S"]
    try:
        opened = _open(routes, call, deadline)
    except UpstreamFailure as exc:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
        raise RelayError(exc.status, exc.message, code="upstream_error", headers=headers) from None
    resp = opened.response
    try:
        data = _read_all(resp, deadline)
    except httpx.HTTPError:
        raise RelayError(502, "The upstream reply was cut short.") from None
    finally:
        resp.close()
    return Reply(resp.status_code, data, {"content-type": resp.headers.get("content-type", "application/json")})
