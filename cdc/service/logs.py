"""Structured logging: text or JSON lines on stderr, with secrets scrubbed from every record.

Credentials can reach a log line through an exception message (libpq and aiormq both echo
URLs), so redaction runs on the final formatted text, not only on our own arguments.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime

import orjson

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@", re.I)
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I)


def redact(text: str) -> str:
    """Remove passwords from URLs (``user:pw@``) and ``password=...`` DSN fields."""
    text = _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text)
    return _KV_PASSWORD.sub(r"\1***", text)


_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in record.__dict__.items() if k not in _RESERVED}
        line = super().format(record)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return redact(line)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED:
                doc[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        # Redact values before encoding: a pattern run over JSON text could eat its quotes.
        # Whatever non-string value is left is stringified by default=str, then redacted.
        return orjson.dumps(doc, default=lambda v: redact(str(v))).decode()


def configure(fmt: str, level: str) -> None:
    """Install the one stderr handler for the process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiormq logs every connection hiccup at ERROR with a traceback; we report those ourselves.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
