"""SIGTERM on the driver (a KubeRay RayJob deleted, its pod preempted, ``ray job stop``): a bounded, clean stop.

A scheduler asks a job to stop with SIGTERM and kills it a grace period later.  Left alone,
Python dies at once on SIGTERM before ``ray.init`` and Ray's own handler (``sys.exit(15)``, set by
``ray.init``) afterwards: either way no one says what happened, and a stop that hangs in Ray's
shutdown is killed without a trace.  Under :func:`graceful_sigterm` the first SIGTERM instead raises
:class:`Preempted` in the driver's main thread, wherever it waits: the pipeline stops taking
batches (its iterator closes and Ray Data shuts its actor pools down), every ``finally`` on the way
out runs (the bank's shard actors are killed), and the CLI exits with :data:`EXIT_PREEMPTED`.

Batches still in flight are discarded, never half kept: a batch's result file is written whole,
after its artifacts, so a batch either has all its rows or none, and the rerun scores the images
of the discarded ones.  A watchdog bounds the stop: if it has not finished within
:data:`STOP_SECONDS` the process exits with the same code anyway; a second SIGTERM or a Ctrl-C
during the stop exits at once.  The grace periods in ``infra/`` are set above this bound.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["EXIT_PREEMPTED", "STOP_SECONDS", "Preempted", "graceful_sigterm", "rearm"]

# 128 + SIGTERM: the shell's and Kubernetes' convention for "ended by SIGTERM"
EXIT_PREEMPTED = 128 + signal.SIGTERM
# The longest a stop may take, from the first SIGTERM to the process's exit (watchdog).
STOP_SECONDS = 30.0


class Preempted(BaseException):
    """The driver was asked to stop (SIGTERM).

    A ``BaseException``, like ``KeyboardInterrupt``: code that turns an ``Exception`` into an
    image's error row or a retry must not catch a stop request.
    """

    def __init__(self, since: float) -> None:
        super().__init__("stopped by SIGTERM")
        self.since = since  # time.monotonic() of the signal

    def seconds(self) -> float:
        return time.monotonic() - self.since


_armed = False
_stopping_since: float | None = None


def _exit_now(*_: Any) -> None:
    os._exit(EXIT_PREEMPTED)


def _on_sigterm(signum: int, frame: Any) -> None:
    global _stopping_since
    if _stopping_since is not None:  # a second SIGTERM: the operator wants it gone now
        _exit_now()
    _stopping_since = time.monotonic()
    signal.signal(signal.SIGINT, _exit_now)
    watchdog = threading.Timer(STOP_SECONDS, _exit_now)
    watchdog.daemon = True
    watchdog.start()
    raise Preempted(_stopping_since)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def rearm() -> None:
    """Take SIGTERM back after ``ray.init``, which sets its own handler (``sys.exit(15)``); no-op unless armed."""
    if _armed and _in_main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


@contextmanager
def graceful_sigterm() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Preempted` in the main thread (see the module's doc).

    Only a command-line driver arms it: a library call (a notebook, a test) keeps its process's
    own signal handling.  Outside the main thread it does nothing (Python delivers signals there only).
    """
    global _armed, _stopping_since
    if not _in_main_thread():
        yield
        return
    previous = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    _armed, _stopping_since = True, None
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        _armed = False
        if _stopping_since is None:  # after a stop the handlers stay: a second signal still exits at once
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])
