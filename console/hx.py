"""htmx glue; the only importer of htmx_flask.

Owns: deciding page vs fragment, toasts and events merged into HX-Trigger, and htmx-aware
redirects. Views call these instead of reading HX-* headers themselves.
"""
from __future__ import annotations

import json

from flask import Response, flash, make_response, render_template, request
from flask import redirect as flask_redirect
from htmx_flask import Htmx

htmx = Htmx()


def is_htmx() -> bool:
    return bool(getattr(request, "htmx", False))


def wants_fragment() -> bool:
    """A fragment only for a targeted htmx request: not boosted navigation, not a history restore."""
    hx = getattr(request, "htmx", None)
    return bool(hx) and not hx.boosted and not hx.history_restore_request


def render(page: str, fragment: str | None = None, *, status: int = 200, **ctx) -> Response:
    """One endpoint, two renderings: the full page, or its fragment for targeted htmx requests."""
    template = fragment if (fragment and wants_fragment()) else page
    resp = make_response(render_template(template, **ctx), status)
    resp.vary.add("HX-Request")
    return resp


def render_fragment(fragment: str, *, status: int = 200, **ctx) -> Response:
    resp = make_response(render_template(fragment, **ctx), status)
    resp.vary.add("HX-Request")
    return resp


def trigger(resp: Response, event: str, detail: object = True) -> Response:
    """Merge an event into HX-Trigger (never overwrite: other code may have added one)."""
    current = resp.headers.get("HX-Trigger")
    events: dict = {}
    if current:
        try:
            parsed = json.loads(current)
            events = parsed if isinstance(parsed, dict) else {}
        except ValueError:
            events = {name.strip(): True for name in current.split(",") if name.strip()}
    events[event] = detail
    resp.headers["HX-Trigger"] = json.dumps(events)
    return resp


def toast(resp: Response, message: str, level: str = "success") -> Response:
    """A toast for htmx requests; without JS the same message arrives as a flash."""
    if is_htmx():
        return trigger(resp, "toast", {"message": message, "level": level})
    flash(message, level)
    return resp


def redirect(location: str, message: str | None = None, level: str = "success") -> Response:
    """Post/redirect/get for plain forms; HX-Redirect-free for htmx (the caller renders instead)."""
    if message:
        flash(message, level)
    if is_htmx():
        resp = make_response("", 204)
        resp.headers["HX-Redirect"] = location
        return resp
    return flask_redirect(location, code=302)


def login_required_response(login_url: str) -> Response:
    """Session expired inside a fragment: 401 + HX-Redirect, never a login page in a table cell."""
    if is_htmx():
        resp = make_response("", 401)
        resp.headers["HX-Redirect"] = login_url
        return resp
    return flask_redirect(login_url, code=302)


def reswap(resp: Response, value: str) -> Response:
    """Set HX-Reswap directly (htmx-flask's validation rejects valid values with modifiers)."""
    resp.headers["HX-Reswap"] = value
    return resp
