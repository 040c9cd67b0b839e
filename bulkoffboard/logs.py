"""Logging set-up (only the CLI calls it) and the redaction every log line passes through."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

#: Keys whose values never reach a log line.
_SECRET_KEY = re.compile(
    r"secret|token|password|passphrase|authorization|assertion|credential", re.I
)
#: Values that look like bearer tokens or JWTs, wherever they appear.
_SECRET_VALUE = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9._-]+")
REDACTED = "[REDACTED]"
#: The password of a URL's user info (``scheme://user:PASSWORD@host``), up to the token's last
#: ``@``: a password with an unencoded ``@`` or ``/`` is hidden whole (more, never less).
_URL_PASSWORD = re.compile(r"(://[^\s/:@]*:)\S*@")


def redact_text(text: str) -> str:
    """Hide bearer tokens, JWT-looking strings and URL passwords inside free text."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    return _SECRET_VALUE.sub(lambda m: (m.group(1) or "") + REDACTED, text)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else _redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop secret-named keys, mask token-looking values."""
    for key in list(event):
        if _SECRET_KEY.search(key) and key != "event":
            event[key] = REDACTED
        else:
            event[key] = _redact(event[key])
    return event


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Logs go to stderr: JSON when not on a terminal (or asked), human-readable on one."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # No local variables in tracebacks: a secret in a local would end up in the log.
        structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        if fmt == "json"
        else structlog.dev.set_exc_info,
        redact,
    ]
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
        factory: Any = structlog.BytesLoggerFactory(
            file=stream.buffer if hasattr(stream, "buffer") else None
        )
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=stream.isatty()))
        factory = structlog.PrintLoggerFactory(file=stream)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
