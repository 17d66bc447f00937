"""The one-line reasons shown for failures in result rows, report panels and the CLI."""

from __future__ import annotations

from spade_ray.errors import error_message, error_reason


def test_error_reason_is_the_type_and_the_first_line() -> None:
    assert error_reason(ValueError("bad thing\nTraceback ...")) == "ValueError: bad thing"
    assert error_reason(KeyError("key")) == "KeyError: 'key'"
    assert error_reason(RuntimeError()) == "RuntimeError"
    assert error_reason(RuntimeError("\nsecond line only")) == "RuntimeError"
    assert error_reason(ValueError("x" * 300), max_chars=200) == ("ValueError: " + "x" * 300)[:200]


def test_error_message_is_the_first_line_alone() -> None:
    assert error_message(ValueError("bad thing\nmore")) == "bad thing"
    assert error_message(RuntimeError()) == "RuntimeError"
