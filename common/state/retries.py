"""Retry policies: wait out a lost Redis or a refusing output disk (backoff, logged) instead of failing."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import TypeVar

import redis
import tenacity
from kombu.exceptions import OperationalError

log = logging.getLogger("koala.state")  # the logger name these warnings have always had


def _log_wait(message: str) -> Callable[[tenacity.RetryCallState], None]:
    """A tenacity before_sleep hook logging `message` with the error and the coming wait."""

    def before_sleep(s: tenacity.RetryCallState) -> None:
        error = s.outcome.exception() if s.outcome is not None else None  # tenacity sets it first
        log.warning(message, error, s.upcoming_sleep)

    return before_sleep


# Redis away, or refusing writes for a while: maxmemory reached with noeviction (OutOfMemoryError), a
# replica during a failover (ReadOnlyError). Other Redis errors are bugs: they are not waited out.
BROKER_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.OutOfMemoryError,
    redis.ReadOnlyError,
    OperationalError,
)

# A worker that loses Redis waits for it (with backoff, logged) instead of failing its work.
retry_on_broker = tenacity.retry(
    retry=tenacity.retry_if_exception_type(BROKER_ERRORS),
    wait=tenacity.wait_exponential(multiplier=0.5, max=30),
    before_sleep=_log_wait("Redis unreachable (%s); retrying in %.1fs"),
    reraise=True,
)

T = TypeVar("T")


def call_retrying(fn: Callable[[], T]) -> tuple[T, bool]:
    """fn() under retry_on_broker, and whether it took more than one attempt: an attempt whose
    answer was lost with the connection may already have taken effect in Redis."""
    attempts = 0

    def attempt() -> T:
        nonlocal attempts
        attempts += 1
        return fn()

    return retry_on_broker(attempt)(), attempts > 1


STORAGE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EPERM}


def is_storage_error(e: BaseException) -> bool:
    """An OSError of the output disk that may pass (full, read-only, quota, I/O), not a bug."""
    return isinstance(e, OSError) and e.errno in STORAGE_ERRORS


# A worker whose output disk refuses writes waits (with backoff, logged) instead of crashing.
retry_on_disk = tenacity.retry(
    retry=tenacity.retry_if_exception(is_storage_error),
    wait=tenacity.wait_exponential(multiplier=0.5, max=30),
    before_sleep=_log_wait("output disk refuses writes (%s); retrying in %.1fs"),
    reraise=True,
)
