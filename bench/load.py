"""Load generator for the relay benchmark: N concurrent clients for a fixed time.

Each client is a gevent greenlet with one keep-alive HTTP/1.1 connection that sends the
same POST again and again. A minimal client on raw sockets (no HTTP library) keeps the
generator's own CPU use low, since it shares the machine's cores with the servers under
test. Per call it records the latency (request written → response complete), the time to
first byte (request written → first byte of the body, i.e. the first SSE event of a
stream) and whether the call succeeded: status 200 and, for a stream, the protocol's
terminator ("data: [DONE]" or "message_stop") at the end.

Only calls that complete inside the measurement window count towards rps and the
percentiles; the first `--warmup` seconds (connection set-up, ramp) are left out. Errors
count over the whole run, including the drain of in-flight calls after the window.

    python -m bench.load --url http://127.0.0.1:8000/v1/chat/completions -c 64 -d 5 \
        --body '{"model": "fake-model", "messages": [...]}' --header 'authorization: Bearer sk-…'

Prints one JSON object on stdout (see `summary()`).
"""

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import json
import resource
import socket
import sys
import time
from urllib.parse import urlsplit

import gevent

TERMINATORS = (b"data: [DONE]", b"event: message_stop", b"event: response.completed")


class Stats:
    def __init__(self):
        self.latencies: list[float] = []
        self.ttfbs: list[float] = []
        self.errors: dict[str, int] = {}
        self.completed = 0
        self.window = (0.0, 0.0)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class _Conn:
    """One keep-alive connection; `call()` returns (status, ttfb, body-ok) or raises OSError."""

    def __init__(self, host: str, port: int, timeout: float):
        self.addr, self.timeout = (host, port), timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self):
        self.sock = socket.create_connection(self.addr, timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by server")
        return data

    def call(self, request: bytes, stream: bool) -> tuple[int, float, bool]:
        if self.sock is None:
            self._connect()
        self.sock.sendall(request)
        start = time.perf_counter()
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip().lower()
        ttfb = None
        if rest:
            ttfb = time.perf_counter() - start
        body = bytearray()
        if b"content-length" in headers:
            need = int(headers[b"content-length"])
            while len(rest) < need:
                rest += self._recv()
                if ttfb is None:
                    ttfb = time.perf_counter() - start
            body, self.buf = rest[:need], rest[need:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            self.buf = rest
            while True:
                while b"\r\n" not in self.buf:
                    self.buf += self._recv()
                size_line, _, self.buf = self.buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    self.buf += self._recv()
                if size and ttfb is None:
                    ttfb = time.perf_counter() - start
                body += self.buf[:size]
                self.buf = self.buf[size + 2:]
                if size == 0:
                    break
        else:  # no framing: read to close
            body = bytearray(rest)
            try:
                while True:
                    body += self._recv()
                    if ttfb is None:
                        ttfb = time.perf_counter() - start
            except ConnectionError:
                pass
            self.close()
        if ttfb is None:
            ttfb = time.perf_counter() - start
        if headers.get(b"connection") == b"close":
            self.close()
        tail = bytes(body[-400:])
        ok = status == 200 and (not stream or any(t in tail for t in TERMINATORS))
        return status, ttfb, ok


def _client(i, conc, req, stream, stats, t_start, measure_from, stop_at, ramp, timeout, host, port):
    gevent.sleep(ramp * i / conc)  # spread the first connections over the ramp
    conn = _Conn(host, port, timeout)
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        try:
            with gevent.Timeout(timeout, TimeoutError):
                status, ttfb, ok = conn.call(req, stream)
        except TimeoutError:
            stats.error("timeout")
            conn.close()
            continue
        except (OSError, ValueError, IndexError) as exc:
            stats.error(type(exc).__name__)
            conn.close()
            gevent.sleep(0.01)
            continue
        t1 = time.perf_counter()
        if not ok:
            stats.error(f"status {status}" if status != 200 else "incomplete stream")
            continue
        stats.completed += 1
        if measure_from <= t1 <= stop_at:
            stats.latencies.append(t1 - t0)
            stats.ttfbs.append(ttfb)
    conn.close()


def _pct(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def summary(stats: Stats, duration: float, concurrency: int) -> dict:
    ms = lambda v: None if v is None else round(v * 1000, 3)
    return {
        "concurrency": concurrency,
        "duration_s": duration,
        "requests": len(stats.latencies),
        "completed_total": stats.completed,  # warm-up and late calls included (server CPU per call)
        "rps": round(len(stats.latencies) / duration, 1),
        "p50_ms": ms(_pct(stats.latencies, 50)),
        "p99_ms": ms(_pct(stats.latencies, 99)),
        "ttfb_p50_ms": ms(_pct(stats.ttfbs, 50)),
        "ttfb_p99_ms": ms(_pct(stats.ttfbs, 99)),
        "errors": sum(stats.errors.values()),
        "error_kinds": stats.errors,
    }


def run(url, body, headers, concurrency, duration, warmup, timeout, stream, ramp=None):
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: keep-alive", *headers]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    stats = Stats()
    now = time.perf_counter()
    measure_from, stop_at = now + warmup, now + warmup + duration
    ramp = min(warmup, 1.0 if ramp is None else ramp)
    greenlets = [gevent.spawn(_client, i, concurrency, request, stream, stats, now, measure_from,
                              stop_at, ramp, timeout, host, port) for i in range(concurrency)]
    gevent.joinall(greenlets, timeout=warmup + duration + timeout + 5)
    left = sum(1 for g in greenlets if not g.dead)
    if left:
        stats.error("client stuck")
        gevent.killall(greenlets, block=False)
    return summary(stats, duration, concurrency)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--body", required=True, help="JSON request body, or @FILE to read it from a file")
    p.add_argument("--header", action="append", default=[], help="extra 'name: value' header")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-d", "--duration", type=float, default=5.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=60.0, help="per-call timeout (s)")
    p.add_argument("--ramp", type=float, default=None,
                   help="spread the clients' first calls over this many seconds (default 1, at most --warmup)")
    args = p.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.body.startswith("@"):
        with open(args.body[1:], "rb") as f:
            body = f.read()
    else:
        body = args.body.encode()
    stream = bool(json.loads(body).get("stream"))
    result = run(args.url, body, args.header, args.concurrency, args.duration, args.warmup,
                 args.timeout, stream, args.ramp)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
