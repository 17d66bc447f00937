"""``OUT/report.html``: what the inspector opens first, as one self-contained file.

Pictures first: the counts, the score distributions with the thresholds, then the most anomalous
images, each as original | heatmap overlay | mask outline, beside the nearest normal images it was
compared against (SPADE's own explanation: "this part is far from these good parts, here").
Every picture is a downscaled JPEG embedded as a ``data:`` URI and every chart an inline SVG: no
network, no scripts, no files next to it, so the report can be mailed or archived as it is.

This module renders a :class:`Report` and builds one from a ``score`` output folder; ``evaluate``
builds its own from the predictions it holds in memory (:mod:`spade_ray.apps.evaluate`).
"""

from __future__ import annotations

import datetime as _dt
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spade_ray.errors import error_reason
from spade_ray.method.decision import Thresholds
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.method.preprocess import Preprocessor
from spade_ray.report.svgplot import Series, histogram_svg
from spade_ray.storage.images import decode_image, decode_mask, load_image
from spade_ray.storage.overlay import draw_outline, hatch, jpeg_data_uri, thumbnail
from spade_ray.storage.results import read_results
from spade_ray.storage.urls import read_bytes, write_bytes

__all__ = [
    "DEFAULT_REPORT_TOP",
    "IGNORED_LEGEND",
    "Neighbour",
    "Report",
    "ReportItem",
    "ignore_section",
    "item_panels",
    "most_anomalous",
    "neighbour_pictures",
    "now_utc",
    "page",
    "render_report",
    "report_body",
    "score_report",
    "tables_html",
    "write_report",
]

DEFAULT_REPORT_TOP = 24
PANEL_SIDE = 256  # px: a 24-item report stays a few MB
NEIGHBOUR_SIDE = 160
MAX_ERRORS_SHOWN = 50
MAX_REASON_CHARS = 200  # a panel's problem line, not a traceback
NO_OVERLAY_NOTE = "no heatmap or overlay written for this image (score --visuals)"
IGNORED_LEGEND = "ignored region (bank's ignore mask)"


@dataclass
class Neighbour:
    """A retrieved normal image: its name, where it is, and its thumbnail when it could be read."""

    name: str
    uri: str
    picture: str | None = None  # data URI
    problem: str | None = None  # why there is no picture


@dataclass
class ReportItem:
    """One inspected image: scores, its three panels (data URIs) and its nearest normal images."""

    name: str
    image_score: float
    pixel_max: float
    is_anomalous: bool
    panels: dict[str, str | None]
    neighbours: list[Neighbour] = field(default_factory=list)
    note: str = ""
    problem: str | None = None


@dataclass
class Report:
    """Everything the page shows; :func:`render_report` turns it into HTML."""

    title: str
    facts: list[tuple[str, str]]
    counts: dict[str, int]
    charts: list[str]
    items: list[ReportItem]
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (image, reason), the first ones
    n_errors: int | None = None  # all of them, when more than ``errors`` lists
    ignored: str | None = None  # HTML of the ignore mask section (:func:`ignore_section`), when there is one
    ignored_legend: str = IGNORED_LEGEND


def most_anomalous(rows: Sequence[dict[str, Any]], n: int, thresholds: Thresholds) -> list[dict[str, Any]]:
    """The ``n`` scored rows of highest severity (:meth:`Thresholds.severity`), most severe first (ties: by name)."""
    scored = [r for r in rows if r.get("image_score") is not None and r.get("pixel_max") is not None]
    scored.sort(key=lambda r: (-thresholds.severity(r["image_score"], r["pixel_max"]), str(r.get("relpath") or r.get("uri"))))
    return scored[: max(n, 0)]


def item_panels(image: np.ndarray, overlay: np.ndarray | None, mask: np.ndarray,
                ignored: np.ndarray | None = None) -> dict[str, str | None]:
    """original | heatmap overlay | mask outline, each downscaled to at most 256 px and JPEG-encoded.

    ``overlay`` is None where the run wrote none for this image (``--visuals anomalous`` or ``none``);
    ``ignored`` (the ignore region in the image's output frame) is hatched grey on both overlay panels.
    """
    small = thumbnail(image, PANEL_SIDE)
    small_mask = thumbnail(mask, PANEL_SIDE, binary=True)
    small_ignored = thumbnail(ignored, PANEL_SIDE, binary=True) if ignored is not None else None

    def marked(picture: np.ndarray) -> np.ndarray:
        return hatch(picture, small_ignored) if small_ignored is not None else picture

    return {
        "original": jpeg_data_uri(small),
        "heatmap overlay": jpeg_data_uri(marked(thumbnail(overlay, PANEL_SIDE))) if overlay is not None else None,
        "mask outline": jpeg_data_uri(marked(draw_outline(small, small_mask))),
    }


