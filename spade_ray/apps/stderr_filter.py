"""Keep one known, harmless Ray line off the command's stderr, and pass everything else through unchanged.

Ray's core worker prints an ERROR line (``... Actor with class name: 'MapWorker(...)' ... has
constructor arguments in the object store and max_restarts > 0 ...``) whenever Ray Data starts an
actor pool that restarts dead actors: Ray Data hands its own actors their stage through the object
store (ray-project/ray#53727, #57733), whatever our code passes.  The line says nothing about the
run, but a person reads ERROR as failure.  It is written by C++ straight to file descriptor 2, so no
Python logging setting reaches it: the only place to drop it is the descriptor itself.

:func:`filtered_stderr` points descriptor 2 at a pipe (a pseudo-terminal when stderr is a terminal,
so progress bars and colours still see a terminal of the same size) and copies what arrives to the
real stderr, dropping complete lines that match the pattern and nothing else.  Only Ray Data's
``MapWorker`` form of the line is dropped: the same warning about any other actor (our own shard
actors included) still shows.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import sys
import termios
import threading
from collections.abc import Iterator

__all__ = ["RAY_DATA_ACTOR_ARGS", "filtered_stderr"]

RAY_DATA_ACTOR_ARGS = re.compile(
    rb"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*has constructor arguments in the object store")
# A held-back partial line that might become a dropped line is let out after this long anyway, so
# a writer that never ends its line is never delayed for more.
_HOLD_SECONDS = 0.5


class _Copier(threading.Thread):
    """Copies from ``source`` to ``target`` line by line, dropping the lines ``drop`` matches."""

    def __init__(self, source: int, target: int, drop: re.Pattern[bytes]) -> None:
        super().__init__(name="spade-ray-stderr", daemon=True)
        self.source, self.target, self.drop = source, target, drop
        self.pending = b""
        self.dropped = 0
        self.stopping = threading.Event()

    def _emit(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.target, data):]

    def _feed(self, chunk: bytes) -> None:
        lines = (self.pending + chunk).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            if self.drop.search(line):
                self.dropped += 1
            else:
                self._emit(line + b"\n")
        # A partial line is held only while it could still be a line to drop (Ray's C++ lines begin
        # with "["); progress bars redraw with "\r" and must appear at once.
        if self.pending and (not self.pending.startswith(b"[") or b"\r" in self.pending):
            self._emit(self.pending)
            self.pending = b""

    def run(self) -> None:
        try:
            self._copy()
        except OSError:  # the real stderr went away (a closed terminal): nothing left to copy to
            return

    def _copy(self) -> None:
        while True:
            ready, _, _ = select.select([self.source], [], [], _HOLD_SECONDS)
            if not ready:
                if self.pending:
                    self._emit(self.pending)
                    self.pending = b""
                if self.stopping.is_set():
                    return
                continue
            try:
                chunk = os.read(self.source, 65536)
            except OSError:  # a pseudo-terminal whose other side closed reads EIO
                chunk = b""
            if not chunk:
                break
            self._feed(chunk)
        if self.pending:
            self._emit(self.pending)


def _open_channel(real: int) -> tuple[int, int]:
    """(read end, write end): a pseudo-terminal of the real one's size when stderr is a terminal, else a pipe."""
    if not os.isatty(real):
        return os.pipe()
    reader, writer = pty.openpty()
    attrs = termios.tcgetattr(writer)
    attrs[1] &= ~termios.ONLCR  # "\n" stays "\n": the real terminal translates it once
    termios.tcsetattr(writer, termios.TCSANOW, attrs)
    with contextlib.suppress(OSError):
        fcntl.ioctl(writer, termios.TIOCSWINSZ, fcntl.ioctl(real, termios.TIOCGWINSZ, b"\0" * 8))
    return reader, writer


@contextlib.contextmanager
def filtered_stderr(drop: re.Pattern[bytes] = RAY_DATA_ACTOR_ARGS) -> Iterator[None]:
    """Inside, whatever anything in this process writes to descriptor 2 reaches stderr except lines ``drop`` matches.

    On leaving, descriptor 2 is the real stderr again and what was still in flight is copied out.
    Processes started inside (Ray's local services) keep the channel: they write to their own
    log files, and once the copier is gone a late write of theirs fails instead of blocking.
    """
    sys.stderr.flush()
    real = os.dup(2)
    reader, writer = _open_channel(real)
    copier = _Copier(reader, real, drop)
    os.dup2(writer, 2)
    os.close(writer)
    copier.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)
        copier.stopping.set()
        copier.join(timeout=5 * _HOLD_SECONDS)
        if not copier.is_alive():  # else it still reads them: a closed number could be reused under it
            os.close(reader)
            os.close(real)
