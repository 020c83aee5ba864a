"""Fake LLM provider for end-to-end tests and benchmarks.

Owns a gevent WSGI server that speaks the OpenAI (chat completions, responses and their
compaction, embeddings, models) and Anthropic (messages, count_tokens) wire formats faithfully
enough for the official SDKs, with per-request fault scenarios and JSON
observability endpoints under /_fake/.

Run:  python -m bench.fake_upstream --port 0 --host 127.0.0.1 [--chunks N] [--delay-ms N] [--log]
It prints "LISTENING <port>" on stdout once it accepts connections.

Scenario knobs, written "k=v,k=v" (or "k=v;k=v", which fits in a channel's comma-separated
model list), merged in rising priority from the CLI defaults,
the model name suffix ("fake-model@chunks=20,delay_ms=30") and the x-fake-scenario
request header (unknown knobs are a 400, so typos do not pass silently). status,
fail_first and hang_before_ms apply to every /v1 endpoint; the others shape the
text-generating ones (chat completions, responses, messages):
  chunks=N           content deltas to emit (default --chunks)
  delay_ms=N         sleep before each delta; a non-stream reply waits chunks*delay_ms
                     before its headers, like a provider generating the whole answer
  status=CODE        fail at once with CODE in the provider's error shape (429 adds retry-after: 1)
  fail_first=N       the first N requests with the same x-fake-key header value fail with 500
                     (no header is a key of its own; POST /_fake/reset forgets the counts)
  hang_before_ms=N   sleep before sending the response headers
  drip_ms=N          first send an SSE comment (non-stream: a space) every N ms for 120 s,
                     so an idle-read timeout never fires but a total deadline does
  reset_after=K      after K deltas (K <= chunks) reset the TCP connection, no terminator;
                     a non-stream reply is cut half way through its body
  huge_after=K       after K deltas emit one 1 MB event (a data line of "x", not JSON), then
                     carry on (streams only)
  malformed_after=K  after K deltas emit a data: line that is not JSON, then carry on;
                     a non-stream reply body is not JSON
  no_usage=1         omit usage everywhere (OpenAI: no usage chunk even if asked for;
                     Anthropic: no usage in message, message_start or message_delta)
  cached_tokens=N    report N cached prompt tokens in OpenAI usage (capped at the prompt)
  input_tokens=N     report N input tokens in usage instead of counting them (a provider
                     whose usage is wrong)
  set_cookie=1       set a cookie on the reply, as a provider behind a CDN does (__cf_bm)
  gzip=1             gzip the reply (a stream flushed event by event) although the request
                     asked for identity, as a misconfigured proxy in front of a provider does
  web_searches=N     run N server-side web searches before answering (Responses and
                     Messages): N web_search_call output items, or N server_tool_use +
                     web_search_tool_result block pairs with usage.server_tool_use; a stream
                     sends them before the first delta
  failed_searches=N  of those, the last N failed (a failed web_search_call; a
                     web_search_tool_result whose content is an error), which providers do
                     not bill
  discounted_searches=N  Responses: report tool_usage (web_search.num_requests, the billable
                     searches) on the finished response, N fewer than the searches that ran
                     (without the knob no tool_usage is sent, as by older API versions)
  compaction_tokens=N  Messages: the reply reports a server-side compaction whose own usage
                     (N input, N // 10 output tokens) is in usage.iterations and not in the
                     top-level usage fields, as Anthropic reports it (a stream: in message_delta)
  standard_only=1    report service_tier "default" even when priority, fast or flex was asked
                     for (OpenAI; otherwise the tier asked for is reported), and usage.speed
                     "standard" even when speed "fast" was (Anthropic)

Token counting is deliberately simple and deterministic. Input tokens = the
characters of every string reached through the keys messages, system, input,
instructions, prompt, content and text (tool definitions excluded), // 4, + 1.
Output tokens = the number of deltas. Delta i is "chunk i" (with a leading space
after the first), so a whole answer reads "chunk 0 chunk 1 ... chunk N-1"; a tool
call's JSON arguments are split into N deltas instead.

Anthropic prompt caching: the prefix up to the last block with cache_control (tools,
then system, then message blocks) costs prefix_chars // 4 + 1 tokens, reported as
cache_creation_input_tokens the first time that prefix is seen and as
cache_read_input_tokens afterwards; input_tokens is the rest, as the real API does.

All state lives in one FakeUpstream instance, used from gevent greenlets only, so
the counters need no locks.
"""

