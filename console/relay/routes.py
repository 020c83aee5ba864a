"""Relay views (/v1): parse and authenticate, call the proxy service, shape the response.

Every relay response carries `x-request-id`; for billed calls it is the usage record's id.
"""
from __future__ import annotations

import json
import math
import re

from flask import Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from console.relay import bp, content_coding, proxy
from console.relay.auth import authenticate, group_models, presented_secret, resolve_model
from console.relay.errors import RelayError, from_error
from console.relay.metering import StaleKey, new_request_id
from console.relay.protocols import CHAT, COMPACT, COUNT_TOKENS, EMBEDDINGS, MESSAGES, RESPONSES, Surface
from console.relay.upstream import FORWARDED_HEADERS


def _request_id() -> str:
    rid = g.get("relay_request_id")
    if rid is None:
        rid = g.relay_request_id = new_request_id()
    return rid


@bp.before_request
def _begin():
    request.max_content_length = current_app.config["RELAY_MAX_BODY"]
    _request_id()


@bp.after_app_request
def _tag(resp: Response) -> Response:
    if request.path == "/v1" or request.path.startswith("/v1/"):
        resp.headers["x-request-id"] = _request_id()
        resp.headers.setdefault("Cache-Control", "no-store")
    return resp


_MAX_DEPTH = 128


def _too_deep(raw: bytes, body) -> bool:
    """Nesting beyond _MAX_DEPTH, checked on the parsed body (json.loads itself stops at the
    interpreter's recursion limit with a RecursionError), so no deeper body reaches the
    recursive json.dumps that re-encodes it for the upstream. A body with few brackets cannot
    be deep; otherwise the walk visits containers level by level and stops past the limit.
    Scanning the raw bytes for brackets outside strings instead cost ~10 ms per 180 kB request
    of a coding agent (bench/README.md, finding 21); this walk ~0.5 ms."""
    if raw.count(b"[") + raw.count(b"{") <= _MAX_DEPTH:
        return False
    level, depth = [body], 1
    while level:
        if depth > _MAX_DEPTH:
            return True
        nested = []
        for node in level:
            values = node.values() if type(node) is dict else node
            nested.extend([v for v in values if type(v) is dict or type(v) is list])
        level, depth = nested, depth + 1
    return False


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    """A JSON number beyond a double's range (1e999) would reach the upstream as `Infinity`,
    which is not JSON."""
    value = float(text)
    if not math.isfinite(value):
        raise RelayError(400, "A number in the body is too large.", code="invalid_json")
    return value


# Where a lone surrogate can come from: a \uD800–\uDFFF escape, or its UTF-8-like bytes (json
# decodes bytes with "surrogatepass"). A body without either cannot hold one, and skips the check.
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _lone_surrogate(raw: bytes, body) -> bool:
    """An unpaired surrogate is not Unicode: the body could not be encoded for the upstream.
    A pair (an escaped emoji) decodes to one character and passes."""
    if _MAYBE_SURROGATE.search(raw) is None:
        return False
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


def _json_body() -> dict:
    if request.mimetype != "application/json":
        raise RelayError(415, "Send the body as application/json.", code="unsupported_media_type")
    raw = request.get_data(cache=False)  # over RELAY_MAX_BODY: 413 from werkzeug
    raw = content_coding.decode(raw, request.headers.get("Content-Encoding"), current_app.config["RELAY_MAX_BODY"])
    try:
        body = json.loads(raw, parse_constant=_no_constants, parse_float=_finite)
    except RecursionError:
        raise RelayError(400, "The body is nested too deeply.", code="invalid_json") from None
    except ValueError:
        raise RelayError(400, "The body is not valid JSON.", code="invalid_json") from None
    if _too_deep(raw, body):
        raise RelayError(400, "The body is nested too deeply.", code="invalid_json")
    if _lone_surrogate(raw, body):
        raise RelayError(400, "The body holds text that is not valid Unicode (an unpaired surrogate).",
                         code="invalid_json")
    if not isinstance(body, dict):
        raise RelayError(400, "The body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= 100:
        raise RelayError(400, "'model' must be a model name.", code="invalid_model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise RelayError(400, "'stream' must be true or false.", code="invalid_value")
    return body


def _client_headers() -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}


def _caller(*, remember: bool = False):
    return authenticate(presented_secret(request.headers), request.remote_addr, remember=remember)


_ATTEMPTS = 3  # a key that changes again between every read and admission gets a 503 after these


def _relay(surface: Surface):
    billed = surface is not COUNT_TOKENS
    try:
        caller = _caller(remember=billed)
        try:
            body = _json_body()
        except (RelayError, HTTPException):
            if caller.remembered:
                _caller()  # a key revoked since it was remembered is answered 401, not 400
            raise
        for _ in range(_ATTEMPTS):
            try:
                call = proxy.Call(surface, body, caller, resolve_model(caller, body["model"]),
                                  _client_headers(), request.remote_addr, _request_id())
                reply = proxy.relay_call(call) if billed else proxy.count_tokens(call)
                break
            except StaleKey:
                caller = _caller()  # the admission found the key changed: read it again (401 if revoked)
            except RelayError as exc:
                # A refusal decided on a remembered key row stands only if a fresh read agrees.
                if exc.admitted or not caller.remembered:
                    raise
                fresh = _caller()
                if fresh.key == caller.key:
                    raise
                caller = fresh
        else:
            raise RelayError(503, "The key changed during the call; retry.", code="overloaded",
                             headers={"Retry-After": "1"})
    except RelayError as exc:
        return from_error(exc)
    return Response(reply.body, status=reply.status, headers=reply.headers)


@bp.post("/chat/completions")
def chat_completions():
    return _relay(CHAT)


@bp.post("/responses")
def responses():
    return _relay(RESPONSES)


@bp.post("/responses/compact")
def responses_compact():
    return _relay(COMPACT)


@bp.post("/messages")
def messages():
    return _relay(MESSAGES)


@bp.post("/messages/count_tokens")
def count_tokens():
    return _relay(COUNT_TOKENS)


@bp.post("/embeddings")
def embeddings():
    return _relay(EMBEDDINGS)


def _model_object(m, anthropic: bool) -> dict:
    if anthropic:
        return {"type": "model", "id": m.name, "display_name": m.name, "created_at": "2025-01-01T00:00:00Z"}
    return {"id": m.name, "object": "model", "created": 1735689600, "owned_by": m.provider}


@bp.get("/models")
def models():
    try:
        caller = _caller()
    except RelayError as exc:
        return from_error(exc)
    anthropic = "anthropic-version" in request.headers
    data = [_model_object(m, anthropic) for m in group_models(caller)]
    if anthropic:
        return jsonify({"data": data, "has_more": False,
                        "first_id": data[0]["id"] if data else None,
                        "last_id": data[-1]["id"] if data else None})
    return jsonify({"object": "list", "data": data})


@bp.get("/models/<path:model_id>")
def model(model_id: str):
    """One model of the key's group (the SDKs' models.retrieve); 404 for any other name."""
    try:
        caller = _caller()
        found = next((m for m in group_models(caller) if m.name == model_id), None)
        if found is None:
            raise RelayError(404, f"The model '{model_id[:100]}' does not exist or is not available to this key.",
                             code="model_not_found")
    except RelayError as exc:
        return from_error(exc)
    return jsonify(_model_object(found, "anthropic-version" in request.headers))
