"""Request bodies a client compressed: `Content-Encoding` gzip, deflate or zstd.

Codex CLI signed in to a ChatGPT account sends its Responses requests zstd-compressed (level 3,
`Content-Encoding: zstd`); other clients and proxies send gzip. The relay decodes them before
parsing, and the upstream gets plain JSON (the body is re-encoded for it anyway, and the
header is not forwarded). The decoded body is held to the same limit as a plain one
(RELAY_MAX_BODY), checked while decoding, so a small bomb never expands in memory beyond it.

- identity, or no header: the bytes as they came;
- gzip / x-gzip (members in a row too), deflate (zlib-wrapped, or raw as some clients send it),
  zstd (frames in a row too); at most two codings, undone last first (RFC 9110);
- any other coding (br, compress…): 415, naming the ones accepted;
- bytes that do not decode: 400; decoded beyond the limit: 413.
"""
from __future__ import annotations

import zlib

import zstandard

from console.relay.errors import RelayError

ACCEPTED = ("gzip", "deflate", "zstd")
MAX_CODINGS = 2
_READ = 1 << 20


def decode(raw: bytes, header: str | None, limit: int) -> bytes:
    """`raw` with the codings named in a Content-Encoding `header` undone; RelayError if not."""
    if not header:  # nearly every call
        return raw
    codings = [c.strip().lower() for c in header.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return raw
    for coding in codings:
        if _DECODERS.get(coding) is None:
            raise RelayError(415, f"Content-Encoding {coding[:40]!r} is not supported: send the body "
                                  f"uncompressed, or as {', '.join(ACCEPTED)}.",
                             code="unsupported_content_encoding")
    if len(codings) > MAX_CODINGS:
        raise RelayError(415, f"At most {MAX_CODINGS} content codings are accepted.",
                         code="unsupported_content_encoding")
    for i, coding in enumerate(reversed(codings)):
        # An inner layer is itself compressed data: incompressible bytes grow a little in it
        # (zlib's stored blocks by 5 bytes per 64 KiB), so it gets that much room.
        last = i == len(codings) - 1
        raw = _DECODERS[coding](raw, limit if last else limit + (limit >> 6) + 4096)
    return raw


def _too_large(limit: int) -> RelayError:
    size = f"{limit >> 20} MiB" if limit and limit % (1 << 20) == 0 else f"{limit:,} bytes"
    return RelayError(413, f"The body is larger than {size} once decompressed.", code="request_too_large")


def _corrupt(coding: str) -> RelayError:
    return RelayError(400, f"The body is not valid {coding} data.", code="invalid_body_encoding")


def _zlib(data: bytes, limit: int, wbits: int, coding: str, *, members: bool) -> bytes:
    """Decompress with zlib, never producing more than limit + 1 bytes; with `members`, one
    stream after another (gzip allows several in a row)."""
    out = bytearray()
    try:
        while True:
            d = zlib.decompressobj(wbits=wbits)
            out += d.decompress(data, limit + 1 - len(out))
            if len(out) > limit:
                raise _too_large(limit)
            if not d.eof:
                raise _corrupt(coding)  # cut short
            data = d.unused_data
            if not data:
                return bytes(out)
            if not members:
                raise _corrupt(coding)  # bytes after the end of the stream
    except zlib.error:
        raise _corrupt(coding) from None


def _gzip(data: bytes, limit: int) -> bytes:
    return _zlib(data, limit, 31, "gzip", members=True)


def _deflate(data: bytes, limit: int) -> bytes:
    # RFC 9110's deflate is the zlib format; some clients send a bare deflate stream.
    wbits = 15 if len(data) >= 2 and (data[0] << 8 | data[1]) % 31 == 0 and data[0] & 0x0F == 8 else -15
    return _zlib(data, limit, wbits, "deflate", members=False)


def _zstd(data: bytes, limit: int) -> bytes:
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as reader:
            while len(out) <= limit:
                chunk = reader.read(min(_READ, limit + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError:
        raise _corrupt("zstd") from None
    if len(out) > limit:
        raise _too_large(limit)
    # A frame cut short yields what it decoded so far, without an error: the JSON parser
    # refuses the cut body (400), as it refuses any other incomplete one.
    return bytes(out)


_DECODERS = {"gzip": _gzip, "x-gzip": _gzip, "deflate": _deflate, "zstd": _zstd}
