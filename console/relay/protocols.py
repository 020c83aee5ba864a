"""The API surfaces: where each forwards to, and how usage is read from its replies.

Owns the wire details: the upstream path per surface, `stream_options.include_usage`
injection for OpenAI chat streams (and stripping the extra usage chunk when the client did
not ask for it), and reading usage from JSON replies and from SSE events:
- OpenAI chat: the final chunk's `usage` (prompt_tokens includes cached_tokens);
- Responses: `response.completed` / `.incomplete` / `.failed` → response.usage;
- Anthropic: `message_start` usage (input side, exact from the first event) merged with
  `message_delta` usage (cumulative output), incl. cache creation (5 min / 1 h) and cache read,
  and the web searches run (`server_tool_use.web_search_requests`);
- web searches of Responses: the billable count of the response's `tool_usage`, else the
  `web_search_call` items of its output; of a stream cut short, the search items and result
  blocks that reached the client (a failed search is free);
- Responses compaction (`/responses/compact`, never streamed): the reply's Responses usage.

The stream is split into SSE events and each event is passed on as soon as it is complete;
no event is ever held back waiting for another.

JSON on the relay's hot path goes through orjson (`loads`, `dumps`): every SSE event an
upstream sends is read, and every request body is encoded again for the upstream (a coding
agent's is ~180 kB). The standard library takes over wherever orjson would read or write
something else than it does (bench/README.md, finding 28), so the values are the same.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import orjson

from console.pricing import Tokens


def loads(data: bytes):
    """An upstream's JSON (an SSE event's data, a reply). What orjson refuses — NaN, a lone
    surrogate, a BOM, nesting past 1,024 — is read as the standard library reads it (or
    refused with its ValueError). orjson reads an integer beyond 64 bits as a float: these
    values are only ever read for usage and text, never passed on; the client gets the
    upstream's own bytes."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(obj) -> bytes:
    """Compact UTF-8 JSON, as `json.dumps(obj, ensure_ascii=False, separators=(",", ":"))`
    writes it, give or take the spelling of a float (the same value). orjson refuses an
    integer beyond 64 bits (TypeError): the standard library writes it exactly."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Surface:
    name: str           # chat | responses | responses_compact | messages | embeddings | count_tokens
    channel_type: str   # openai | anthropic
    path: str           # appended to the channel's base URL
    billed: bool = True
    can_stream: bool = True


CHAT = Surface("chat", "openai", "/chat/completions")
RESPONSES = Surface("responses", "openai", "/responses")
# Compacts a Responses conversation into its user messages and one encrypted compaction item
# (Codex CLI calls it when it talks to the built-in OpenAI provider, OPENAI_BASE_URL included).
COMPACT = Surface("responses_compact", "openai", "/responses/compact", can_stream=False)
MESSAGES = Surface("messages", "anthropic", "/v1/messages")
EMBEDDINGS = Surface("embeddings", "openai", "/embeddings", can_stream=False)
COUNT_TOKENS = Surface("count_tokens", "anthropic", "/v1/messages/count_tokens", billed=False,
                       can_stream=False)


# Upstream JSON is read defensively: a field of an unexpected type counts as absent.
def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _list(v) -> list:
    return v if isinstance(v, list) else []


def _str(v) -> str:
    return v if isinstance(v, str) else ""


# A count beyond this is no real call's (the largest context windows are a few million tokens)
# and would not fit the usage record's columns (PostgreSQL INTEGER): usage reporting it is not
# believed, and the call is billed as if the upstream had reported none (marked estimated).
MAX_REPORTED_TOKENS = 2**31 - 1
UNBELIEVABLE_USAGE = "usage from upstream out of range"


def _int(v) -> int:
    """A token count: a positive integer, else 0; but a number beyond MAX_REPORTED_TOKENS in
    any form stays beyond it (`loads` reads an integer past 64 bits as a float)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v if v > 0 else 0
    return MAX_REPORTED_TOKENS + 1 if isinstance(v, float) and v > MAX_REPORTED_TOKENS else 0


def openai_tokens(u: dict) -> Tokens:
    """Chat (prompt/completion) or Responses (input/output) usage; cached tokens are inside input."""
    if "prompt_tokens" in u or "completion_tokens" in u:
        total_in, out = _int(u.get("prompt_tokens")), _int(u.get("completion_tokens"))
        details = u.get("prompt_tokens_details") or {}
    else:
        total_in, out = _int(u.get("input_tokens")), _int(u.get("output_tokens"))
        details = u.get("input_tokens_details") or {}
    cached = min(_int(details.get("cached_tokens")) if isinstance(details, dict) else 0, total_in)
    return Tokens(input=total_in - cached, output=out, cache_read=cached)


