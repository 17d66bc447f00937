"""Peak memory of each kind of Ray worker process, read from /proc while a job runs.

Ray names its worker processes after what they host (``ray::ShardActor``,
``ray::MapWorker(MapBatches(ScoreImages))``, ...), and Linux keeps each process's peak resident set
(``VmHWM``), so a light polling thread sees every actor's peak without instrumenting the actors.
Linux only; elsewhere it reports nothing.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["ProcessPeaks", "classify"]

# (substring of the Ray process title, kind reported), first match wins
KINDS = (
    ("ShardActor", "shard actor"),
    ("ScoreImages", "scorer actor"),
    ("ExtractFeatures", "extractor actor"),
    ("DecodeImages", "decode task"),
    ("WriteResults", "writer actor"),
)


def classify(title: str) -> str | None:
    """The kind of a Ray worker from its process title; None for anything else."""
    if not title.startswith("ray::"):
        return None
    for needle, kind in KINDS:
        if needle in title:
            return kind
    return None


def _title_and_peak(pid: str) -> tuple[str, int] | None:
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        if not title.startswith("ray::"):
            return None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return title, int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class ProcessPeaks:
    """``with ProcessPeaks() as peaks: ...`` then ``peaks.mib()`` -> {kind: peak RSS MiB}."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def poll(self) -> None:
        if not os.path.isdir("/proc"):
            return
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            found = _title_and_peak(pid)
            if found is None:
                continue
            kind = classify(found[0])
            if kind is not None:
                self.peaks[kind] = max(self.peaks.get(kind, 0), found[1])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def __enter__(self) -> ProcessPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def mib(self) -> dict[str, float]:
        return {kind: round(value / 2**20, 1) for kind, value in sorted(self.peaks.items())}
