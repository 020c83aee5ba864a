"""What the stream meter (relay.protocols.StreamMeter) spends on an upstream's SSE stream.

In process, one thread, no server:

    .venv/bin/python -m bench.meter_bench [--reps 20]

Two streams: a chat stream of 20 small events, one event per read (what a text reply looks
like), and one 2 MB event (a Responses image's base64) cut into reads of 64 kB, 16 kB and
1,448 bytes (one TCP segment: what a distant upstream's reads can be). The meter runs inside
a gevent worker, so CPU spent on one stream is time every other stream of that worker waits.
"""
from __future__ import annotations

import argparse
import json
import time

from console.relay.protocols import CHAT, RESPONSES, StreamMeter


def _chat_stream() -> list[bytes]:
    events = [b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": f" chunk {i}"}, "finish_reason": None}]}).encode() + b"\n\n"
        for i in range(20)]
    usage = {"id": "c", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 20}}
    return [*events, b"data: " + json.dumps(usage).encode() + b"\n\n", b"data: [DONE]\n\n"]


def _image_event(size: int = 2_000_000) -> bytes:
    obj = {"type": "response.image_generation_call.partial_image", "partial_image_b64": "A" * size}
    return b"event: " + obj["type"].encode() + b"\ndata: " + json.dumps(obj).encode() + b"\n\n"


def ms(surface, reads: list[bytes], reps: int) -> float:
    def once():
        meter = StreamMeter(surface, strip_usage_chunk=True)
        for r in reads:
            meter.feed(r)
        meter.rest()

    once()
    start = time.process_time()
    for _ in range(reps):
        once()
    return (time.process_time() - start) / reps * 1000


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    print("CPU ms per stream:")
    print(f"  {'chat, 22 events, one per read':40s} {ms(CHAT, _chat_stream(), args.reps * 50):8.3f}")
    event = _image_event()
    for size in (65536, 16384, 1448):
        reads = [event[i:i + size] for i in range(0, len(event), size)]
        print(f"  {f'2 MB event in {size:,}-byte reads':40s} {ms(RESPONSES, reads, args.reps):8.3f}")


if __name__ == "__main__":
    main()