def _anthropic_token_classes(u: dict) -> Tokens:
    created = _int(u.get("cache_creation_input_tokens"))
    split = _dict(u.get("cache_creation"))
    w1h = min(_int(split.get("ephemeral_1h_input_tokens")), created)
    return Tokens(input=_int(u.get("input_tokens")), output=_int(u.get("output_tokens")),
                  cache_write_5m=created - w1h, cache_write_1h=w1h,
                  cache_read=_int(u.get("cache_read_input_tokens")))


def anthropic_tokens(u: dict) -> Tokens:
    """Messages usage, incl. the web searches run (`server_tool_use.web_search_requests`) and
    the speed served (`speed`: fast mode is a processing tier; its `service_tier` is not read,
    as Anthropic's priority tier is a committed-spend contract, not a price per token).

    A server-side compaction (context management) is a sampling pass of the same model whose
    tokens Anthropic reports only as a `compaction` entry of `usage.iterations`, outside the
    top-level fields, and bills: they are added. The other entries are inside the top level."""
    t = _anthropic_token_classes(u)
    for entry in map(_dict, _list(u.get("iterations"))):
        if entry.get("type") == "compaction":
            c = _anthropic_token_classes(entry)
            t = Tokens(input=t.input + c.input, output=t.output + c.output,
                       cache_write_5m=t.cache_write_5m + c.cache_write_5m,
                       cache_write_1h=t.cache_write_1h + c.cache_write_1h, cache_read=t.cache_read + c.cache_read)
    return replace(t, web_searches=_int(_dict(u.get("server_tool_use")).get("web_search_requests")),
                   service_tier="fast" if u.get("speed") == "fast" else "")


# A Responses output item the provider bills per use (OpenAI's hosted web search), and the
# Messages content block that carries one search's results (Anthropic's web_search tool).
WEB_SEARCH_ITEM = "web_search_call"
WEB_SEARCH_RESULT_BLOCK = "web_search_tool_result"


def ran_search(item) -> bool:
    """A web_search_call item or a web_search_tool_result block of a search that ran: a failed
    search is not billed by either provider, nor are OpenAI's other web actions (open_page,
    find_in_page); an item without an action (the preview tool's) is a search."""
    item = _dict(item)
    if item.get("type") == WEB_SEARCH_ITEM:
        action = item.get("action")
        return item.get("status") != "failed" and (action is None or _dict(action).get("type") == "search")
    return item.get("type") == WEB_SEARCH_RESULT_BLOCK and isinstance(item.get("content"), list)


def searches_in(surface: Surface, obj) -> int:
    """Web searches a whole reply shows: Responses output items, Messages content blocks."""
    if surface is RESPONSES:
        return sum(map(ran_search, _list(_dict(obj).get("output"))))
    if surface is MESSAGES:
        return sum(map(ran_search, _list(_dict(obj).get("content"))))
    return 0


def responses_tokens(resp: dict) -> Tokens:
    """Responses usage: its tokens, its web searches and the processing tier that served it.
    The searches are the billable ones the response's `tool_usage` reports (discounted searches
    excluded), else those its output shows (older API versions report no count)."""
    billable = _dict(_dict(resp.get("tool_usage")).get("web_search")).get("num_requests")
    counted = isinstance(billable, int) and not isinstance(billable, bool) and billable >= 0
    searches = min(billable, MAX_REPORTED_TOKENS + 1) if counted else searches_in(RESPONSES, resp)
    return replace(openai_tokens(resp["usage"]), web_searches=searches,
                   service_tier=_str(resp.get("service_tier")))


def believable(tokens: Tokens) -> bool:
    return max(tokens.input, tokens.output, tokens.cache_write_5m, tokens.cache_write_1h,
               tokens.cache_read, tokens.web_searches) <= MAX_REPORTED_TOKENS


