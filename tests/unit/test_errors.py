"""Error classification and the retry backoff of shared.errors."""

from __future__ import annotations

import math
import random

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import (
    Classification,
    IngestdError,
    PermanentError,
    TransientError,
    backoff_seconds,
    classify_error,
)

# No per-example deadline: on a busy shared machine a pure function can
# take over the default 200 ms once, which failed these tests at random.
retry_counts = st.integers(min_value=0, max_value=1_000)
bases = st.floats(min_value=0.001, max_value=1_000, allow_nan=False)
maximums = st.floats(min_value=0.001, max_value=100_000, allow_nan=False)
jitters = st.floats(min_value=0, max_value=2, allow_nan=False)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def expected_delay(retry_count: int, base: float, maximum: float) -> float:
    """Delay without jitter, computed independently of backoff_seconds."""
    return min(maximum, base * 2.0 ** min(retry_count, 32))


# Backoff ------------------------------------------------------------------


@settings(deadline=None)
@given(retry_counts, bases, maximums, jitters, seeds)
def test_backoff_positive_and_capped(
    retry_count: int, base: float, maximum: float, jitter: float, seed: int
) -> None:
    delay = backoff_seconds(
        retry_count,
        base=base,
        maximum=maximum,
        jitter=jitter,
        rng=random.Random(seed),
    )
    assert delay > 0
    assert delay <= maximum


@settings(deadline=None)
@given(retry_counts, bases, maximums)
def test_backoff_without_jitter_exact(
    retry_count: int, base: float, maximum: float
) -> None:
    delay = backoff_seconds(retry_count, base=base, maximum=maximum, jitter=0)
    assert delay == expected_delay(retry_count, base, maximum)


@settings(deadline=None)
@given(retry_counts, bases, maximums)
def test_backoff_never_decreases(retry_count: int, base: float, maximum: float) -> None:
    delay = backoff_seconds(retry_count, base=base, maximum=maximum, jitter=0)
    following = backoff_seconds(retry_count + 1, base=base, maximum=maximum, jitter=0)
    assert following >= delay


@settings(deadline=None)
@given(retry_counts, bases, maximums, jitters, seeds)
def test_backoff_jitter_within_bounds(
    retry_count: int, base: float, maximum: float, jitter: float, seed: int
) -> None:
    delay = backoff_seconds(
        retry_count,
        base=base,
        maximum=maximum,
        jitter=jitter,
        rng=random.Random(seed),
    )
    plain = expected_delay(retry_count, base, maximum)
    highest = min(maximum, plain * (1 + jitter))
    assert delay >= plain
    # A relative slack of 1e-12, because d + jitter * d and d * (1 + jitter)
    # may round differently.
    assert delay <= highest or math.isclose(delay, highest, rel_tol=1e-12)


def test_backoff_defaults_grow_then_cap() -> None:
    delays = [backoff_seconds(retry, jitter=0) for retry in range(9)]
    assert delays == [3, 6, 12, 24, 48, 96, 192, 300, 300]


def test_backoff_negative_retry_counts_as_first() -> None:
    assert backoff_seconds(-5, base=2, jitter=0) == 2


def test_backoff_huge_retry_count_stays_capped() -> None:
    # The exponent stops at 32, so a corrupt retry count cannot overflow.
    assert backoff_seconds(10**9, base=3, maximum=10**12, jitter=0) == 3 * 2**32
    assert backoff_seconds(10**9, jitter=0.5) == 300


def test_backoff_same_seed_same_delay() -> None:
    first = backoff_seconds(4, jitter=0.5, rng=random.Random(7))
    second = backoff_seconds(4, jitter=0.5, rng=random.Random(7))
    assert first == second
    assert 48 <= first <= 72


def test_backoff_uses_global_random_without_rng() -> None:
    state = random.getstate()
    try:
        random.seed(11)
        first = backoff_seconds(2, jitter=1)
        random.seed(11)
        second = backoff_seconds(2, jitter=1)
    finally:
        random.setstate(state)
    assert first == second
    assert 12 <= first <= 24


# Classification -----------------------------------------------------------


def test_ingestd_error_keeps_code_and_message() -> None:
    error = IngestdError("corrupt_file", "the PDF has no trailer")
    assert error.code == "corrupt_file"
    assert error.message == "the PDF has no trailer"
    assert str(error) == "the PDF has no trailer"


def test_permanent_error_is_not_retried() -> None:
    verdict = classify_error(PermanentError("corrupt_file", "bad xref table"))
    assert verdict == Classification(False, "corrupt_file", "bad xref table")
    assert verdict.retry_after_seconds is None


def test_transient_error_keeps_retry_after() -> None:
    verdict = classify_error(TransientError("rate_limited", "HTTP 429", 7.0))
    assert verdict == Classification(True, "rate_limited", "HTTP 429", 7.0)


def test_transient_error_without_retry_after() -> None:
    error = TransientError("storage_error", "disk busy")
    assert error.retry_after_seconds is None
    verdict = classify_error(error)
    assert verdict.transient
    assert verdict.retry_after_seconds is None


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError("read timed out"),
        ConnectionError("network unreachable"),
        ConnectionResetError("reset by peer"),
        ConnectionRefusedError("refused"),
        BrokenPipeError("broken pipe"),
        asyncpg.PostgresConnectionError("connection failure"),
        asyncpg.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.InterfaceError("cannot perform operation: connection is closed"),
        asyncpg.TooManyConnectionsError("too many clients already"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.DeadlockDetectedError("deadlock detected"),
        asyncpg.SerializationError("could not serialize access"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_classify_transient_kinds(error: BaseException) -> None:
    verdict = classify_error(error)
    assert verdict.transient
    assert verdict.code == "transient_error"
    assert verdict.message == f"{type(error).__name__}: {error}"
    assert verdict.retry_after_seconds is None


def test_classify_memory_error_permanent() -> None:
    verdict = classify_error(MemoryError())
    assert verdict == Classification(
        False, "limit_exceeded", "the stage ran out of memory"
    )


@pytest.mark.parametrize(
    "error",
    [
        ValueError("invalid literal for int() with base 10: 'x'"),
        KeyError("page_offsets"),
        asyncpg.UndefinedTableError('relation "upload_jobs" does not exist'),
    ],
    ids=lambda error: type(error).__name__,
)
def test_classify_unexpected_error_retried(error: BaseException) -> None:
    verdict = classify_error(error)
    assert verdict.transient
    assert verdict.code == "internal_error"
    assert verdict.message == f"{type(error).__name__}: {error}"