if __name__ == "__main__":
    # Patch only when run as a server; tests that import this module stay unpatched.
    from gevent import monkey

    monkey.patch_all()

import argparse
import base64
import hashlib
import itertools
import json
import resource
import signal
import socket
import struct
import sys
import time
import zlib
from http import HTTPStatus

import gevent
from gevent import pywsgi

DRIP_LIMIT_S = 120
DEFAULT_MODELS = ("fake-model", "fake-embedding-model")
_KNOBS = frozenset(
    (
        "chunks",
        "delay_ms",
        "status",
        "fail_first",
        "hang_before_ms",
        "drip_ms",
        "reset_after",
        "malformed_after",
        "huge_after",
        "no_usage",
        "cached_tokens",
        "input_tokens",
        "set_cookie",
        "gzip",
        "web_searches",
        "failed_searches",
        "discounted_searches",
        "standard_only",
        "compaction_tokens",
    )
)
_TEXT_KEYS = ("messages", "system", "input", "instructions", "prompt", "content", "text")
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_OPENAI_ERRORS = {  # status -> (type, code)
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "unknown_url"),
    429: ("requests", "rate_limit_exceeded"),
}


class _Abort(Exception):
    """Raised by a response body to make the server drop the connection on the spot."""


def _dumps(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def _data(obj):
    return b"data: " + _dumps(obj) + b"\n\n"


def _sse(event, obj):
    return b"event: " + event.encode() + b"\ndata: " + _dumps(obj) + b"\n\n"


def _text_chars(node):
    if isinstance(node, str):
        return len(node)
    if isinstance(node, list):
        return sum(_text_chars(item) for item in node)
    if isinstance(node, dict):
        return sum(_text_chars(node[key]) for key in _TEXT_KEYS if key in node)
    return 0


def _reported_input(call):
    return call.sc.get("input_tokens") or _input_tokens(call.body)


def _input_tokens(body):
    return _text_chars(body) // 4 + 1


def _words(n):
    return [f"{' ' if i else ''}chunk {i}" for i in range(n)]


def _searches(call):
    """(query, failed) for each web search the scenario asks for."""
    n = call.sc.get("web_searches", 0)
    failed = min(call.sc.get("failed_searches", 0), n)
    return [(f"query {i}", i >= n - failed) for i in range(n)]


def _search_blocks(call):
    """Anthropic: a server_tool_use block and its web_search_tool_result per search."""
    blocks = []
    for i, (query, failed) in enumerate(_searches(call)):
        tool_id = f"srvtoolu_{call.rid}_{i}"
        blocks.append({"type": "server_tool_use", "id": tool_id, "name": "web_search",
                       "input": {"query": query}})
        content = (
            {"type": "web_search_tool_result_error", "error_code": "unavailable"}
            if failed
            else [{"type": "web_search_result", "url": f"https://example.com/{i}",
                   "title": f"Result {i}", "encrypted_content": "ZmFrZQ==", "page_age": None}]
        )
        blocks.append({"type": "web_search_tool_result", "tool_use_id": tool_id, "content": content})
    return blocks


def _served_tier(call):
    """OpenAI's reported processing tier: the one asked for (priority, flex), else default;
    standard_only=1 serves every call at default, as when priority capacity is exhausted."""
    asked = call.body.get("service_tier")
    if call.sc.get("standard_only") or asked not in ("priority", "fast", "flex"):
        return "default"
    return asked


def _split(text, parts):
    size = len(text)
    return [text[size * i // parts : size * (i + 1) // parts] for i in range(parts)]


def _tool_call(body, chunks):
    """(tool name, argument deltas) if tools are offered and the last user turn says "use tool"."""
    tools = body.get("tools")
    if not tools:
        return None, None
    users = [
        m for m in body.get("messages") or () if isinstance(m, dict) and m.get("role") == "user"
    ]
    content = users[-1].get("content") if users else ""
    if isinstance(content, list):
        content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
    if "use tool" not in str(content):
        return None, None
    first = tools[0]
    name = first.get("name") or (first.get("function") or {}).get("name") or "tool"
    arguments = json.dumps({"query": "".join(_words(chunks))})
    return name, _split(arguments, max(chunks, 1))


def _cache_prefix(body):
    """Anthropic cache order is tools, system, messages; the prefix ends at the last cache_control."""
    items = list(body.get("tools") or ())
    if isinstance(body.get("system"), list):
        items += body["system"]
    for message in body.get("messages") or ():
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            items += [dict(block, role=message.get("role")) for block in message["content"]]
    marks = [
        i for i, item in enumerate(items) if isinstance(item, dict) and "cache_control" in item
    ]
    return items[: marks[-1] + 1] if marks else None


def _parse_scenario(text):
    knobs = {}
    for item in text.replace(";", ",").split(","):
        key, sep, value = item.strip().partition("=")
        if not key:
            continue
        if key not in _KNOBS or not sep or not value.strip().isdigit():
            raise ValueError(f"bad fake scenario item {item.strip()!r}")
        knobs[key] = int(value)
    return knobs


def _status_line(code):
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Error"


def _drip(every_ms, keepalive):
    deadline = time.monotonic() + DRIP_LIMIT_S
    while time.monotonic() < deadline:
        yield keepalive
        gevent.sleep(every_ms / 1000)


def _abort(sock):
    """Hang up with a TCP RST: with SO_LINGER 0 the server's close() resets the connection."""
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raise _Abort


HUGE_EVENT = b"data: " + b"x" * (1 << 20) + b"\n\n"


def _paced(sc, sock, head, deltas, tail, garbage):
    """Stream head, deltas, tail, applying the drip/delay/malformed/reset knobs around the deltas."""
    if sc.get("drip_ms"):
        yield from _drip(sc["drip_ms"], b": keepalive\n\n")
    yield from head
    delay = sc["delay_ms"] / 1000
    malformed_after, reset_after = sc.get("malformed_after"), sc.get("reset_after")
    deltas = iter(deltas)
    sent = 0
    while True:
        if sent == malformed_after:
            yield garbage
        if sent == sc.get("huge_after"):
            yield HUGE_EVENT
        if sent == reset_after:
            _abort(sock)
        frame = next(deltas, None)
        if frame is None:
            break
        if delay:
            gevent.sleep(delay)
        yield frame
        sent += 1
    yield from tail


def _plain(sc, sock, data):
    if sc.get("drip_ms"):
        yield from _drip(sc["drip_ms"], b" ")  # JSON allows leading whitespace
    if "reset_after" in sc:
        yield data[: len(data) // 2]
        _abort(sock)
    yield data


def _gzip_stream(chunks):
    """One gzip member over all chunks, each flushed as it goes, so a client decodes every
    event when it arrives."""
    z = zlib.compressobj(wbits=31)
    for chunk in chunks:
        yield z.compress(chunk) + z.flush(zlib.Z_SYNC_FLUSH)
    yield z.flush()


class _Call:
    """One provider request: parsed body, resolved scenario, and reply builders."""

    __slots__ = ("anthropic", "body", "headers", "model", "rid", "sc", "sock")

    def __init__(self, environ, path, rid, headers):
        self.anthropic = path.startswith("/v1/messages")
        self.headers = headers
        self.sock = environ.get("fake_upstream.socket")
        self.rid = rid
        self.body = {}
        self.model = "fake-model"
        self.sc = {}

    def _base_headers(self, content_type):
        headers = [
            ("Content-Type", content_type),
            ("request-id" if self.anthropic else "x-request-id", self.rid),
        ]
        if self.sc.get("set_cookie"):
            headers.append(("Set-Cookie", f"__cf_bm={self.rid}; path=/; HttpOnly"))
        if self.sc.get("gzip"):
            headers.append(("Content-Encoding", "gzip"))
        return headers

    def error(self, status, message):
        if self.anthropic:
            kind = _ANTHROPIC_ERRORS.get(status, "api_error")
            body = {
                "type": "error",
                "error": {"type": kind, "message": message},
                "request_id": self.rid,
            }
        else:
            kind, code = _OPENAI_ERRORS.get(status, ("server_error", None))
            body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        _, headers, data = self.plain(body)
        if status == 429:
            headers.append(("retry-after", "1"))
        return _status_line(status), headers, data

    def plain(self, obj):
        """An immediate JSON reply, for endpoints that do not generate text."""
        data = _dumps(obj)
        headers = self._base_headers("application/json") + [("Content-Length", str(len(data)))]
        return "200 OK", headers, [data]

    def reply(self, obj):
        """A non-stream completion, shaped by the delay/drip/reset/malformed knobs."""
        sc = self.sc
        generation_ms = sc["chunks"] * sc["delay_ms"]
        if generation_ms and not sc.get("drip_ms"):
            gevent.sleep(generation_ms / 1000)
        data = b'{"id": not json at all' if "malformed_after" in sc else _dumps(obj)
        if sc.get("gzip"):
            data = zlib.compress(data, wbits=31)
        headers = self._base_headers("application/json")
        if not sc.get("drip_ms"):
            headers.append(("Content-Length", str(len(data))))
        if sc.get("drip_ms") or "reset_after" in sc:
            return "200 OK", headers, _plain(sc, self.sock, data)
        return "200 OK", headers, [data]

    def stream(self, head, deltas, tail, garbage):
        headers = self._base_headers("text/event-stream; charset=utf-8")
        headers.append(("Cache-Control", "no-cache"))
        body = _paced(self.sc, self.sock, head, deltas, tail, garbage)
        return "200 OK", headers, _gzip_stream(body) if self.sc.get("gzip") else body


class _Tracked:
    """Response iterable that keeps in_flight exact and spots clients that left early.

    The server calls close() once a response ends for any reason. If that happens
    before the body was exhausted, a write to the client failed (it went away) and the
    server gave up iterating: that is a stream closed early.
    """

    __slots__ = ("_app", "_body", "_closed", "_finished")

    def __init__(self, app, body):
        self._app = app
        self._body = iter(body)
        self._finished = False
        self._closed = False

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._body)
        except BaseException:  # StopIteration or a deliberate _Abort: the fake did its part
            self._finished = True
            raise

    def close(self):
        if self._closed:
            return
        self._closed = True
        app = self._app
        app.in_flight -= 1
        if not self._finished:
            app.closed_early += 1
            app.last_closed_early_at = time.time()
        close = getattr(self._body, "close", None)
        if close is not None:
            close()


class FakeUpstream:
    """The WSGI application: scenario defaults, counters and the fake prompt cache."""

    def __init__(self, chunks=5, delay_ms=0):
        self.defaults = {"chunks": chunks, "delay_ms": delay_ms}
        self.in_flight = 0
        self._seq = 0
        self._routes = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/responses"): self._responses,
            ("POST", "/v1/responses/compact"): self._compact,
            ("POST", "/v1/messages"): self._messages,
            ("POST", "/v1/messages/count_tokens"): self._count_tokens,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("GET", "/v1/models"): self._models,
        }
        self.reset()

    def reset(self):
        """Zero the stats and forget fail_first counters, cached prefixes and the last request."""
        self.requests = 0
        self.max_in_flight = self.in_flight  # streams still running are still in flight
        self.closed_early = 0
        self.last_closed_early_at = None
        self.by_path = {}
        self.last_request = None
        self.fail_counts = {}
        self.cache_prefixes = set()

    def stats(self):
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "closed_early": self.closed_early,
            "last_closed_early_at": self.last_closed_early_at,
            "by_path": self.by_path,
        }

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if path.startswith("/_fake/"):
            status, data = self._control(environ["REQUEST_METHOD"], path)
            start_response(status, [("Content-Type", "application/json")])
            return [data]
        self.requests += 1
        self.by_path[path] = self.by_path.get(path, 0) + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            status, headers, body = self._serve(environ, path)
            start_response(status, headers)
        except BaseException:
            self.in_flight -= 1
            raise
        return _Tracked(self, body)

    def _control(self, method, path):
        if method == "GET" and path == "/_fake/stats":
            return "200 OK", _dumps(self.stats())
        if method == "POST" and path == "/_fake/reset":
            self.reset()
            return "200 OK", _dumps(self.stats())
        if method == "GET" and path == "/_fake/last_request":
            return "200 OK", _dumps(self.last_request)
        return "404 Not Found", _dumps({"error": f"no fake endpoint {method} {path}"})

    def _serve(self, environ, path):
        self._seq += 1
        method = environ["REQUEST_METHOD"]
        headers = {
            k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k[:5] == "HTTP_"
        }
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                headers[key.lower().replace("_", "-")] = environ[key]
        call = _Call(environ, path, f"req_fake_{self._seq:08d}", headers)
        raw = environ["wsgi.input"].read() if method == "POST" else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        authorization = headers.get("authorization", "")
        if authorization.startswith("Bearer ") and authorization[7:].strip():
            credential_header, credential = "authorization", authorization[7:].strip()
        elif headers.get("x-api-key"):
            credential_header, credential = "x-api-key", headers["x-api-key"]
        else:
            credential_header = credential = None
        self.last_request = {
            "method": method,
            "path": path,
            "query": environ.get("QUERY_STRING", ""),
            "headers": headers,
            "body": body,
            "credential_header": credential_header,
            "credential": credential,
            "client_port": int(environ.get("REMOTE_PORT") or 0),  # which connection it came on
        }

        if credential is None:
            return call.error(401, "Missing API key: send Authorization: Bearer or x-api-key.")
        if not isinstance(body, dict):
            return call.error(400, "Request body is not a JSON object.")
        model, _, suffix = str(body.get("model") or "fake-model").partition("@")
        try:
            sc = dict(self.defaults, **_parse_scenario(suffix))
            sc.update(_parse_scenario(headers.get("x-fake-scenario", "")))
        except ValueError as exc:
            return call.error(400, str(exc))
        call.body, call.model, call.sc = body, model, sc

        if sc.get("hang_before_ms"):
            gevent.sleep(sc["hang_before_ms"] / 1000)
        if "status" in sc:
            return call.error(sc["status"], f"Fake upstream scenario status={sc['status']}.")
        if sc.get("fail_first"):
            key = headers.get("x-fake-key", "")
            count = self.fail_counts[key] = self.fail_counts.get(key, 0) + 1
            if count <= sc["fail_first"]:
                return call.error(500, f"Fake failure {count} of {sc['fail_first']}.")
        route = self._routes.get((method, path.rstrip("/")))
        if route is None:
            return call.error(404, f"Unknown endpoint {method} {path}.")
        return route(call)

    # --- OpenAI ---------------------------------------------------------------------------------

    def _openai_usage(self, call, output_tokens, responses_api):
        if call.sc.get("no_usage"):
            return None
        prompt = _reported_input(call)
        cached = min(call.sc.get("cached_tokens", 0), prompt)
        if responses_api:
            return {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + output_tokens,
            }
        return {
            "prompt_tokens": prompt,
            "completion_tokens": output_tokens,
            "total_tokens": prompt + output_tokens,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _chat(self, call):
        body, chunks = call.body, call.sc["chunks"]
        tool, pieces = _tool_call(body, chunks)
        pieces = pieces or _words(chunks)
        usage = self._openai_usage(call, len(pieces), responses_api=False)
        finish_reason = "tool_calls" if tool else "stop"
        call_id = "call_" + call.rid
        base = {
            "id": "chatcmpl-" + call.rid,
            "object": "chat.completion.chunk" if body.get("stream") else "chat.completion",
            "created": int(time.time()),
            "model": call.model,
            "service_tier": _served_tier(call),
            "system_fingerprint": "fp_fake",
        }
        if not body.get("stream"):
            message = {
                "role": "assistant",
                "content": "".join(pieces),
                "refusal": None,
                "annotations": [],
            }
            if tool:
                function = {"name": tool, "arguments": "".join(pieces)}
                message.update(
                    content=None,
                    tool_calls=[{"id": call_id, "type": "function", "function": function}],
                )
            choice = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            return call.reply(dict(base, choices=[choice], **({"usage": usage} if usage else {})))

        # The real API puts "usage": null on every chunk once include_usage is asked for.
        with_usage = (
            bool((body.get("stream_options") or {}).get("include_usage")) and usage is not None
        )
        extra = {"usage": None} if with_usage else {}

        def chunk(delta, finish=None):
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _data(dict(base, choices=[choice], **extra))

        if tool:
            function = {"name": tool, "arguments": ""}
            first = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"index": 0, "id": call_id, "type": "function", "function": function}
                ],
            }
            deltas = (
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces
            )
        else:
            first = {"role": "assistant", "content": "", "refusal": None}
            deltas = (chunk({"content": p}) for p in pieces)
        tail = [chunk({}, finish_reason)]
        if with_usage:
            tail.append(_data(dict(base, choices=[], usage=usage)))
        tail.append(b"data: [DONE]\n\n")
        return call.stream([chunk(first)], deltas, tail, b'data: {"id": not json at all\n\n')

    def _compact(self, call):
        """A compacted conversation: the input's user messages, then one compaction item whose
        encrypted_content is the (here merely encoded) summary; Responses usage. Never streamed."""
        pieces = _words(call.sc["chunks"])
        items = call.body.get("input")
        items = [{"type": "message", "role": "user", "content": items}] if isinstance(items, str) else items
        kept = [{"type": "message", **it} for it in items or () if isinstance(it, dict) and it.get("role") == "user"]
        summary = base64.b64encode("".join(pieces).encode()).decode()
        usage = self._openai_usage(call, len(pieces), responses_api=True)
        return call.reply({
            "id": "resp_" + call.rid,
            "object": "response.compaction",
            "created_at": int(time.time()),
            "output": [*kept, {"id": "cmp_" + call.rid, "type": "compaction", "encrypted_content": summary}],
            **({"usage": usage} if usage else {}),
        })

    def _responses(self, call):
        body, pieces = call.body, _words(call.sc["chunks"])
        text = "".join(pieces)
        usage = self._openai_usage(call, len(pieces), responses_api=True)
        created = int(time.time())
        msg_id = "msg_" + call.rid
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item = {
            "id": msg_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }

        def response(status, output, usage=None):
            return {
                "id": "resp_" + call.rid,
                "object": "response",
                "created_at": created,
                "status": status,
                "background": False,
                "completed_at": int(time.time()) if status == "completed" else None,
                "error": None,
                "incomplete_details": None,
                "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"),
                "model": call.model,
                "output": output,
                "parallel_tool_calls": True,
                "previous_response_id": body.get("previous_response_id"),
                "reasoning": {"effort": None, "summary": None},
                "store": body.get("store", True),
                "temperature": body.get("temperature", 1.0),
                "text": {"format": {"type": "text"}},
                "tool_choice": body.get("tool_choice", "auto"),
                "tools": body.get("tools", []),
                "top_p": body.get("top_p", 1.0),
                "truncation": "disabled",
                "usage": usage,
                **({"tool_usage": tool_usage} if usage and "discounted_searches" in call.sc else {}),
                "service_tier": _served_tier(call),
                "user": None,
                "metadata": body.get("metadata") or {},
            }

        ran = sum(not failed for _query, failed in _searches(call))
        tool_usage = {
            "image_gen": {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                          "output_tokens": 0, "total_tokens": 0},
            "web_search": {"num_requests": max(0, ran - call.sc.get("discounted_searches", 0))},
        }
        searches = [
            {"id": f"ws_{call.rid}_{i}", "type": "web_search_call",
             "status": "failed" if failed else "completed",
             "action": {"type": "search", "query": query}}
            for i, (query, failed) in enumerate(_searches(call))
        ]
        if not body.get("stream"):
            return call.reply(response("completed", [*searches, item], usage))

        sequence = itertools.count()

        def event(kind, **fields):
            # Evaluated lazily, so sequence numbers follow the order frames are sent in.
            return _sse(kind, {"type": kind, "sequence_number": next(sequence), **fields})

        at = len(searches)  # the message's output index
        where = {"item_id": msg_id, "output_index": at, "content_index": 0}
        head = [
            event("response.created", response=response("in_progress", [])),
            event("response.in_progress", response=response("in_progress", [])),
        ]
        for i, ws in enumerate(searches):
            ids = {"output_index": i, "item_id": ws["id"]}
            head += [
                event("response.output_item.added", output_index=i, item=dict(ws, status="in_progress")),
                event("response.web_search_call.in_progress", **ids),
                event("response.web_search_call.searching", **ids),
                event("response.web_search_call.completed", **ids),
                event("response.output_item.done", output_index=i, item=ws),
            ]
        head += [
            event(
                "response.output_item.added",
                output_index=at,
                item=dict(item, status="in_progress", content=[]),
            ),
            event("response.content_part.added", **where, part=dict(part, text="")),
        ]
        deltas = (
            event("response.output_text.delta", **where, delta=p, logprobs=[]) for p in pieces
        )

        def tail():
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            yield event("response.content_part.done", **where, part=part)
            yield event("response.output_item.done", output_index=at, item=item)
            yield event("response.completed", response=response("completed", [*searches, item], usage))

        garbage = b"event: response.output_text.delta\ndata: {not json at all\n\n"
        return call.stream(head, deltas, tail(), garbage)

    def _embeddings(self, call):
        body = call.body
        inputs = body.get("input")
        if isinstance(inputs, str) or (
            isinstance(inputs, list) and inputs and isinstance(inputs[0], int)
        ):
            inputs = [inputs]
        dims = body.get("dimensions") or 8
        data = []
        for index, item in enumerate(inputs or ()):
            digest = hashlib.sha256(_dumps(item)).digest() * (dims // 32 + 1)
            vector = [(b - 127.5) / 127.5 for b in digest[:dims]]
            if body.get("encoding_format") == "base64":
                vector = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        obj = {"object": "list", "data": data, "model": call.model}
        if not call.sc.get("no_usage"):
            prompt = _reported_input(call)
            obj["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
        return call.plain(obj)

    def _models(self, call):
        if "anthropic-version" in call.headers:
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
                for m in DEFAULT_MODELS
            ]
            obj = {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"],
                "last_id": data[-1]["id"],
            }
        else:
            data = [
                {"id": m, "object": "model", "created": 1735689600, "owned_by": "fake"}
                for m in DEFAULT_MODELS
            ]
            obj = {"object": "list", "data": data}
        return call.plain(obj)

    # --- Anthropic ------------------------------------------------------------------------------

    def _anthropic_usage(self, call):
        """Input-side usage; a cache_control prefix is written on first sight and read afterwards."""
        total = _reported_input(call)
        usage = {
            "input_tokens": total,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            # The speed served: fast mode when asked for (standard_only=1: never).
            "speed": "fast" if call.body.get("speed") == "fast" and not call.sc.get("standard_only") else "standard",
        }
        prefix = _cache_prefix(call.body)
        if prefix is not None:
            key = hashlib.sha256(_dumps([call.model, prefix])).digest()
            cached = min(_text_chars(prefix) // 4 + 1, total)
            seen = key in self.cache_prefixes
            self.cache_prefixes.add(key)
            usage["input_tokens"] = total - cached
            usage["cache_read_input_tokens" if seen else "cache_creation_input_tokens"] = cached
        return usage

    def _messages(self, call):
        body, chunks = call.body, call.sc["chunks"]
        tool, pieces = _tool_call(body, chunks)
        usage = None if call.sc.get("no_usage") else self._anthropic_usage(call)
        if tool:
            block = {
                "type": "tool_use",
                "id": "toolu_" + call.rid,
                "name": tool,
                "input": json.loads("".join(pieces)),
            }
        else:
            pieces = _words(chunks)
            block = {"type": "text", "text": "".join(pieces)}
        searches = _search_blocks(call)
        ran = sum(isinstance(b.get("content"), list) for b in searches)
        at = len(searches)  # the answer's block index
        message = {
            "id": "msg_" + call.rid,
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": [*searches, block],
            "stop_reason": "tool_use" if tool else "end_turn",
            "stop_sequence": None,
        }
        compacted = call.sc.get("compaction_tokens")
        iterations = [
            {"type": "compaction", "input_tokens": compacted, "output_tokens": compacted // 10,
             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
            {"type": "message", "input_tokens": usage["input_tokens"] if usage else 0, "output_tokens": len(pieces),
             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        ] if compacted else None
        if not body.get("stream"):
            if usage:
                message["usage"] = dict(usage, output_tokens=len(pieces))
                if searches:
                    message["usage"]["server_tool_use"] = {"web_search_requests": ran}
                if iterations:
                    message["usage"]["iterations"] = iterations
            return call.reply(message)

        start = dict(message, content=[], stop_reason=None)
        if usage:
            start["usage"] = dict(usage, output_tokens=1)
        head = [_sse("message_start", {"type": "message_start", "message": start})]
        for i, b in enumerate(searches):
            def frame(kind, **fields):
                return _sse(kind, {"type": kind, "index": i, **fields})

            if b["type"] == "server_tool_use":
                head += [
                    frame("content_block_start", content_block=dict(b, input={})),
                    frame("content_block_delta",
                          delta={"type": "input_json_delta", "partial_json": json.dumps(b["input"])}),
                ]
            else:
                head.append(frame("content_block_start", content_block=b))
            head.append(frame("content_block_stop"))
        head += [
            _sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": at,
                    "content_block": dict(block, input={})
                    if tool
                    else {"type": "text", "text": ""},
                },
            ),
            _sse("ping", {"type": "ping"}),
        ]
        delta = "input_json_delta" if tool else "text_delta"
        field = "partial_json" if tool else "text"
        deltas = (
            _sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": at,
                    "delta": {"type": delta, field: p},
                },
            )
            for p in pieces
        )
        stop = {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
        }
        if usage:
            stop["usage"] = {"output_tokens": len(pieces)}
            if iterations:
                stop["usage"]["iterations"] = iterations
            if searches:
                stop["usage"]["server_tool_use"] = {"web_search_requests": ran}
        tail = [
            _sse("content_block_stop", {"type": "content_block_stop", "index": at}),
            _sse("message_delta", stop),
            _sse("message_stop", {"type": "message_stop"}),
        ]
        garbage = b"event: content_block_delta\ndata: {not json at all\n\n"
        return call.stream(head, deltas, tail, garbage)

    def _count_tokens(self, call):
        return call.plain({"input_tokens": _input_tokens(call.body)})


