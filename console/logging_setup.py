"""Log redaction: API keys, channel secrets, bearer tokens and cookies never reach a log line.

A logging.Filter rewrites every record's message and arguments (exception text included),
and newlines are encoded so a log line cannot be forged.
"""
from __future__ import annotations

import logging
import re

from flask import Flask

_PATTERNS = [
    (re.compile(r"(?i)(authorization\s*[:=]\s*)(bearer\s+)?[^\s,'\"]+"), r"\1\2[redacted]"),
    (re.compile(r"(?i)(x-api-key|api-key|cookie)(\s*[:=]\s*)[^\s,'\"]+"), r"\1\2[redacted]"),
    (re.compile(r"(?i)([?&](?:key|api_key|token)=)[^&\s'\"]+"), r"\1[redacted]"),
    (re.compile(r"sk-[A-Za-z0-9_\-]{8,}"), "sk-[redacted]"),
    (re.compile(r"\b(?:Bearer)\s+[A-Za-z0-9._\-]{8,}"), "Bearer [redacted]"),
]


def redact(text: str) -> str:
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not lose the record
            message = str(record.msg)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.exc_info = None if record.exc_text else record.exc_info
        record.msg = redact(message).replace("\n", "\\n").replace("\r", "\\r")
        record.args = None
        return True


_FILTER = RedactingFilter()


def install_redaction(app: Flask) -> None:
    """Attach the filter to every handler we know of (root, gunicorn, the app's)."""
    for name in ("", "gunicorn.error", "gunicorn.access", "console", app.logger.name, "werkzeug"):
        logger = logging.getLogger(name)
        logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
