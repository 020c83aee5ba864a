"""Generated malformed bodies against the relay: always a 4xx, never a 5xx, never a charge."""
from __future__ import annotations

import gzip
import json
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from console.extensions import db
from console.relay.content_coding import decode
from console.relay.errors import RelayError
from console.relay.upstream import close_client
from tests.conftest import make_app
from tests.support.upstream import add_channels, make_account, records, seed_catalog, wallet, zstd

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=20), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=12)
BAD_MODEL = st.one_of(st.none(), st.integers(), st.booleans(), st.just(""), st.text(min_size=101, max_size=120),
                      st.lists(st.text(max_size=3), max_size=2))
BAD_FIELDS = st.one_of(
    st.fixed_dictionaries({"model": BAD_MODEL, "messages": JSON}),
    st.fixed_dictionaries({"model": st.just("gpt-4o-mini"), "stream": JSON.filter(lambda v: not isinstance(v, bool))}),
    st.fixed_dictionaries({"model": st.just("gpt-4o-mini"),
                           "max_tokens": JSON.filter(lambda v: v is not None and not (isinstance(v, int) and not isinstance(v, bool)
                                                                    and 1 <= v <= 10_000_000))}),
    st.fixed_dictionaries({"model": st.text(min_size=1, max_size=30).filter(
        lambda m: m not in ("gpt-4o-mini", "claude-haiku-4-5", "text-embedding-3-small", "not-in-group"))}),
)
BODIES = st.one_of(
    st.binary(max_size=200).map(lambda b: (b, "application/json")),
    JSON.filter(lambda v: not isinstance(v, dict)).map(lambda v: (json.dumps(v).encode(), "application/json")),
    BAD_FIELDS.map(lambda v: (json.dumps(v).encode(), "application/json")),
    BAD_FIELDS.map(lambda v: (json.dumps(v).replace("null", "NaN", 1).encode(), "application/json")),
    st.fixed_dictionaries({"model": st.just("gpt-4o-mini")}).map(lambda v: (json.dumps(v).encode(), "text/plain")),
)
# Content-Encoding headers, accepted or not; a body is sent encoded as its header says, or not.
CODINGS = st.sampled_from([None, "identity", "gzip", "x-gzip", "deflate", "zstd", "gzip, zstd", "br",
                           "gzip, gzip, gzip"])
UNACCEPTED = ("br", "gzip, gzip, gzip")
_ENCODERS = {"gzip": gzip.compress, "x-gzip": gzip.compress, "deflate": zlib.compress, "zstd": zstd}


def _encode(data: bytes, coding: str | None) -> bytes:
    for name in (coding or "").split(","):
        data = _ENCODERS.get(name.strip(), bytes)(data)
    return data


PATHS = st.sampled_from(["/v1/chat/completions", "/v1/responses", "/v1/responses/compact", "/v1/messages",
                         "/v1/embeddings", "/v1/messages/count_tokens"])


@pytest.fixture
def fuzz_relay(db_url):
    app = make_app(db_url, ALLOW_PRIVATE_UPSTREAMS=True)
    with app.app_context():
        db.create_all()
        acct = make_account(seed_catalog())
        add_channels("http://127.0.0.1:9")  # never reached: every body is refused before routing
        db.session.remove()
        yield app.test_client(), acct
        close_client(app)
        db.session.remove()
        db.engine.dispose()


def test_malformed_bodies_never_5xx_and_never_charge(fuzz_relay):
    """1,000 generated malformed bodies on every surface: 4xx each time; no record, balance intact."""
    client, acct = fuzz_relay
    seen = set()

    @settings(max_examples=1000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(body=BODIES, path=PATHS, coding=CODINGS, encoded=st.booleans())
    def check(body, path, coding, encoded):
        data, ctype = body
        headers = {"Authorization": f"Bearer {acct.key}"} | ({"Content-Encoding": coding} if coding else {})
        r = client.post(path, data=_encode(data, coding) if encoded else data, content_type=ctype, headers=headers)
        assert 400 <= r.status_code < 500, (r.status_code, coding, data[:200], r.data[:200])
        assert r.headers["x-request-id"].startswith("req_")
        seen.add(r.status_code)

    check()
    assert records() == [] and wallet(acct.user_id).balance_micros == 100_000_000 and wallet(acct.user_id).held_micros == 0
    assert {400, 415} <= seen


@settings(max_examples=500, deadline=None, database=None)
@given(data=st.binary(max_size=3000), coding=CODINGS, encoded=st.booleans(), limit=st.integers(0, 4000))
def test_a_body_is_decoded_whole_or_refused_with_a_clear_4xx(data, coding, encoded, limit):
    """Whatever the bytes and the header: the body as sent, or 400 (not that coding), 413
    (decoded beyond the limit) or 415 (a coding not accepted); never another exception."""
    sent = _encode(data, coding) if encoded else data
    try:
        out = decode(sent, coding, limit)
    except RelayError as exc:
        assert exc.status in (400, 413, 415), exc.status
        if coding in UNACCEPTED:
            assert exc.status == 415
        elif encoded:
            assert exc.status == 413 and len(data) > limit
        return
    assert coding not in UNACCEPTED
    if encoded or coding in (None, "identity"):
        assert out == data
    if coding not in (None, "identity"):
        assert len(out) <= limit


# ---- well-formed requests with arbitrary content, arbitrary upstream JSON -------------------
# JSON schemas in tools carry "type": ["string", "null"]; a real coding agent's request did.
ANY_TYPE = st.one_of(st.sampled_from(["image", "image_url", "document", "text"]), JSON)
CONTENT = st.recursive(
    JSON, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(["type", "text", "content", "x"]), c,
                                                              max_size=4)
    | st.fixed_dictionaries({"type": ANY_TYPE, "text": c}),
    max_leaves=20)


