"""Errors in each API's own JSON shape (OpenAI or Anthropic), and the relay's domain error."""
from __future__ import annotations

from flask import jsonify, request

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
                 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
                 415: "invalid_request_error", 429: "rate_limit_error"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "overloaded_error",
                    504: "api_error"}


class RelayError(Exception):
    """A refusal with its HTTP status; the message is shown to the API client as is.

    Services raise it; the relay views turn it into the API's error shape. It never carries
    a key or an upstream URL.
    """

    # Raised after the call's admission committed (an upstream failure…): the call is on the
    # books, so the view answers it as is and never runs the call again (routes._relay).
    admitted = False

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 headers: dict | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


def is_anthropic_request() -> bool:
    return request.path.startswith("/v1/messages") or "anthropic-version" in request.headers


def error_response(status: int, message: str, *, code: str | None = None, headers: dict | None = None,
                   extra: dict | None = None):
    if is_anthropic_request():
        body = {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"),
                                           "message": message, **(extra or {})}}
    else:
        body = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"),
                          "param": None, "code": code, **(extra or {})}}
    resp = jsonify(body)
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def from_error(exc: RelayError):
    return error_response(exc.status, exc.message, code=exc.code, headers=exc.headers, extra=exc.extra)
