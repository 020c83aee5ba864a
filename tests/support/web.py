"""Test helpers for the console: CSRF tokens read from pages, logins, users."""
from __future__ import annotations

import re

from console import accounts
from console.extensions import db

PASSWORD = "correct horse battery staple"
_TOKEN = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"|"X-CSRFToken": "([^"]+)"')


def csrf_from(html: str | bytes) -> str:
    if isinstance(html, bytes):
        html = html.decode()
    m = _TOKEN.search(html)
    assert m, "no CSRF token on the page"
    return m.group(1) or m.group(2)


def make_user(email: str = "user@example.com", role: str = "user", password: str = PASSWORD):
    user = accounts.create_user(email, password, role)
    db.session.refresh(user)  # loaded now, so attributes stay readable after later commits
    return user


def login(client, email: str = "user@example.com", password: str = PASSWORD):
    page = client.get("/login")
    token = csrf_from(page.data)
    resp = client.post("/login", data={"email": email, "password": password, "csrf_token": token})
    assert resp.status_code == 302, resp.data[:500]
    return resp


def page_token(client, path: str = "/") -> str:
    return csrf_from(client.get(path).data)


HX = {"HX-Request": "true"}
