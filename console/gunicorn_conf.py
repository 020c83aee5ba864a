"""Gunicorn settings: `gunicorn -c python:console.gunicorn_conf app:app`.

Serving model, chosen from measurements (bench/README.md): gevent workers. LLM calls stream
for seconds to minutes; a thread-per-request worker caps concurrent streams at its thread
count, while a gevent worker holds thousands of idle streams. Database statements are kept
short (one small transaction each) so they never stall the other streams of a worker.
Measured 2026-11-28 on 2 cores, 0.6 s streams through a bare forwarder, 64 / 256 clients:
gthread 2 workers x 8 threads 26 / 27 streams/s, gevent 2 workers 103 / 410 (upstream: 104 / 414).
Chosen: gevent, WEB_CONCURRENCY workers (default min(4, nproc)), 4,000 connections each.
"""
import multiprocessing
import os

bind = os.environ.get("BIND", f"127.0.0.1:{os.environ.get('PORT', '8000')}")
worker_class = os.environ.get("WORKER_CLASS", "gevent")
workers = int(os.environ.get("WEB_CONCURRENCY", min(4, multiprocessing.cpu_count())))
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "4000"))
# With gevent this is the heartbeat timeout, not a cap on a stream's length.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "30"))
keepalive = 5
# Request-line and header limits (gunicorn defaults, named so reviewers see them).
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190
# The access log never shows headers or query strings, so no credential can reach it.
accesslog = os.environ.get("ACCESS_LOG", "-")
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")

# Every worker settles relay calls left pending past their deadline (a worker that died
# mid-call), once at start and then every RECONCILE_EVERY_S seconds, and probes the paused
# channels whose pause is over every CHANNEL_PROBE_EVERY_S seconds (console/relay/probe.py);
# both jittered so workers spread out, and both safe to run in every worker at once.
RECONCILE_EVERY_S = float(os.environ.get("RECONCILE_EVERY_S", "60"))
CHANNEL_PROBE_EVERY_S = float(os.environ.get("CHANNEL_PROBE_EVERY_S", "15"))


def _every(worker, app, seconds: float, task, what: str) -> None:
    import random
    import time  # cooperative under gevent: its worker patches the time module

    time.sleep(random.uniform(0, min(5.0, seconds)))
    while True:
        try:
            with app.app_context():
                task()
        except Exception:  # a database hiccup must not kill the loop
            worker.log.exception("periodic %s failed", what)
        time.sleep(seconds * random.uniform(0.8, 1.2))


def _reconcile_all() -> None:
    from console.relay.metering import reconcile

    while reconcile():
        pass


def _probe() -> None:
    from console.relay.probe import probe_due

    probe_due()


def post_worker_init(worker):
    app = worker.wsgi  # the Flask app, loaded before this hook runs
    # Only the console app settles relay calls (bench tools reuse this configuration).
    if "relay" not in getattr(app, "blueprints", {}):
        return
    if worker_class == "gevent":
        import gevent

        spawn = gevent.spawn
    else:  # a greenlet needs the gevent hub; any other worker class gets daemon threads
        import threading

        def spawn(fn, *args):
            threading.Thread(target=fn, args=args, daemon=True).start()
    spawn(_every, worker, app, RECONCILE_EVERY_S, _reconcile_all, "reconcile")
    spawn(_every, worker, app, CHANNEL_PROBE_EVERY_S, _probe, "channel probe")