def ignore_section(region: IgnoreRegion, legend: str = IGNORED_LEGEND) -> str:
    """The ignore mask itself, once, at the top of a report: hatched where map values never count."""
    mask = thumbnail(region.mask, PANEL_SIDE, binary=True)
    picture = hatch(np.full((*mask.shape, 3), 255, np.uint8), mask, spacing=4)
    height, width = region.shape
    share = float(region.mask.mean())
    return (f'<h2>Ignored region</h2><figure><img src="{jpeg_data_uri(picture)}" alt="ignore mask">'
            f"<figcaption>grey hatching: {escape(legend)}, {width}x{height} px frame, {share:.1%} of it; map values "
            "there are zero before thresholds, masks and image scores</figcaption></figure>")


def neighbour_pictures(names_and_uris: Sequence[tuple[str, str]], storage_options: dict[str, Any] | None = None,
                       cache: dict[str, Neighbour] | None = None) -> list[Neighbour]:
    """Thumbnails of normal images where their source is reachable; the name and the reason where not.

    ``cache`` (uri -> Neighbour) avoids reading a normal image again when it explains several images.
    """
    cache = {} if cache is None else cache
    out = []
    for name, uri in names_and_uris:
        if uri not in cache:
            try:
                picture = jpeg_data_uri(thumbnail(load_image(uri, storage_options), NEIGHBOUR_SIDE))
                cache[uri] = Neighbour(name, uri, picture)
            except Exception as exc:  # moved, deleted or access denied: show who it was
                cache[uri] = Neighbour(name, uri, None, error_reason(exc, MAX_REASON_CHARS))
        out.append(cache[uri])
    return out


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 8px}h2{font-size:18px;margin:28px 0 10px}
table{border-collapse:collapse;font-size:13px;background:#fff}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}th{background:#f0f0f0}
.facts td:first-child{color:#666}
.counts{display:flex;gap:12px;flex-wrap:wrap}
.count{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:90px}
.count b{display:block;font-size:22px}.count.bad b{color:#c0392b}
.charts{display:flex;gap:16px;flex-wrap:wrap}.charts svg{background:#fff;border:1px solid #ddd}
.item{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px;margin:0 0 16px}
.item h3{font-size:14px;margin:0 0 6px;word-break:break-all}
.flag{color:#fff;background:#c0392b;border-radius:3px;padding:1px 6px;font-size:12px}
.pass{color:#fff;background:#2e7d32;border-radius:3px;padding:1px 6px;font-size:12px}
.row{display:flex;gap:8px;flex-wrap:wrap;align-items:flex-start}
figure{margin:0}figcaption{font-size:12px;color:#555;max-width:256px;word-break:break-all}
img{display:block;border:1px solid #ccc;max-width:256px;max-height:256px}
.nb img{max-width:160px;max-height:160px}.nb figcaption{max-width:160px}
.missing{width:150px;height:100px;border:1px dashed #bbb;font-size:12px;color:#777;padding:6px;
  overflow:hidden;word-break:break-all}
.sep{width:1px;align-self:stretch;background:#ddd;margin:0 6px}
.legend{font-size:12px;color:#555}
"""


def _figure(caption: str, picture: str | None, problem: str | None = None, cls: str = "") -> str:
    body = (f'<img src="{picture}" alt="{escape(caption)}">' if picture
            else f'<div class="missing">not available{": " + escape(problem) if problem else ""}</div>')
    return f'<figure class="{cls}">{body}<figcaption>{escape(caption)}</figcaption></figure>'


def _item_html(rank: int, item: ReportItem) -> str:
    badge = '<span class="flag">anomalous</span>' if item.is_anomalous else '<span class="pass">normal</span>'
    head = (f"<h3>#{rank} {escape(item.name)} {badge}</h3><div class=\"legend\">image score "
            f"{item.image_score:.4g} · map max {item.pixel_max:.4g}{' · ' + escape(item.note) if item.note else ''}"
            f"{' · ' + escape(item.problem) if item.problem else ''}</div>")
    panels = "".join(_figure(name, uri, item.problem) for name, uri in item.panels.items())
    neighbours = "".join(_figure(f"{k + 1}. {n.name}", n.picture, n.problem, "nb") for k, n in enumerate(item.neighbours))
    strip = (f'<div class="sep"></div><div><div class="legend">nearest normal images</div>'
             f'<div class="row">{neighbours}</div></div>'
             if item.neighbours else "")
    return f'<section class="item">{head}<div class="row">{panels}{strip}</div></section>'


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<h2>{escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


def render_report(report: Report) -> str:
    """The report as one HTML document with no external reference (pictures are data URIs, charts SVG)."""
    facts = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in report.facts)
    return page(report.title, f"<table class=\"facts\">{facts}</table>{report_body(report)}")


def page(title: str, body: str) -> str:
    """A self-contained HTML page: the report's style, the title as heading, then ``body``."""
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{escape(title)}</h1>{body}</body></html>")


def report_body(report: Report) -> str:
    """Everything of a report below its facts: ignored region, counts, charts, tables, errors, the top images."""
    counts = "".join(
        f'<div class="count{" bad" if k in ("error", "anomalous", "no bank") and v else ""}"><b>{v}</b>{escape(k)}</div>'
        for k, v in report.counts.items())
    items = "".join(_item_html(i + 1, item) for i, item in enumerate(report.items))
    ignored = f" Grey hatching: {escape(report.ignored_legend)}." if report.ignored else ""
    top = (f"<h2>The {len(report.items)} most anomalous images</h2><p class=\"legend\">Ranked by how far each is past "
           "its thresholds (image score / image threshold, or map maximum / pixel threshold, whichever is larger). "
           "Overlay: the heat colour fades in above half the pixel threshold (red → yellow at twice the threshold); "
           "cyan outline: the mask (map above the pixel threshold). Right: the nearest normal images of the bank, "
           f"which the image was compared against.{ignored}</p>" + items) if report.items else "<h2>No images to show</h2>"
    return (f"{report.ignored or ''}<h2>Counts</h2><div class=\"counts\">{counts}</div>"
            f"<h2>Score distributions</h2><div class=\"charts\">{''.join(report.charts)}</div>"
            f"{tables_html(report)}{top}")


def tables_html(report: Report) -> str:
    """The report's tables, then its errors table (the first :data:`MAX_ERRORS_SHOWN`, and how many there are)."""
    tables = "".join(_table(*t) for t in report.tables)
    if not report.errors:
        return tables
    shown = report.errors[:MAX_ERRORS_SHOWN]
    total = max(report.n_errors or 0, len(report.errors))
    more = f" (first {len(shown)} of {total})" if total > len(shown) else ""
    return tables + _table(f"Errors{more}", ["image", "reason"], [[a, b] for a, b in shown])


def write_report(url: str, report: Report, storage_options: dict[str, Any] | None = None) -> None:
    """Write the rendered report atomically (readers never see half a page)."""
    write_bytes(url, render_report(report).encode("utf-8"), storage_options)


def now_utc() -> str:
    """The time a report was written, ISO 8601 in UTC."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- from a score output folder


_REPORT_COLUMNS = ("uri", "relpath", "bank_id", "status", "error", "image_score", "pixel_max", "is_anomalous",
                   "mask_uri", "overlay_uri", "neighbours")


def _score_item(row: dict[str, Any], preprocessor: Preprocessor, storage_options: dict[str, Any] | None,
                cache: dict[str, Neighbour], ignore: IgnoreRegion | None = None) -> ReportItem:
    name = row.get("relpath") or row["uri"]
    neighbours = neighbour_pictures([(posixpath.basename(u.rstrip("/")) or u, u) for u in (row.get("neighbours") or [])],
                                    storage_options, cache)
    item = ReportItem(name, float(row["image_score"]), float(row["pixel_max"]), bool(row["is_anomalous"]),
                      {"original": None, "heatmap overlay": None, "mask outline": None}, neighbours)
    try:
        source = load_image(row["uri"], storage_options)
        image = preprocessor.image_to_output(source)
        ignored = ignore.at_output(preprocessor, *source.shape[:2]) if ignore is not None else None
        mask = decode_mask(read_bytes(row["mask_uri"], storage_options), row["mask_uri"])
        overlay = None
        if row.get("overlay_uri"):
            overlay = decode_image(read_bytes(row["overlay_uri"], storage_options), row["overlay_uri"])
            if not image.shape[:2] == overlay.shape[:2] == mask.shape:
                raise ValueError(f"image {image.shape[:2]}, overlay {overlay.shape[:2]} and mask {mask.shape} differ in size")
        else:
            item.note = NO_OVERLAY_NOTE  # the legend says why the overlay panel is empty
        if image.shape[:2] != mask.shape:
            raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
        item.panels = item_panels(image, overlay, mask, ignored)
    except Exception as exc:  # an output or the source went missing: keep the scores, say why
        item.problem = error_reason(exc, MAX_REASON_CHARS)
    return item


def score_report(output: str, *, source: str, bank_id: str, thresholds: Thresholds,
                 preprocessor: Preprocessor, skipped: int = 0, top: int = DEFAULT_REPORT_TOP,
                 storage_options: dict[str, Any] | None = None,
                 progress: Callable[[int], None] | None = None, ignore: IgnoreRegion | None = None,
                 only_bank: bool = False) -> Report:
    """The report of everything scored into ``output`` (all runs), from its result rows and outputs.

    ``preprocessor`` is the bank's geometry: it puts a source image into its map's frame; ``ignore``
    the bank's ignore region, shown at the top and hatched on the overlay panels.  ``only_bank``:
    only the rows of ``bank_id`` (one bank's section of a routed run's report).
    """
    table = read_results(output, _REPORT_COLUMNS, storage_options)
    if only_bank:
        table = table.filter(pc.fill_null(pc.equal(table.column("bank_id"), bank_id), False))
    status = np.asarray(table.column("status").to_pylist(), dtype=object)
    ok = status == "ok"
    scores = np.asarray(table.column("image_score").to_numpy(zero_copy_only=False), dtype=np.float64)[ok]
    maxima = np.asarray(table.column("pixel_max").to_numpy(zero_copy_only=False), dtype=np.float64)[ok]
    flagged = np.asarray(table.column("is_anomalous").to_pylist(), dtype=object)[ok]
    ok_rows = np.flatnonzero(ok)
    # the top rows only become Python dicts (and are read as pictures)
    order = np.argsort(-np.asarray(thresholds.severity(scores, maxima)),
                       kind="stable")[: max(top, 0)]
    candidates = table.take(pa.array(ok_rows[order], pa.int64())).to_pylist() if len(order) else []
    cache: dict[str, Neighbour] = {}
    items = []
    for row in most_anomalous(candidates, top, thresholds):
        items.append(_score_item(row, preprocessor, storage_options, cache, ignore))
        if progress:
            progress(1)
    error_rows = np.flatnonzero(~ok)
    errors = [(str(r.get("relpath") or r["uri"]), str(r.get("error") or ""))
              for r in table.take(pa.array(error_rows[:MAX_ERRORS_SHOWN], pa.int64())).to_pylist()]
    counts = {"images": len(table), "ok": int(ok.sum()), "error": int((~ok).sum()), "skipped (this run)": skipped,
              "anomalous": int(sum(bool(f) for f in flagged))}
    charts = [
        histogram_svg("image scores", [Series("images", scores)], {"threshold": thresholds.image}, x_label="image score"),
        histogram_svg("anomaly map maxima", [Series("images", maxima)], {"threshold": thresholds.pixel},
                      x_label="anomaly map maximum"),
    ]
    facts = [("input", source), ("output", output), ("bank", bank_id),
             ("image threshold", f"{thresholds.image:.6g}"), ("pixel threshold", f"{thresholds.pixel:.6g}"),
             ("written", now_utc())]
    return Report("spade-ray score report", facts, counts, charts, items, errors=errors, n_errors=counts["error"],
                  ignored=ignore_section(ignore) if ignore is not None else None)
