"""Progress reporting hooks: long stages take a factory ``(total, description) -> bar``.

Library callers get silence (:func:`no_progress`).  The CLI uses :func:`terminal_progress`: tqdm
bars on stderr for in-process stages, and Ray Data's own progress bars for the Ray Data
pipelines (extract, score) — only when stderr is a terminal and ``--quiet`` is not given, because
bars written into a log file or a CI log are only noise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["Progress", "TerminalProgress", "no_progress", "shows_ray_data_bars", "terminal_progress"]

Progress = Callable[[int, str], Any]


class _SilentBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def no_progress(total: int, desc: str) -> Any:
    """A progress factory that shows nothing."""
    return _SilentBar()


class TerminalProgress:
    """tqdm bars on a terminal; Ray Data pipelines show Ray Data's own bars instead (``ray_data_bars``)."""

    ray_data_bars = True

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, total: int, desc: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="img", file=self.stream, dynamic_ncols=True)


def terminal_progress(quiet: bool = False, stream: TextIO | None = None) -> Progress:
    """Bars when ``stream`` (default stderr) is a terminal and not ``quiet``; otherwise silence."""
    stream = stream or sys.stderr
    if quiet or not stream.isatty():
        return no_progress
    return TerminalProgress(stream)


def shows_ray_data_bars(progress: Progress) -> bool:
    """Whether a Ray Data pipeline run with this factory should turn Ray Data's own bars on."""
    return bool(getattr(progress, "ray_data_bars", False))
