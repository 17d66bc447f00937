"""Progress reporting hooks: long stages take a factory ``(total, description) -> bar``.

The CLI passes tqdm bars (off when quiet or not on a terminal); library callers get silence.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["Progress", "no_progress"]

Progress = Callable[[int, str], Any]


class _SilentBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def no_progress(total: int, desc: str) -> Any:
    """A progress factory that shows nothing."""
    return _SilentBar()
