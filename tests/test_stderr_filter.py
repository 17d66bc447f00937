"""The command line drops Ray Data's one harmless core-worker ERROR line from stderr, and nothing else.

Ray's C++ core worker writes straight to file descriptor 2, so the test writes there too, from a
process of its own, exactly as Ray does.
"""

from __future__ import annotations

import subprocess
import sys

RAY_DATA_LINE = ("[2026-12-02 12:00:00,000 E 4242 4243] core_worker.cc:2714: Actor with class name: "
                 "'MapWorker(MapBatches(ScoreImages))' and ID: 'abc' has constructor arguments in the object store "
                 "and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
                 "restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")
OUR_ACTOR_LINE = RAY_DATA_LINE.replace("MapWorker(MapBatches(ScoreImages))", "ShardActor")
OTHER_ERROR = "[2026-12-02 12:00:01,000 E 4242 4243] core_worker.cc:99: something really went wrong"


def run_filtered(writes: list[str]) -> str:
    """stderr of a process that writes ``writes`` to descriptor 2 inside ``filtered_stderr``, then prints after it."""
    script = ("import os, sys, time\n"
              "from spade_ray.apps.stderr_filter import filtered_stderr\n"
              "with filtered_stderr():\n"
              f"    for text in {writes!r}:\n"
              "        os.write(2, text.encode())\n"
              "        time.sleep(0.05)\n"
              "    print('from python', file=sys.stderr)\n"
              "print('after', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.decode()  # bytes as written: text mode would turn the bars' "\r" into newlines


def test_ray_datas_actor_argument_line_is_dropped_and_every_other_line_kept() -> None:
    err = run_filtered([RAY_DATA_LINE + "\n", "plain line\n", OTHER_ERROR + "\n", OUR_ACTOR_LINE + "\n"])
    assert err.splitlines() == ["plain line", OTHER_ERROR, OUR_ACTOR_LINE, "from python", "after"]


def test_a_line_written_in_pieces_is_judged_whole() -> None:
    half = len(RAY_DATA_LINE) // 2
    err = run_filtered([RAY_DATA_LINE[:half], RAY_DATA_LINE[half:] + "\nnext\n"])
    assert err.splitlines() == ["next", "from python", "after"]


def test_progress_redraws_without_a_newline_pass_through_unchanged() -> None:
    err = run_filtered(["\rscore:  10%", "\rscore:  50%", "\rscore: 100%\n", "[unterminated bracket"])
    assert err == "\rscore:  10%\rscore:  50%\rscore: 100%\n[unterminated bracketfrom python\nafter\n"
