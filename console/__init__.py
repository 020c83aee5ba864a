"""Relay Console: the application factory.

create_app() binds config, extensions, blueprints, error pages, security headers, Jinja
filters and CLI commands. Blueprints are imported inside the function (no import cycles).
"""
from __future__ import annotations

import logging
from pathlib import Path

from flask import Flask, request
from flask.sessions import SecureCookieSessionInterface
from flask_login import current_user

from console.config import INSTANCE, ROOT, Config

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


class _ConsoleSessions(SecureCookieSessionInterface):
    """The relay (/v1) authenticates by API key only: it gets the null session, so a cookie
    sent to the API is never even decoded, and no API response varies on it."""

    def open_session(self, app, req):
        if _is_relay(req):
            return self.make_null_session(app)
        return super().open_session(app, req)


def rate_storage_options(uri: str) -> dict:
    """Redis rate-limit storage waits for a free connection (up to 5 s) instead of failing:
    a gevent worker may have hundreds of calls checking their limits at the same moment, and
    redis-py's default pool raises "Too many connections" past 100. A Redis that stops
    answering (no refusal, no reply) stalls a call 1 s, not redis-py's default 5 s, before the
    limits fall back to memory (Redis answers in well under a millisecond when it is up)."""
    if not uri.startswith(("redis://", "rediss://")):
        return {}
    from redis import BlockingConnectionPool

    return {"connection_pool": BlockingConnectionPool.from_url(
        uri, max_connections=100, timeout=5, socket_connect_timeout=1, socket_timeout=1)}


def create_app(overrides: dict | None = None) -> Flask:
    app = Flask(
        __name__,
        template_folder=str(ROOT / "templates"),
        static_folder=str(ROOT / "static"),
        instance_path=str(INSTANCE),
    )
    app.config.from_object(Config())
    if overrides:
        app.config.update(overrides)
    Path(app.instance_path).mkdir(parents=True, exist_ok=True)
    app.session_interface = _ConsoleSessions()

    from console.database import engine_options

    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
        **engine_options(uri, app.config["DB_POOL_SIZE"], app.config["DB_MAX_OVERFLOW"]),
        **app.config.get("SQLALCHEMY_ENGINE_OPTIONS", {}),
    }
    app.config.setdefault("RATELIMIT_STORAGE_URI", app.config.get("REDIS_URL") or "memory://")
    app.config.setdefault("RATELIMIT_STORAGE_OPTIONS", rate_storage_options(app.config["RATELIMIT_STORAGE_URI"]))
    # A Redis outage must not break sign-in or voucher redemption: the throttles then count in
    # each worker's memory until Redis answers again.
    app.config.setdefault("RATELIMIT_IN_MEMORY_FALLBACK_ENABLED", True)

    if app.config.get("TRUST_PROXY"):
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1)

    # Registered before CSRFProtect so the body limit applies before anything reads the form.
    @app.before_request
    def _limit_console_bodies():
        if not _is_relay():
            request.max_content_length = app.config["CONSOLE_MAX_BODY"]

    _init_extensions(app)
    _register_blueprints(app)
    _register_security(app)
    _register_errors(app)
    _register_templating(app)

    from console.cli import register_cli
    from console.logging_setup import install_redaction

    register_cli(app)
    install_redaction(app)
    return app


def _init_extensions(app: Flask) -> None:
    from console import models  # noqa: F401  (tables must be known to metadata)
    from console.accounts import load_user
    from console.extensions import cors, csrf, db, htmx, limiter, login_manager, migrate
    from console.hx import login_required_response

    db.init_app(app)
    migrate.init_app(app, db, directory=str(ROOT / "migrations"), render_as_batch=True)
    csrf.init_app(app)
    htmx.init_app(app)
    limiter.init_app(app)
    # The limiter's before-request hook only serves application-wide and default limits (there
    # are none; console views carry their own decorators, which check themselves). The relay
    # has its own per-key limits, so it skips the hook's per-request work entirely.
    hooks = app.before_request_funcs.setdefault(None, [])
    at = hooks.index(limiter._check_request_limit)
    check = hooks[at]
    hooks[at] = lambda: None if _is_relay() else check()
    # Web apps call the API from their own pages (a chat UI in the browser, with the user's
    # key). The relay reads no cookie and authenticates by key alone, so any origin may call it,
    # without credentials; the console, signed in by cookie, sends no CORS header at all. Only
    # cross-origin requests (with an Origin header) get the headers.
    cors.init_app(app, resources={r"/v1/*": {
        "origins": "*", "send_wildcard": True, "always_send": False, "supports_credentials": False,
        "methods": ["GET", "POST"], "allow_headers": "*", "max_age": 600,
        "expose_headers": ["x-request-id", "Retry-After"]}})
    login_manager.init_app(app)
    login_manager.session_protection = "strong"
    login_manager.login_view = "auth.login"
    login_manager.user_loader(load_user)

    @login_manager.unauthorized_handler
    def _unauthorized():
        from flask import url_for

        nxt = request.full_path.rstrip("?") if request.method == "GET" else None
        return login_required_response(url_for("auth.login", next=nxt))


