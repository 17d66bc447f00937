"""A successful run says so without alarming anyone: no error, traceback or warning on stderr.

A new user reads an ``ERROR`` line as a failure, whatever the exit code says.  Three such lines
used to come from Ray on every demo: its token-authentication WARNING, a ``RayDeprecationWarning``
for the retry bounds the pipeline passes, and a core-worker ERROR about actor constructor
arguments in the object store.  The last one Ray prints for Ray Data's own actors whatever they
are given (docs/operations.md, "What a successful run prints"): the command line drops exactly that
line from its stderr (``spade_ray/apps/stderr_filter.py``), and our own actors must never cause it.
"""

from __future__ import annotations

import re
import subprocess
import sys

# The words of the issue, case-sensitive, plus the two forms Ray's own lines take: its Python
# loggers write "WARNING"/"ERROR", its C++ core worker "[time E pid tid] file.cc:line: ..."
# (glog style: E error, W warning, F fatal).
ALARMING = re.compile(r"ERROR|Traceback|Warning|WARNING|^\[[^\]]* [EWF] \d+ \d+\] ")
OBJECT_STORE_ARGS = "has constructor arguments in the object store"


def alarming_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ALARMING.search(line)]


def test_a_successful_demo_prints_no_error_traceback_or_warning(demo_run) -> None:
    out, proc = demo_run
    assert proc.returncode == 0, proc.stderr
    assert "score: 34 ok, 0 error, 0 skipped" in proc.stdout and str(out / "metrics.json") in proc.stdout
    alarming = alarming_lines(proc.stderr)
    assert not alarming, "a successful demo printed on stderr:\n" + "\n".join(alarming)


def test_a_local_ray_says_once_in_our_words_that_it_uses_token_authentication(demo_run) -> None:
    _, proc = demo_run
    notes = [line for line in proc.stdout.splitlines() if "token authentication is on" in line]
    assert len(notes) == 1, proc.stdout


def test_the_bank_shard_actors_get_no_object_store_arguments(small_bank) -> None:
    """Ray's ERROR is printed once per driver, so a demo cannot show whether the shard actors would
    cause it after Ray Data did: serve a bank in a driver of its own."""
    script = ("from spade_ray.distributed.runtime import init_ray\n"
              "from spade_ray.distributed.shard_actors import serve_bank\n"
              "init_ray()\n"
              f"served = serve_bank({str(small_bank['bank'])!r})\n"
              "print('served', len(served.actors))\n"
              "served.shutdown()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "served 2" in proc.stdout, proc.stderr
    assert OBJECT_STORE_ARGS not in proc.stderr, proc.stderr
    assert not alarming_lines(proc.stderr), proc.stderr
