"""Riding out a storage outage or throttling: one retry policy for every whole-file read and write.

An object store that goes away for a minute (a restart, a failover) or answers ``503 SlowDown``
under load must not turn a nightly job's images into error rows: a rerun skips images with a row,
so an outage recorded that way would never be scored again.  So a *transient* failure (connection
refused or reset, a timeout, a 5xx or throttling answer) is retried here with exponential backoff,
within a number of retries and a time budget; when the budget is spent the failure is raised as
:class:`StorageUnavailableError`, which the jobs treat as a failure of the run (exit 1, the batch
gets no row, the rerun scores it), never as a fact about the image.  A *permanent* failure (the
object is missing, access denied, a full disk) is raised at once: retrying cannot change it.

The policy lives in each process, read from two environment variables, because every process
of a job (the driver, Ray's decode tasks, the writers, the shard actors) reads and writes, and
``SPADE_RAY_*`` variables already travel to all of them (:mod:`spade_ray.distributed.runtime`).
The object store client's own retries are turned off where this policy applies (see
:func:`client_options`), so the two never multiply.

Retries are counted per process (:func:`retries_so_far`), so the jobs can report them.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from spade_ray.errors import error_reason

__all__ = ["RETRIES_ENV", "RETRY_SECONDS_ENV", "OutputWriteError", "StorageRetry", "StorageUnavailableError",
           "client_options", "current_retry", "find_storage_failure", "is_transient", "retries_so_far", "use_retry",
           "with_retries"]

RETRIES_ENV = "SPADE_RAY_STORAGE_RETRIES"
RETRY_SECONDS_ENV = "SPADE_RAY_STORAGE_RETRY_SECONDS"

T = TypeVar("T")


@dataclass(frozen=True)
class StorageRetry:
    """How long one read or write keeps trying through transient failures.

    The defaults always ride out an outage of a minute (a store restarting, a load balancer
    failing over: the twelve waits add up to at least 60 s, jitter at its shortest) and give up
    after ``seconds`` on one that lasts: a night's job should wait for a blip but fail clearly,
    not hang, when the store is really gone.  The delay doubles from ``backoff`` up to
    ``max_backoff``, each drawn between half and all of that (jitter), so the many workers of a
    job do not come back at the same instant.  The timeouts bound one attempt: a store that
    accepts connections but never answers is a failure too.
    """

    retries: int = 12
    seconds: float = 120.0
    backoff: float = 0.5
    max_backoff: float = 15.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.seconds < 0:
            raise ValueError(f"storage retries and retry seconds must be >= 0; got {self.retries}, {self.seconds}")

    def delays(self) -> Iterator[float]:
        """The waits before each retry, at most ``retries`` of them."""
        for attempt in range(self.retries):
            cap = min(self.max_backoff, self.backoff * 2 ** attempt)
            yield cap * random.uniform(0.5, 1.0)

    def env(self) -> dict[str, str]:
        return {RETRIES_ENV: str(self.retries), RETRY_SECONDS_ENV: f"{self.seconds:g}"}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StorageRetry:
        """The policy the variables set (defaults where unset); a malformed value is an error naming it."""
        environ = os.environ if environ is None else environ
        policy = cls()
        for name, field, kind in ((RETRIES_ENV, "retries", int), (RETRY_SECONDS_ENV, "seconds", float)):
            if environ.get(name):
                try:
                    policy = replace(policy, **{field: kind(environ[name])})
                except ValueError as exc:
                    raise ValueError(f"{name}={environ[name]!r}: {exc}") from None
        return policy


def current_retry() -> StorageRetry:
    """This process's policy: what :func:`use_retry` set, else what the environment says."""
    return StorageRetry.from_env()


def use_retry(policy: StorageRetry) -> None:
    """Make ``policy`` this process's, and (through the environment) that of the Ray it starts or joins next.

    The job forwards ``SPADE_RAY_*`` variables to its workers when it joins Ray, so call this first.
    """
    os.environ.update(policy.env())


class StorageUnavailableError(OSError):
    """A read or write that kept failing transiently until the retry budget was spent (an I/O error, retried already).

    Built from its message alone (see :meth:`after`), so it survives the trip from a Ray worker to the driver.
    """

    @classmethod
    def after(cls, url: str, cause: BaseException, attempts: int, seconds: float,
              policy: StorageRetry) -> StorageUnavailableError:
        return cls(f"storage unavailable: {url}: {error_reason(cause)} (still failing after {attempts} attempts "
                   f"in {seconds:.0f}s; --storage-retries {policy.retries}, --storage-retry-seconds {policy.seconds:g})")