def make_app(chunks=5, delay_ms=0):
    """A fresh fake provider WSGI app with its own counters; chunks/delay_ms are scenario defaults."""
    return FakeUpstream(chunks=chunks, delay_ms=delay_ms)


class _Handler(pywsgi.WSGIHandler):
    """Hands the socket to the app (for reset_after) and treats _Abort as a deliberate hang-up.

    TCP_NODELAY, as real providers' front ends set it: pywsgi sends a reply's headers and body
    separately, and without it Nagle holds the body until the client's delayed ACK (40 ms per
    call on a keep-alive connection).
    """

    def __init__(self, sock, *args, **kwargs):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(sock, *args, **kwargs)

    def get_environ(self):
        environ = super().get_environ()
        environ["fake_upstream.socket"] = self.socket
        return environ

    def handle_error(self, t, v, tb):
        if issubclass(t, _Abort):
            self.close_connection = True
        else:
            super().handle_error(t, v, tb)


def _raise_fd_limit():
    # Thousands of concurrent streams need thousands of descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Fake OpenAI/Anthropic upstream for tests and benchmarks."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--chunks", type=int, default=5, help="default content deltas per answer")
    parser.add_argument("--delay-ms", type=int, default=0, help="default sleep before each delta")
    parser.add_argument("--log", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    _raise_fd_limit()
    server = pywsgi.WSGIServer(
        (args.host, args.port),
        make_app(chunks=args.chunks, delay_ms=args.delay_ms),
        handler_class=_Handler,
        backlog=4096,
        log=sys.stderr if args.log else None,
    )
    server.start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, server.stop)
    print(f"LISTENING {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
