"""``OUT/report.html`` of a routed run: one page, one section per bank, each with that bank's thresholds.

An archive mixing products holds scores on different scales (each bank has its own normal
images and calibration), so one distribution or one top list over all of them would compare
apples with pears.  The page therefore starts with what the whole night looks like (counts, a
table of the banks, the images no route matched), then gives each bank its own section, the same
as the report of a one-bank run: its counts, its score distributions with its thresholds, its
most anomalous images.  A run with one bank and no unrouted image gets that one-bank page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from spade_ray.method.decision import Thresholds
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.method.preprocess import Preprocessor
from spade_ray.report.report import MAX_ERRORS_SHOWN, Report, now_utc, page, render_report, report_body, score_report, tables_html
from spade_ray.storage.results import read_results
from spade_ray.storage.urls import write_bytes

__all__ = ["BankSection", "RoutedReport", "routed_report", "write_routed_report"]


@dataclass(frozen=True)
class BankSection:
    """A bank of the run as its section shows it: which route, which bank, and its decision and geometry."""

    bank_id: str
    route: str
    bank: str
    thresholds: Thresholds
    preprocessor: Preprocessor
    ignore: IgnoreRegion | None = None


@dataclass
class RoutedReport:
    """The whole night (``overview``: counts, banks table, unrouted and other errors) and one report per bank."""

    overview: Report
    sections: list[tuple[BankSection, Report]]

    @property
    def counts(self) -> dict[str, int]:
        return self.overview.counts


def routed_report(output: str, *, source: str, routes: str, sections: Sequence[BankSection], skipped: int = 0,
                  top: int = 24, storage_options: dict[str, Any] | None = None,
                  progress: Callable[[int], None] | None = None) -> RoutedReport:
    """The report of every row in ``output``: an overview, then each bank's rows against its own thresholds."""
    parts = [(s, score_report(output, source=source, bank_id=s.bank_id, thresholds=s.thresholds,
                              preprocessor=s.preprocessor, top=top, storage_options=storage_options,
                              progress=progress, ignore=s.ignore, only_bank=True)) for s in sections]
    table = read_results(output, ["uri", "relpath", "bank_id", "status", "error"], storage_options).to_pylist()
    unrouted = sum(1 for r in table if r["bank_id"] is None and r["status"] != "ok")
    errors = [(str(r["relpath"] or r["uri"]), str(r["error"] or "")) for r in table if r["status"] != "ok"]
    counts = {"images": len(table), "ok": sum(r["status"] == "ok" for r in table), "error": len(errors),
              "no bank": unrouted, "skipped (this run)": skipped,
              "anomalous": sum(report.counts["anomalous"] for _, report in parts)}
    banks = [[s.route, s.bank, s.bank_id, *(str(r.counts[k]) for k in ("images", "ok", "error", "anomalous")),
              f"{s.thresholds.image:.6g}", f"{s.thresholds.pixel:.6g}"] for s, r in parts]
    overview = Report("spade-ray score report", [("input", source), ("routing table", routes), ("output", output),
                                                 ("banks", str(len(parts))), ("written", now_utc())],
                      counts, [], [], tables=[("Banks", ["route", "bank", "bank id", "images", "ok", "error", "anomalous",
                                                        "image threshold", "pixel threshold"], banks)],
                      errors=errors[:MAX_ERRORS_SHOWN], n_errors=len(errors))
    return RoutedReport(overview, parts)


def _section_html(section: BankSection, report: Report) -> str:
    facts = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>"
                    for k, v in [("route", section.route), ("bank", section.bank), ("bank id", section.bank_id),
                                 ("image threshold", f"{section.thresholds.image:.6g}"),
                                 ("pixel threshold", f"{section.thresholds.pixel:.6g}")])
    return (f'<section class="bank"><h2 class="bank">Bank {escape(section.route)}</h2>'
            f'<table class="facts">{facts}</table>{report_body(report)}</section>')


def render_routed_report(report: RoutedReport) -> str:
    """One page: the overview (without charts: scores of different banks are not on one scale), then the banks."""
    o = report.overview
    facts = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in o.facts)
    counts = "".join(f'<div class="count{" bad" if k in ("error", "anomalous", "no bank") and v else ""}"><b>{v}</b>'
                     f"{escape(k)}</div>" for k, v in o.counts.items())
    sections = "".join(_section_html(s, r) for s, r in report.sections)
    return page(o.title, f'<table class="facts">{facts}</table><h2>Counts</h2><div class="counts">{counts}</div>'
                f"{tables_html(o)}{sections}")


def write_routed_report(url: str, report: RoutedReport | Report, storage_options: dict[str, Any] | None = None) -> None:
    """Write either page atomically (readers never see half a page)."""
    html = render_routed_report(report) if isinstance(report, RoutedReport) else render_report(report)
    write_bytes(url, html.encode("utf-8"), storage_options)
