"""A real gunicorn server (gevent workers) on 127.0.0.1 for end-to-end tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flask_cli(db_url: str, *args: str, env: dict | None = None, check: bool = True):
    """Run `flask --app app …` as operators do, against db_url."""
    full = {**os.environ, "DATABASE_URL": db_url, **(env or {})}
    return subprocess.run([str(BIN / "flask"), "--app", "app", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, check=check, timeout=120)


def migrate(db_url: str) -> None:
    """`flask db upgrade` on an empty database, as production builds one (on PostgreSQL the
    db_url fixture hands out the create_all schema, so it is dropped first)."""
    if db_url.startswith("postgresql"):
        from tests.conftest import reset_postgres
        reset_postgres(db_url)
    flask_cli(db_url, "db", "upgrade")


@contextmanager
def gunicorn(db_url: str, *, workers: int = 2, env: dict | None = None, log_path: Path | None = None):
    """Start gunicorn with our config; yields the base URL; stops it at the end."""
    port = free_port()
    full = {**os.environ, "DATABASE_URL": db_url, "BIND": f"127.0.0.1:{port}",
            "WEB_CONCURRENCY": str(workers), "ACCESS_LOG": "-", **(env or {})}
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([str(BIN / "gunicorn"), "-c", "python:console.gunicorn_conf", "app:app"],
                            cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {proc.returncode}")
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not become healthy in 30 s")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            out.close()
