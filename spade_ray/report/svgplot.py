"""Two small charts as inline SVG text: a histogram with threshold markers, and curves (ROC, PRO).

The report must open anywhere without network or scripts, and a plotting library would be a heavy
dependency for two charts, so they are drawn here as plain SVG elements (a few KB each).  Long
curves (a pixel ROC has a point per distinct score) are thinned to what a 400-pixel plot can show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

__all__ = ["Series", "curves_svg", "histogram_svg", "thin_curve"]

WIDTH, HEIGHT = 440, 260
LEFT, RIGHT, TOP, BOTTOM = 52, 16, 28, 40
COLOURS = ("#3b6fb6", "#d1495b", "#2e9e6a", "#8c5fb5", "#e08a1e")


@dataclass(frozen=True)
class Series:
    """One named set of values (histogram) or one curve (x and y of equal length)."""

    name: str
    x: Sequence[float] | np.ndarray
    y: Sequence[float] | np.ndarray | None = None


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** np.floor(np.log10(raw))
    step *= min((m for m in (1, 2, 2.5, 5, 10) if m * step >= raw), default=10)
    start = np.ceil(lo / step) * step
    return [float(t) for t in np.arange(start, hi + step * 1e-9, step)]


class _Frame:
    """Data -> pixel coordinates of the plot area, and the axes drawn around it."""

    def __init__(self, x0: float, x1: float, y0: float, y1: float) -> None:
        self.x0, self.x1 = x0, x1 if x1 > x0 else x0 + 1.0
        self.y0, self.y1 = y0, y1 if y1 > y0 else y0 + 1.0

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def py(self, y: float) -> float:
        return HEIGHT - BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)

    def axes(self, x_label: str, y_label: str) -> list[str]:
        parts = [f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
                 'fill="none" stroke="#999"/>']
        for t in _ticks(self.x0, self.x1):
            x = self.px(t)
            parts.append(f'<line x1="{x:.1f}" y1="{HEIGHT - BOTTOM}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM + 4}" stroke="#999"/>'
                         f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{_fmt(t)}</text>')
        for t in _ticks(self.y0, self.y1, 4):
            y = self.py(t)
            parts.append(f'<line x1="{LEFT - 4}" y1="{y:.1f}" x2="{LEFT}" y2="{y:.1f}" stroke="#999"/>'
                         f'<text x="{LEFT - 7}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 6}" text-anchor="middle">{escape(x_label)}</text>')
        parts.append(f'<text transform="translate(13 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
                     f'{escape(y_label)}</text>')
        return parts


def _svg(title: str, parts: list[str], legend: list[tuple[str, str]]) -> str:
    items = []
    x = LEFT
    for colour, name in legend:
        items.append(f'<rect x="{x}" y="8" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + 14}" y="17">{escape(name)}</text>')
        x += 22 + 7 * len(name)
    return (f'<svg role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
            f'height="{HEIGHT}" font-family="sans-serif" font-size="11"><title>{escape(title)}</title>'
            + "".join(parts) + "".join(items) + "</svg>")


def histogram_svg(title: str, series: Sequence[Series], thresholds: dict[str, float] | None = None,
                  x_label: str = "score", bins: int = 40) -> str:
    """Counts of each series' values in shared bins (overlaid, translucent), with labelled vertical thresholds."""
    values = [np.asarray(s.x, dtype=np.float64) for s in series]
    finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.zeros(0)])
    marks = {k: float(v) for k, v in (thresholds or {}).items() if v is not None and np.isfinite(v)}
    span = np.concatenate([finite, np.array(list(marks.values()))])
    lo, hi = (float(span.min()), float(span.max())) if span.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(v[np.isfinite(v)], bins=edges)[0] for v in values]
    frame = _Frame(lo, hi, 0.0, float(max((c.max() for c in counts if c.size), default=1)) or 1.0)
    parts = frame.axes(x_label, "images")
    for colour, c in zip(COLOURS, counts):
        for left, right, n in zip(edges[:-1], edges[1:], c):
            if n:
                x, y = frame.px(left), frame.py(n)
                parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(frame.px(right) - x - 0.5, 0.5):.1f}" '
                             f'height="{frame.py(0) - y:.1f}" fill="{colour}" fill-opacity="0.6"/>')
    for i, (name, t) in enumerate(marks.items()):
        x = frame.px(t)
        parts.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM}" stroke="#111" '
                     f'stroke-width="1.5" stroke-dasharray="5 3"/><text x="{x + 3:.1f}" y="{TOP + 12 + 12 * i}">'
                     f'{escape(name)} {_fmt(t)}</text>')
    legend = [(colour, f"{s.name} ({len(v)})") for colour, s, v in zip(COLOURS, series, values)]
    return _svg(title, parts, legend)


def thin_curve(x: np.ndarray, y: np.ndarray, resolution: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Drop points that land on the same spot of a ``resolution``-step grid as the point before them."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size <= 2:
        return x, y
    span_x = max(float(x.max() - x.min()), 1e-12)
    span_y = max(float(y.max() - y.min()), 1e-12)
    gx = np.round((x - x.min()) / span_x * resolution)
    gy = np.round((y - y.min()) / span_y * resolution)
    keep = np.ones(x.size, dtype=bool)
    keep[1:] = (gx[1:] != gx[:-1]) | (gy[1:] != gy[:-1])
    keep[-1] = True
    return x[keep], y[keep]


def curves_svg(title: str, series: Sequence[Series], x_label: str, y_label: str,
               x_max: float = 1.0, diagonal: bool = False) -> str:
    """Curves on [0, x_max] x [0, 1], e.g. ROC (with the chance ``diagonal``) or PRO up to an FPR limit."""
    frame = _Frame(0.0, x_max, 0.0, 1.0)
    parts = frame.axes(x_label, y_label)
    if diagonal:
        parts.append(f'<line x1="{frame.px(0):.1f}" y1="{frame.py(0):.1f}" x2="{frame.px(x_max):.1f}" '
                     f'y2="{frame.py(x_max):.1f}" stroke="#bbb" stroke-dasharray="4 4"/>')
    for colour, s in zip(COLOURS, series):
        x, y = thin_curve(np.asarray(s.x), np.asarray(s.y))
        points = " ".join(f"{frame.px(a):.1f},{frame.py(b):.1f}" for a, b in zip(x, y))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
    return _svg(title, parts, [(c, s.name) for c, s in zip(COLOURS, series)])
