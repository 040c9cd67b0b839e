"""The one error tree of bulkoffboard.

::

    BulkOffboardError
    ├── UsageError              bad command line or configuration; nothing was sent (exit 2)
    │   └── SourceError         an input file that cannot be read as the format it claims
    ├── JournalError            the journal cannot be opened, locked, read or written (exit 2)
    │   └── JournalLockedError  another process holds the journal
    ├── AuthError               no token: wrong secret, unknown client or tenant (exit 3)
    └── ApiError                an MDE call answered with an error (carries status, code, target)
        ├── RetryableError      worth another attempt after a delay
        │   ├── ThrottledError  429; carries the server's Retry-After as ``retry_after_s``
        │   ├── ServerError     5xx
        │   └── TransportError  timeout, reset, refused; the request may or may not have arrived
        └── PermanentError      the same request would fail the same way
            ├── NotFoundError        404 ResourceNotFound
            ├── UnsupportedError     400 OsPlatformNotSupported / ClientVersionNotSupported
            ├── ConflictError        400 ActiveRequestAlreadyExists
            ├── ForbiddenError       403 (valid token, missing permission or wrong audience)
            ├── UnauthorizedError    401 (token rejected)
            └── BadRequestError      any other 4xx

Messages never contain a token or a secret: they are built from status codes, error codes and
the server's message, never from request headers.
"""

from __future__ import annotations


class BulkOffboardError(Exception):
    """Root of every error bulkoffboard raises on purpose."""


class UsageError(BulkOffboardError):
    """Bad command line or configuration. Nothing was sent."""


class SourceError(UsageError):
    """An input file cannot be read as the format it claims (names the file and line)."""


class JournalError(BulkOffboardError):
    """The journal cannot be opened, locked, read or written."""


class JournalLockedError(JournalError):
    """Another process holds the journal's lock."""


class AuthError(BulkOffboardError):
    """A token could not be acquired. ``code`` is the AADSTS code or the OAuth error name."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class ApiError(BulkOffboardError):
    """An MDE API call failed.

    ``status`` is the HTTP status (0 for transport errors), ``code`` the ``error.code`` of the
    body, ``target`` the server's correlation id, ``machine_id`` the machine concerned if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str | None = None,
        target: str | None = None,
        machine_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.target = target
        self.machine_id = machine_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self)!r}, status={self.status}, code={self.code!r}, "
            f"machine_id={self.machine_id!r})"
        )


class RetryableError(ApiError):
    """Worth another attempt after a delay."""


class ThrottledError(RetryableError):
    """429 Too Many Requests. ``retry_after_s`` is the server's Retry-After, capped and parsed."""

    def __init__(self, message: str, *, retry_after_s: float, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after_s = retry_after_s


class ServerError(RetryableError):
    """5xx from the API."""


class TransportError(RetryableError):
    """Timeout, reset or refused connection: the request may or may not have reached the API."""


class PermanentError(ApiError):
    """The same request would fail the same way."""


class NotFoundError(PermanentError):
    """404: the machine or action does not exist (or is outside retention)."""


class UnsupportedError(PermanentError):
    """400 OsPlatformNotSupported / ClientVersionNotSupported."""


class ConflictError(PermanentError):
    """400 ActiveRequestAlreadyExists: an action of the same type is already pending."""


class ForbiddenError(PermanentError):
    """403: the token is valid but lacks the permission (or has the wrong audience)."""


class UnauthorizedError(PermanentError):
    """401: the token was rejected (missing, expired or malformed)."""


class BadRequestError(PermanentError):
    """Any other 4xx."""
