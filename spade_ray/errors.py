"""One line about an exception, for places that record or show a failure instead of raising it.

Result rows, report panels and the CLI's last line all show an error to a person scanning many of
them: the first line of the message is what says what went wrong; tracebacks and the rest of a
multi-line message (Ray's, PIL's) would drown it.
"""

from __future__ import annotations

__all__ = ["error_message", "error_reason"]


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


def error_reason(exc: BaseException, max_chars: int | None = None) -> str:
    """``"Type: first line of the message"``, or just ``"Type"`` when that line is empty.

    The type stays because many messages are meaningless without it (a ``KeyError``'s message is
    only the key).  ``max_chars`` cuts a reason that has a message to that many characters, for
    places with little room (the report's panels).
    """
    text = _first_line(exc)
    if not text:
        return type(exc).__name__
    reason = f"{type(exc).__name__}: {text}"
    return reason if max_chars is None else reason[:max_chars]


def error_message(exc: BaseException) -> str:
    """The first line of the message alone, or the type's name when the message is empty.

    For a line that already says it is an error (``spade-ray score: error: ...``), where the
    operator wants the words of the failure, not Python's class name.
    """
    return _first_line(exc) if str(exc) else type(exc).__name__