@settings(max_examples=500, deadline=None, database=None)
@given(content=CONTENT, extra=st.dictionaries(st.sampled_from(["tools", "input", "system", "messages"]), CONTENT,
                                              max_size=3))
def test_estimate_reads_any_request_content(content, extra):
    """The hold's size estimate walks any JSON a well-formed request may carry without failing."""
    from console.relay.metering import estimate

    body = {"model": "gpt-4o-mini", "messages": content, **extra}
    est = estimate(body)
    assert est.text_bytes >= est.text_chars >= 0 and est.images >= 0 and est.files >= 0
    if not est.images and not est.files:  # then every string value counts, in UTF-8 bytes
        assert est.text_bytes == sum(len(v.encode("utf-8", "surrogatepass")) for v in _string_values(body))


def _string_values(v):
    if isinstance(v, str):
        yield v
    elif isinstance(v, (dict, list)):
        for x in v.values() if isinstance(v, dict) else v:
            yield from _string_values(x)


@settings(max_examples=500, deadline=None, database=None)
@given(event=JSON, surface=st.sampled_from(["chat", "responses", "messages"]))
def test_usage_readers_accept_any_upstream_json(event, surface):
    """Malformed upstream JSON (fields of unexpected types) is passed on and never breaks a call."""
    from console.relay.protocols import CHAT, MESSAGES, RESPONSES, StreamMeter, text_from_json, usage_from_json

    surf = {"chat": CHAT, "responses": RESPONSES, "messages": MESSAGES}[surface]
    shaped = [event, {"type": event}, {"choices": event}, {"choices": [event]}, {"choices": [{"delta": event}]},
              {"type": "response.completed", "response": event}, {"type": "content_block_delta", "delta": event},
              {"type": "message_start", "message": event}, {"output": [event]}, {"content": [event]},
              {"choices": [{"message": event}]}, {"usage": event}]
    meter = StreamMeter(surf, strip_usage_chunk=True)
    for obj in shaped:
        data = json.dumps(obj).encode()
        assert meter.feed(b"data: " + data + b"\n\n") in ([], [b"data: " + data + b"\n\n"])
        text_from_json(surf, obj)
        usage_from_json(surf, obj)


_DELTA = st.text(max_size=6).map(lambda t: {"choices": [{"index": 0, "delta": {"content": t}}]})
_USAGE = st.integers(0, 10**6).map(lambda n: {"choices": [], "usage": {"prompt_tokens": n, "completion_tokens": 3}})
_EVENT = st.one_of(
    st.one_of(_DELTA, _USAGE).map(lambda o: b"data: " + json.dumps(o).encode() + b"\n\n"),
    st.one_of(_DELTA, _USAGE).map(lambda o: b"data:" + json.dumps(o).encode() + b"\r\n\r\n"),
    st.just(b"data: [DONE]\n\n"), st.just(b": keep-alive\n\n"),
    st.tuples(st.text(max_size=5), _DELTA).map(
        lambda p: f"event: {p[0]!r}\ndata: ".encode() + json.dumps(p[1]).encode() + b"\n\n"),
    st.binary(max_size=12),  # anything else, incl. stray newlines and half events
)


@settings(max_examples=300, deadline=None, database=None)
@given(events=st.lists(_EVENT, max_size=8), cuts=st.lists(st.integers(0, 400), max_size=10),
       strip=st.booleans())
def test_stream_meter_reads_the_same_however_the_stream_is_cut(events, cuts, strip):
    """The bytes passed on and the usage and output counted do not depend on where the
    upstream's reads split the stream (one whole event per read takes a shorter path)."""
    from console.relay.protocols import CHAT, StreamMeter

    stream = b"".join(events)

    def run(pieces):
        meter = StreamMeter(CHAT, strip_usage_chunk=strip)
        out = b"".join(b"".join(meter.feed(p)) for p in pieces) + meter.rest()
        return out, meter.chars, meter.deltas, meter.usage, meter.errored

    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    pieces = [stream[a:b] for a, b in zip(bounds, bounds[1:])]
    whole = run([stream])
    assert run(pieces) == whole
    assert run(events) == whole  # one read per event, as a well-behaved upstream sends them
    assert run([stream[i:i + 1] for i in range(len(stream))]) == whole