def _register_blueprints(app: Flask) -> None:
    from console.extensions import csrf, limiter
    from console.relay import bp as relay_bp
    from console.views import (
        admin,
        admin_catalog,
        admin_channels,
        admin_vouchers,
        auth,
        groups,
        keys,
        pages,
        support,
        usage,
        wallet,
    )

    for module in (pages, auth, wallet, keys, groups, usage, support, admin, admin_vouchers,
                   admin_channels, admin_catalog):
        app.register_blueprint(module.bp)
    # The relay authenticates by API key only and never reads cookies, so CSRF does not apply;
    # its own per-key limits live in console/relay/metering.py.
    csrf.exempt(relay_bp)
    limiter.exempt(relay_bp)
    app.register_blueprint(relay_bp)


def _is_relay(req=None) -> bool:
    path = (req or request).path
    return path == "/v1" or path.startswith("/v1/")


def _register_security(app: Flask) -> None:
    @app.after_request
    def _headers(resp):
        h = resp.headers
        h.setdefault("X-Content-Type-Options", "nosniff")
        if _is_relay():
            return resp
        h.setdefault("Content-Security-Policy", CSP)
        h.setdefault("Referrer-Policy", "same-origin")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        if app.config.get("SESSION_COOKIE_SECURE"):
            h.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
        if request.endpoint != "static":
            resp.vary.add("HX-Request")
            if current_user and current_user.is_authenticated:
                h["Cache-Control"] = "no-store"
        return resp


def _register_errors(app: Flask) -> None:
    from flask_wtf.csrf import CSRFError
    from werkzeug.exceptions import HTTPException

    def console_error(status: int, title: str, message: str):
        from flask import render_template

        resp = app.make_response(
            (render_template("error.html", status=status, title=title, message=message), status)
        )
        return resp

    @app.errorhandler(CSRFError)
    def _csrf(e):
        return console_error(400, "Form expired", "The form was stale or incomplete. Reload the page and try again.")

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        if _is_relay():
            from console.relay.errors import error_response

            return error_response(e.code or 500, e.description or e.name)
        return console_error(e.code or 500, e.name, e.description or "")

    @app.errorhandler(Exception)
    def _unhandled(e: Exception):
        logging.getLogger("console").exception("unhandled error on %s", request.path)
        if _is_relay():
            from console.relay.errors import error_response

            if _database_unavailable(e):
                # No database connection (server down, too many clients, pool timeout, a lock
                # held too long): temporary, and nothing was written; API clients retry on 503.
                return error_response(503, "The service is busy; retry in a moment.", code="overloaded",
                                      headers={"Retry-After": "1"})
            return error_response(500, "Internal error")
        return console_error(500, "Something went wrong", "The error was logged. Try again in a moment.")


def _database_unavailable(e: Exception) -> bool:
    import sqlite3

    import psycopg
    from sqlalchemy import exc as sa_exc

    return isinstance(e, (sa_exc.OperationalError, sa_exc.TimeoutError, psycopg.OperationalError,
                          sqlite3.OperationalError))


def _register_templating(app: Flask) -> None:
    from flask_wtf.csrf import generate_csrf

    from console import money, settings

    def money_filter(micros: int | None) -> str:
        if micros is None:
            return "—"
        return money.format_credits(int(micros), settings.get("currency_symbol"))

    app.jinja_env.filters["money"] = money_filter
    app.jinja_env.filters["credits"] = lambda m: money.format_fixed(int(m or 0))
    app.jinja_env.filters["usd"] = lambda m: money.format_usd_micros(int(m or 0))
    app.jinja_env.filters["usd_pico"] = lambda p: money.format_usd_pico(int(p or 0))
    app.jinja_env.filters["multiplier"] = lambda ppm: money.format_multiplier(int(ppm))
    app.jinja_env.filters["dt"] = lambda d: d.strftime("%Y-%m-%d %H:%M:%S") if d else "—"

    @app.context_processor
    def _globals():
        from console.ledger import wallet_of

        def nav_wallet():
            return wallet_of(current_user.id) if current_user.is_authenticated else None

        return {"site": settings.all_settings(), "csrf_token": generate_csrf, "nav_wallet": nav_wallet}
