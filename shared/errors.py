"""Errors that stage workers raise, and how unexpected errors are classified.

A stage raises PermanentError for input that will never succeed (an
unreadable file, an unsupported type, a document over a limit) and
TransientError for trouble that may pass (a timeout, a dropped connection,
an overloaded embedding API). Anything else is classified by
``classify_error``.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import asyncpg


class IngestdError(Exception):
    """Root of ingestd's own errors."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PermanentError(IngestdError):
    """The input can never be processed: fail the job without retrying."""


class TransientError(IngestdError):
    """The failure may pass: retry the job after a backoff.

    retry_after_seconds, when set, is the wait a remote service asked for
    (for example an HTTP Retry-After header); it replaces the computed
    backoff when longer.
    """

    def __init__(
        self, code: str, message: str, retry_after_seconds: float | None = None
    ) -> None:
        super().__init__(code, message)
        self.retry_after_seconds = retry_after_seconds


@dataclass(frozen=True)
class Classification:
    """Verdict on an error: retry or fail, with its code and message."""

    transient: bool
    code: str
    message: str
    retry_after_seconds: float | None = None


# What a database call can raise when the connection or server fails: the
# caller logs it and tries again later. asyncpg raises InternalClientError
# ("cannot switch to state ...") when a connection is terminated in the
# middle of an operation (asyncpg issues 784 and 1069), and it derives from
# neither of the other two asyncpg classes.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    TimeoutError,
    asyncio.TimeoutError,
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.TooManyConnectionsError,
    asyncpg.CannotConnectNowError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)


def classify_error(exc: BaseException) -> Classification:
    """Decide whether exc is worth a retry, and name it."""
    if isinstance(exc, PermanentError):
        return Classification(False, exc.code, exc.message)
    if isinstance(exc, TransientError):
        return Classification(True, exc.code, exc.message, exc.retry_after_seconds)
    if isinstance(exc, _TRANSIENT_TYPES):
        return Classification(True, "transient_error", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, MemoryError):
        return Classification(False, "limit_exceeded", "the stage ran out of memory")
    # An error no one anticipated may be a bug or a flaky dependency. It is
    # retried with backoff, and the job fails once the retries run out.
    return Classification(True, "internal_error", f"{type(exc).__name__}: {exc}")


def backoff_seconds(
    retry_count: int,
    *,
    base: float = 3.0,
    maximum: float = 300.0,
    jitter: float = 0.1,
    rng: random.Random | None = None,
) -> float:
    """Delay before retry number retry_count + 1: ``min(maximum, base * 2**retry_count)``.

    Up to ``jitter`` (a fraction) of the delay is added at random, so jobs
    that failed together do not all return at the same instant. The result
    never exceeds maximum.
    """
    exponent = min(max(retry_count, 0), 32)
    delay = min(maximum, base * (2**exponent))
    spread = (rng or random).uniform(0, jitter * delay)
    return min(maximum, delay + spread)