def usage_from_json(surface: Surface, obj) -> Tokens | None:
    """The usage a whole reply reports; None when it reports none (see `believable`)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("usage"), dict):
        return None
    if surface is RESPONSES or surface is COMPACT:
        return responses_tokens(obj)
    u = obj["usage"]
    if surface.channel_type == "anthropic":
        return anthropic_tokens(u)
    return replace(openai_tokens(u), service_tier=_str(obj.get("service_tier")))


def text_from_json(surface: Surface, obj) -> str:
    """The generated text of a non-stream reply (for estimating output when usage is missing)."""
    out: list[str] = []
    if not isinstance(obj, dict):
        return ""
    if surface is CHAT:
        for ch in _list(obj.get("choices")):
            msg = _dict(_dict(ch).get("message"))
            if isinstance(msg.get("content"), str):
                out.append(msg["content"])
            for tc in _list(msg.get("tool_calls")):
                args = _dict(_dict(tc).get("function")).get("arguments")
                if isinstance(args, str):
                    out.append(args)
    elif surface is RESPONSES:
        for item in map(_dict, _list(obj.get("output"))):
            if isinstance(item.get("arguments"), str):
                out.append(item["arguments"])
            for part in map(_dict, _list(item.get("content"))):
                if isinstance(part.get("text"), str):
                    out.append(part["text"])
    elif surface is MESSAGES:
        for block in map(_dict, _list(obj.get("content"))):
            if isinstance(block.get("text"), str):
                out.append(block["text"])
            elif "input" in block:
                out.append(json.dumps(block["input"]))
    elif surface is COMPACT:
        # The summary is only there encrypted (its ciphertext is longer than the text): the
        # user messages beside it are the input's own.
        for item in map(_dict, _list(obj.get("output"))):
            if item.get("type") == "compaction" and isinstance(item.get("encrypted_content"), str):
                out.append(item["encrypted_content"])
    return "".join(out)


def estimate_output_tokens(chars: int, deltas: int) -> int:
    """Output delivered → tokens: a delta is at least one token, and a token is ~4 characters."""
    return max(deltas, math.ceil(chars / 4))


def prepare_body(surface: Surface, body: dict, upstream_model: str) -> tuple[dict, bool]:
    """The body sent upstream (model mapped; usage asked for) and whether to strip the usage chunk."""
    out = dict(body)
    out["model"] = upstream_model
    strip = False
    if surface is CHAT and body.get("stream") is True:
        opts = body.get("stream_options")
        opts = dict(opts) if isinstance(opts, dict) else {}
        strip = opts.get("include_usage") is not True
        opts["include_usage"] = True
        out["stream_options"] = opts
    return out, strip


class StreamMeter:
    """Splits an SSE byte stream into events, reads usage and counts delivered output."""

    def __init__(self, surface: Surface, strip_usage_chunk: bool):
        self.surface = surface
        self.strip = strip_usage_chunk
        self.buf = bytearray()
        self._scanned = 0  # no event ends before this offset of buf
        self.usage: Tokens | None = None
        self._anthropic: dict = {}
        self.chars = 0
        self.deltas = 0
        self.errored = False  # the upstream sent an error event inside the stream
        self.unbelievable = False  # it reported usage out of range: none of its usage counts
        self._final_seen = False
        # Web searches whose results reached the client, for a stream that ends before its usage.
        self.searches_seen = 0
        self.service_tier = ""  # the processing tier (or speed) the stream says it is served at

    def feed(self, chunk: bytes) -> list[bytes]:
        """Complete events to pass on (each with its blank-line terminator).

        Linear in the stream's size however the reads cut it: a large event (a Responses
        image's base64, megabytes) arriving in small network reads is appended to one buffer
        and each read is searched only from where the last search stopped (re-scanning and
        re-copying the whole buffer per read cost 2.6 s of a worker's CPU for 2 MB in 1,448-byte
        reads, stalling every stream of the worker)."""
        if (not self.buf and chunk.endswith(b"\n\n") and chunk.find(b"\n\n") == len(chunk) - 2
                and b"\r" not in chunk):
            # The common read: exactly one whole event (what the loop below would find).
            return [chunk] if self._inspect(chunk) else []
        buf = self.buf
        buf += chunk
        out = []
        start = 0
        pos = max(0, self._scanned - 3)  # a terminator may begin in the previous read's last 3 bytes
        i = j = -2  # the next "\n\n" and "\r\n\r\n" at or after pos (-1: none; -2: not searched)
        while True:
            if i < pos and i != -1:
                i = buf.find(b"\n\n", pos)
            if j < pos and j != -1:
                j = buf.find(b"\r\n\r\n", pos)
            if i < 0 and j < 0:
                break
            end = j + 4 if j >= 0 and (i < 0 or j < i) else i + 2
            event = bytes(buf[start:end])
            start = pos = end
            if self._inspect(event):
                out.append(event)
        if start:
            del buf[:start]
        self._scanned = len(buf)
        return out

    def rest(self) -> bytes:
        """Bytes left after the stream ended (an unterminated last event), passed on as is."""
        rest = bytes(self.buf)
        self.buf.clear()
        self._scanned = 0
        if rest:
            self._inspect(rest)
        return rest

    @property
    def output_tokens_estimate(self) -> int:
        return estimate_output_tokens(self.chars, self.deltas)

    def _inspect(self, event: bytes) -> bool:
        """Read one event; False means drop it (the usage chunk the client did not ask for)."""
        if (event.startswith(b"data:") and event.endswith(b"\n\n") and event.find(b"\n") == len(event) - 2
                and b"\r" not in event):
            raw = event[5:-2].strip()  # one data line, then the blank line: the common event
        else:
            data = [ln[5:].strip() for ln in event.splitlines() if ln.startswith(b"data:")]
            if not data:
                return True
            raw = b"\n".join(data)
        if raw == b"[DONE]":
            return True
        try:
            obj = loads(raw)
        except ValueError:
            return True  # malformed upstream data is passed on untouched, never billed
        if not isinstance(obj, dict):
            return True
        if self.surface is MESSAGES:
            self._messages(obj)
        elif self.surface is RESPONSES:
            self._responses(obj)
        else:
            return self._chat(obj)
        return True

    def _chat(self, obj: dict) -> bool:
        if isinstance(obj.get("service_tier"), str):
            self.service_tier = obj["service_tier"]
        for ch in _list(obj.get("choices")):
            delta = _dict(_dict(ch).get("delta"))
            got = False
            if isinstance(delta.get("content"), str) and delta["content"]:
                self.chars += len(delta["content"])
                got = True
            for tc in _list(delta.get("tool_calls")):
                args = _dict(_dict(tc).get("function")).get("arguments")
                if isinstance(args, str) and args:
                    self.chars += len(args)
                    got = True
            self.deltas += got
        if isinstance(obj.get("usage"), dict):
            self._report(replace(openai_tokens(obj["usage"]), service_tier=self.service_tier))
            if self.strip and not obj.get("choices"):
                return False
        if "error" in obj:
            self.errored = True
        return True

    def _responses(self, obj: dict) -> None:
        kind = _str(obj.get("type"))
        if kind.endswith(".delta") and isinstance(obj.get("delta"), str):
            self.chars += len(obj["delta"])
            self.deltas += 1
        elif kind == "response.output_item.done":
            self.searches_seen += ran_search(obj.get("item"))
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            resp = _dict(obj.get("response"))
            if isinstance(resp.get("usage"), dict):
                self._report(responses_tokens(resp))
        elif kind == "response.created":
            self.service_tier = _str(_dict(obj.get("response")).get("service_tier"))
        elif kind == "error":
            self.errored = True

    def _messages(self, obj: dict) -> None:
        kind = _str(obj.get("type"))
        if kind == "content_block_delta":
            d = _dict(obj.get("delta"))
            for k in ("text", "partial_json", "thinking"):
                if isinstance(d.get(k), str):
                    self.chars += len(d[k])
                    self.deltas += 1
                    break
        elif kind == "content_block_start":
            self.searches_seen += ran_search(obj.get("content_block"))
        elif kind == "message_start":
            u = _dict(obj.get("message")).get("usage")
            if isinstance(u, dict):
                self._merge(u)
        elif kind == "message_delta":
            if isinstance(obj.get("usage"), dict):
                self._merge(obj["usage"])
                self._final_seen = True
        elif kind == "error":
            self.errored = True

    def _merge(self, u: dict) -> None:
        self._anthropic.update({k: v for k, v in u.items() if v is not None})
        tokens = anthropic_tokens(self._anthropic)
        self.service_tier = tokens.service_tier
        self._report(tokens)

    def _report(self, tokens: Tokens) -> None:
        if self.unbelievable or not believable(tokens):
            self.unbelievable, self.usage = True, None
        else:
            self.usage = tokens

    @property
    def input_reported(self) -> bool:
        """Anthropic reports input usage in message_start, before any output."""
        return self.usage is not None and self.surface is MESSAGES and "input_tokens" in self._anthropic

    @property
    def complete_usage(self) -> bool:
        """Usage that covers the whole call (OpenAI's final chunk; Anthropic's message_delta)."""
        if self.usage is None:
            return False
        return self._final_seen if self.surface is MESSAGES else True
