"""Open an HTML file in a real headless Chromium: a screenshot, and which images failed to load.

Debian's ``chromium`` package (``apt-get install chromium``; `.ci/run` installs it).  Tests that
need it skip when it is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BROWSERS = ("chromium", "chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-extensions",
         "--no-first-run", "--virtual-time-budget=10000"]

# Runs after every image has loaded or failed (the load event waits for images): records, on
# <body>, how many images there are and which have no decoded pixels.
_PROBE = """<script>window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  document.body.setAttribute("data-images", imgs.length);
  document.body.setAttribute("data-broken", imgs.filter(i => !i.complete || i.naturalWidth === 0)
    .map(i => i.alt || i.src.slice(0, 40)).join("|"));
});</script>"""


def chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed (apt-get install chromium)")


@dataclass
class Rendered:
    screenshot: np.ndarray  # HxWx3 uint8
    n_images: int
    broken: list[str]


def render(html: Path, work: Path, width: int = 1280, height: int = 2000) -> Rendered:
    """Screenshot ``html`` as Chromium draws it, and count its images that did not load."""
    exe = chromium()
    work.mkdir(parents=True, exist_ok=True)
    shot = work / "screenshot.png"
    subprocess.run([exe, *FLAGS, f"--window-size={width},{height}", f"--screenshot={shot}", html.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    probed = work / "probed.html"  # a copy with the probe: the report itself carries no script
    probed.write_text(html.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run([exe, *FLAGS, "--dump-dom", probed.resolve().as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    body = re.search(r'<body[^>]*data-images="(\d+)"[^>]*data-broken="([^"]*)"', dom)
    assert body, "the probe did not run: the page never finished loading"
    broken = [b for b in body.group(2).split("|") if b]
    return Rendered(np.asarray(Image.open(shot).convert("RGB")), int(body.group(1)), broken)


def assert_not_blank(screenshot: np.ndarray) -> None:
    """A drawn page has text, charts and pictures: many colours and real contrast, not one flat fill."""
    pixels = screenshot.reshape(-1, 3)
    colours = len(np.unique(pixels[:: max(1, len(pixels) // 200_000)], axis=0))
    assert colours > 500, f"the screenshot has only {colours} colours: a blank or broken page"
    assert float(screenshot.std()) > 20.0
