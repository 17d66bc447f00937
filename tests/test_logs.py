"""What the CLI writes: bars only on a terminal, JSON lines for collectors, the one-line summary."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import struct
import termios

from spade_ray.apps.cli import _finish
from spade_ray.apps.logs import configure_logging, fields, get_logger
from spade_ray.distributed.pipeline import JobSummary
from spade_ray.progress import no_progress, shows_ray_data_bars, terminal_progress


def _run_bar(stream) -> None:
    progress = terminal_progress(stream=stream)
    bar = progress(5, "score")
    bar.update(5)
    bar.close()
    stream.flush()


def _read_all(fd: int) -> str:
    """Everything written to the terminal so far: one read may return only the first redraw."""
    chunks = []
    while select.select([fd], [], [], 0.5)[0]:
        chunks.append(os.read(fd, 65536))
    return b"".join(chunks).decode()


def test_progress_bars_show_on_a_terminal_only() -> None:
    master, slave = pty.openpty()  # a real terminal, 100 columns wide
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    with os.fdopen(slave, "w") as terminal:
        assert shows_ray_data_bars(terminal_progress(stream=terminal))
        _run_bar(terminal)
        drawn = _read_all(master)
    os.close(master)
    assert "score: 100%" in drawn and "5/5" in drawn

    read, write = os.pipe()  # a log file or a CI pipe
    with os.fdopen(write, "w") as pipe:
        assert terminal_progress(stream=pipe) is no_progress and not shows_ray_data_bars(no_progress)
        _run_bar(pipe)
    with os.fdopen(read) as fh:
        assert fh.read() == ""

    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        assert terminal_progress(quiet=True, stream=terminal) is no_progress  # --quiet
    os.close(master)


def test_json_logs_are_one_parseable_object_per_line_with_the_stage_counts() -> None:
    out, err = io.StringIO(), io.StringIO()
    configure_logging("json", stdout=out, stderr=err)
    try:
        summary = JobSummary("score", ok=7, error=1, skipped=2, seconds=4.0, output="s3://b/out",
                             errors=[("abc123", "ImageDecodeError: not an image")], extra={"anomalous": 3})
        _finish(summary)
    finally:
        configure_logging("text")
    lines = out.getvalue().splitlines()
    assert err.getvalue() == "" and len(lines) == 2
    error, done = (json.loads(line) for line in lines)
    assert error["level"] == "warning" and error["image_id"] == "abc123" and error["stage"] == "score"
    assert done["level"] == "info" and done["time"].endswith("+00:00")
    assert (done["stage"], done["ok"], done["error"], done["skipped"], done["anomalous"]) == ("score", 7, 1, 2, 3)
    assert done["message"] == summary.line() == (
        "score: 7 ok, 1 error, 2 skipped, 3 anomalous in 4.0s (2.0 images/s) -> s3://b/out")


def test_text_logs_put_the_summary_on_stdout_and_problems_on_stderr() -> None:
    out, err = io.StringIO(), io.StringIO()
    configure_logging("text", stdout=out, stderr=err)
    try:
        get_logger().info("score: 1 ok", **fields(stage="score"))
        get_logger().error("spade-ray score: error: no images")
    finally:
        configure_logging("text")
    assert out.getvalue() == "score: 1 ok\n" and err.getvalue() == "spade-ray score: error: no images\n"
