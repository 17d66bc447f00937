"""Memory of a running job over time: the driver's and each kind of Ray worker's resident set, sampled.

A night-long job leaks if its memory grows with the images it has done; peaks alone
(:mod:`spade_ray.apps.procwatch`) cannot tell a leak from a large first batch.  So a sampler thread
records, every ``interval`` seconds, the driver's resident set and, per kind of Ray worker (by
process title, :func:`~spade_ray.apps.procwatch.classify`), the largest resident set among the
processes of that kind, next to how many images the job has committed by then.  :func:`growth`
compares the last quarter of the run with the first.  Linux only (``/proc``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spade_ray.apps.procwatch import classify

__all__ = ["DRIVER", "MemorySeries", "Sample", "growth", "rss_by_kind", "session_pids"]

DRIVER = "driver"


@dataclass(frozen=True)
class Sample:
    """One look at the job: seconds since the start, images committed, resident bytes per process kind."""

    seconds: float
    images: int
    rss: dict[str, int]


def _status_rss(pid: int | str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _title(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _state_and_session(pid: str) -> tuple[str, int] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[3])
    except (OSError, ValueError, IndexError):
        return None


def session_pids(session: int) -> list[int]:
    """Live (not zombie) processes of a session: a driver started in a session of its own, its local
    Ray and every worker of it (Ray gives each worker its own process group, but not its own session)."""
    pids = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        found = _state_and_session(pid)
        if found is not None and found[1] == session and found[0] != "Z":
            pids.append(int(pid))
    return pids


def rss_by_kind(driver_pid: int) -> dict[str, int]:
    """Resident bytes of the driver and of the largest Ray worker of each kind in the driver's session.

    The session keeps other jobs' workers on the same machine out (the driver must lead its session).
    """
    found: dict[str, int] = {}
    driver = _status_rss(driver_pid)
    if driver is not None:
        found[DRIVER] = driver
    for pid in session_pids(driver_pid):
        kind = classify(_title(pid))
        rss = _status_rss(pid) if kind else None
        if kind and rss is not None:
            found[kind] = max(found.get(kind, 0), rss)
    return found


@dataclass
class MemorySeries:
    """``with MemorySeries(pid, images_done) as series: ...`` then ``series.samples``.

    ``images_done`` is asked at every sample how many images the job has committed so far.
    """

    driver_pid: int
    images_done: Callable[[], int]
    interval: float = 1.0
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()

    def sample(self) -> None:
        images = self.images_done()
        self.samples.append(Sample(round(time.monotonic() - self._start, 2), images, rss_by_kind(self.driver_pid)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySeries:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def as_json(self) -> list[dict]:
        return [asdict(s) for s in self.samples]


def growth(samples: list[Sample], total: int) -> dict[str, dict[str, float]]:
    """Per process kind: peak resident MiB in the first quarter of the images and in the last, the growth,
    and the peak once every image is committed (the driver's report).

    Quarters are counted in images committed, not in time, so start-up (no image yet) counts in
    neither, and the last quarter ends with the last row: memory that grows with the work done
    shows, a slow start or the report's one-off read of the results does not.
    """
    scoring = [s for s in samples if s.images < total]
    first = [s for s in scoring if 0 < s.images <= total / 4]
    last = [s for s in scoring if s.images >= 3 * total / 4]
    after = [s for s in samples if s.images >= total]

    def peak(group: list[Sample], kind: str) -> int:
        return max((s.rss[kind] for s in group if kind in s.rss), default=0)

    out: dict[str, dict[str, float]] = {}
    for kind in sorted({k for s in first + last for k in s.rss}):
        a, b = peak(first, kind), peak(last, kind)
        if a and b:
            out[kind] = {"first_quarter_mib": round(a / 2**20, 1), "last_quarter_mib": round(b / 2**20, 1),
                         "growth": round(b / a - 1, 4)}
            if peak(after, kind):
                out[kind]["after_last_row_mib"] = round(peak(after, kind) / 2**20, 1)
    return out