def _reference_split(stream: bytes) -> tuple[list[bytes], bytes]:
    """Events as SSE ends them, the plain way: the earliest blank line ("\n\n" or "\r\n\r\n")
    searched again from the start of what is left."""
    events = []
    while True:
        i, j = stream.find(b"\n\n"), stream.find(b"\r\n\r\n")
        if i < 0 and j < 0:
            return events, stream
        end = j + 4 if j >= 0 and (i < 0 or j < i) else i + 2
        events.append(stream[:end])
        stream = stream[end:]


@settings(max_examples=400, deadline=None, database=None)
@given(stream=st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"\n\n", b"\r\n\r\n", b"data: x", b":"]),
                       max_size=40).map(b"".join),
       cuts=st.lists(st.integers(0, 120), max_size=12))
def test_stream_meter_ends_events_where_the_plain_split_does(stream, cuts):
    """The meter searches each read only from where its last search stopped; the events it
    passes on are the plain split's, wherever the reads cut a terminator."""
    from console.relay.protocols import CHAT, StreamMeter

    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    meter = StreamMeter(CHAT, strip_usage_chunk=False)
    events = [e for a, b in zip(bounds, bounds[1:]) for e in meter.feed(stream[a:b])]
    assert (events, meter.rest()) == _reference_split(stream)


def test_stream_meter_reads_an_unterminated_last_event():
    """A stream that ends inside its last event: the data line is still read (and passed on)."""
    from console.relay.protocols import CHAT, StreamMeter

    meter = StreamMeter(CHAT, strip_usage_chunk=False)
    last = b'data: {"choices":[{"index":0,"delta":{"content":"abc"}}]}\nX'
    assert meter.feed(last) == [] and meter.rest() == last
    assert (meter.chars, meter.deltas) == (3, 1)


# Any JSON value, integers of any size and text of any character outside the surrogates.
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=16)


@settings(max_examples=500, deadline=None, database=None)
@given(value=ANY_JSON)
def test_hot_path_json_reads_and_writes_what_the_standard_library_does(value):
    """protocols.dumps writes the same values as json.dumps, big integers included (orjson
    refuses them, the standard library writes them); protocols.loads reads the same values as
    json.loads wherever integers fit in 64 bits."""
    from console.relay.protocols import dumps, loads

    encoded = dumps(value)
    assert isinstance(encoded, bytes) and json.loads(encoded) == value
    std = json.dumps(value).encode()
    if not _has_big_int(value):
        assert loads(std) == json.loads(std)


def _has_big_int(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return not -(2**63) <= v < 2**64
    if isinstance(v, list):
        return any(_has_big_int(x) for x in v)
    if isinstance(v, dict):
        return any(_has_big_int(x) for x in v.values())
    return False


@pytest.mark.parametrize("raw", [b'{"a": NaN}', b'\xef\xbb\xbf{"a": 1}', b'"\\ud800"', b"[" * 1100 + b"]" * 1100,
                                 b'{"a": 1e999}', b'{"a": 1, "a": 2}'])
def test_hot_path_json_reads_what_orjson_refuses_as_the_standard_library_does(raw):
    from console.relay.protocols import loads

    def outcome(fn):
        try:
            return ("ok", repr(fn(raw)))
        except (ValueError, RecursionError) as exc:
            return ("refused", type(exc).__name__)

    assert outcome(loads) == outcome(json.loads)


@pytest.mark.parametrize("count", [b"3000000000", b"100000000000000000000", b"3e9", b"1.5e30"])
def test_a_usage_count_out_of_range_in_any_number_form_is_not_believed(count):
    """However an upstream spells a count beyond 2^31 - 1 (an integer past 64 bits is read as a
    float), the usage is not believed, in a whole reply and in a stream."""
    from console.relay.protocols import CHAT, MESSAGES, StreamMeter, believable, loads, usage_from_json

    reply = loads(b'{"usage": {"prompt_tokens": ' + count + b', "completion_tokens": 2}}')
    assert not believable(usage_from_json(CHAT, reply))
    meter = StreamMeter(MESSAGES, strip_usage_chunk=False)
    meter.feed(b'data: {"type": "message_start", "message": {"usage": {"input_tokens": ' + count + b'}}}\n\n')
    meter.feed(b'data: {"type": "message_delta", "usage": {"output_tokens": 2}}\n\n')
    assert meter.unbelievable and meter.usage is None and not meter.complete_usage