class OutputWriteError(OSError):
    """A job's output could not be written (store gone, disk full, write denied); built from its message alone."""

    @classmethod
    def of(cls, output: str, cause: BaseException) -> OutputWriteError:
        reason = str(cause) if isinstance(cause, StorageUnavailableError) else error_reason(cause)
        return cls(f"cannot write the output {output}: {reason}")


# errno values of a transient failure: the store or the network, not the request
_TRANSIENT_ERRNO = {errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                    errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, getattr(errno, "EREMOTEIO", 121)}
# S3 error codes that say "later", whatever the HTTP status
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestLimitExceeded", "503", "500", "502", "504"}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_transient_one(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return True
    names = {f"{c.__module__}.{c.__name__}" for c in type(exc).__mro__}
    if names & {"botocore.exceptions.ConnectionError", "botocore.exceptions.HTTPClientError",
                "aiohttp.client_exceptions.ClientError", "asyncio.exceptions.TimeoutError"}:
        return True
    response = getattr(exc, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code in _TRANSIENT_CODES or status >= 500
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the store or the network failed, not the request.

    A missing object or a refused permission is permanent, whatever raised it.
    """
    if isinstance(exc, StorageUnavailableError):
        return False  # already retried
    chain = list(_chain(exc))
    if isinstance(chain[0], (FileNotFoundError, PermissionError)):
        return False
    return any(_is_transient_one(e) for e in chain)


_count_lock = threading.Lock()
_count = 0


def retries_so_far() -> int:
    """Retries made in this process since it started (every thread, every job)."""
    return _count


def _counted() -> None:
    global _count
    with _count_lock:
        _count += 1


def with_retries(fn: Callable[[], T], url: str, policy: StorageRetry | None = None) -> T:
    """``fn()``, retried through transient failures as ``policy`` (default: this process's) allows.

    Raises :class:`StorageUnavailableError` naming ``url`` once the retries or the seconds are
    spent; a permanent failure is raised unchanged at once.
    """
    policy = policy or current_retry()
    start = time.monotonic()
    delays = policy.delays()
    attempts = 0
    while True:
        attempts += 1
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = next(delays, None)
            elapsed = time.monotonic() - start
            if delay is None or elapsed + delay > policy.seconds:
                raise StorageUnavailableError.after(url, exc, attempts, elapsed, policy) from exc
        _counted()
        time.sleep(delay)


def client_options(protocol: str, storage_options: Mapping[str, Any] | None,
                   policy: StorageRetry | None = None) -> dict[str, Any]:
    """``storage_options`` for a client whose retries this policy replaces (S3: botocore makes one attempt).

    botocore retries on its own (5 attempts by default) and s3fs again around it (5 times, twice
    nested for a read): they multiply, and neither counts nor bounds the time.  So for S3 botocore
    is told to make one attempt, with this policy's timeouts (options the caller gave win), and
    s3fs's own loop is set to one try where the filesystem is made (:mod:`spade_ray.storage.urls`).
    """
    options = dict(storage_options or {})
    if protocol not in ("s3", "s3a"):
        return options
    policy = policy or current_retry()
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1})
    config.setdefault("connect_timeout", policy.connect_timeout)
    config.setdefault("read_timeout", policy.read_timeout)
    options["config_kwargs"] = config
    return options


def find_storage_failure(exc: BaseException) -> StorageUnavailableError | OutputWriteError | None:
    """The storage failure behind ``exc``, however many wrappers (Ray's task errors) are around it.

    Ray re-raises a worker's exception on the driver inside its own types, whose first line names
    the task, not the cause; the jobs use this to say in one line what failed.
    """
    stack: list[BaseException] = [exc]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (StorageUnavailableError, OutputWriteError)):
            return _clean(current)
        stack.extend(e for e in (current.__cause__, current.__context__, getattr(current, "cause", None))
                     if isinstance(e, BaseException))
    return _from_text(exc)


def _from_text(exc: BaseException) -> StorageUnavailableError | OutputWriteError | None:
    """The failure named in ``exc``'s text: Ray may hand back only the remote traceback, not the exception."""
    text = str(exc)
    for cls, marker in _MARKERS.items():
        lines = [line for line in text.splitlines() if marker in line]
        if lines:
            return cls(lines[-1][lines[-1].index(marker):])
    return None


_MARKERS = {OutputWriteError: "cannot write the output ", StorageUnavailableError: "storage unavailable: "}


def _clean(exc: StorageUnavailableError | OutputWriteError) -> StorageUnavailableError | OutputWriteError:
    """The failure with its own message: Ray's wrapper is an instance of it too, whose message is a traceback."""
    for cls, marker in _MARKERS.items():
        if isinstance(exc, cls):
            lines = [line for line in str(exc).splitlines() if marker in line]
            return cls(lines[-1][lines[-1].index(marker):]) if lines else exc
    return exc
