"""Debian's chromium driven by Playwright, for browser tests (no browser download)."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

import pytest

from tests.conftest import IN_CI

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium")
    if path:
        return path
    if IN_CI:
        pytest.fail("CI=true but Debian's chromium is not installed: browser tests must run in CI")
    pytest.skip("chromium not installed (apt-get install chromium) — browser tests skipped")


@contextmanager
def browser_page():
    """A fresh page; console errors (CSP violations included) are collected on page.errors."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=ARGS, headless=True)
        try:
            context = browser.new_context()
            page = context.new_page()
            page.errors = []
            page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            yield page
            context.close()
        finally:
            browser.close()
