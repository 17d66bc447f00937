"""The routing table of ``spade-ray score --routes``: which bank scores which image of a mixed archive.

A plant's nightly archive holds many products and cameras, each with its own normal bank.  The
table is an ordered list of routes, ``pattern -> bank`` plus optional scoring settings, read from
YAML or CSV at any URL; the first route whose pattern matches an image wins, and an image that
no route matches is the caller's to record as an error row (never silently skipped)::

    routes:
      - match: line1/cam*/**            # relative to the input root
        bank: s3://plant/banks/line1
      - match: s3://plant/*/line2/      # a full URL (scheme or absolute path): matched against the URI
        bank: s3://plant/banks/line2
        settings: {pixel_k: 20, threshold: 3.5}
        normals: s3://plant/normals/line2    # for jobs/rebuild_bank.py only
        features: s3://plant/features/line2

Pattern rules (one place, :meth:`Route.matches`): a pattern with a scheme (``s3://``) or starting
with ``/`` is matched against the image's URI, any other against its path below the input root;
``*`` and ``?`` stay within one folder, ``**`` crosses folders, ``[...]`` is a character class; a
pattern without wildcards, or ending in ``/``, is a prefix (``line1/`` is every image under
``line1``).  Matching is case-sensitive, like object keys.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from typing import Any

from spade_ray.method.config import METHODS, SCORING_SETTINGS, SpadeConfig
from spade_ray.storage.urls import read_bytes

__all__ = ["ROUTE_KEYS", "Route", "RoutingTable", "load_routes"]

# What a route may set besides match and bank: the scoring settings of ``score``, the preset
# and the thresholds (per bank: each product has its own), and where a rebuild finds its normals.
THRESHOLD_KEYS = ("threshold", "image_threshold")
SETTING_KEYS = (*SCORING_SETTINGS, "method", *THRESHOLD_KEYS)
ROUTE_KEYS = ("match", "bank", "name", "settings", "normals", "features")
_GLOB = re.compile(r"\*\*|\*|\?|\[[^\]]*\]")


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``**`` any characters, ``*`` and ``?`` within one folder, ``[...]`` a class; prefix match when ending in ``/``."""
    parts, at = [], 0
    for m in _GLOB.finditer(pattern):
        parts.append(re.escape(pattern[at:m.start()]))
        token = m.group()
        parts.append(".*" if token == "**" else "[^/]*" if token == "*" else "[^/]" if token == "?" else token)
        at = m.end()
    parts.append(re.escape(pattern[at:]))
    prefix = pattern.endswith("/") or not _GLOB.search(pattern)
    return re.compile("".join(parts) + (".*" if prefix else "") + r"\Z", re.DOTALL)


def _absolute(path: str) -> str:
    """A local path made absolute (a trailing ``/``, which makes a prefix, kept); URLs unchanged."""
    if "://" in path:
        return path
    return os.path.abspath(path) + ("/" if path.endswith("/") and path != "/" else "")


@dataclass(frozen=True, eq=False)
class Route:
    """One line of the table: images matching ``pattern`` are scored against ``bank`` with ``settings``.

    ``settings`` holds scoring overrides (the keys of ``score``'s options, validated when the
    table is read) and the route's own thresholds; ``normals``/``features`` are used by
    ``jobs/rebuild_bank.py`` only; ``where`` names the file and line, for messages.
    """

    pattern: str
    bank: str
    settings: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    normals: str | None = None
    features: str | None = None
    where: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", _glob_regex(self._target(self.pattern)))

    def _target(self, pattern: str) -> str:
        return _absolute(pattern.removeprefix("file://")) if self.on_uri else pattern

    @property
    def on_uri(self) -> bool:
        """Whether the pattern names full URIs (a scheme or an absolute path) rather than paths below the input root."""
        return "://" in self.pattern or self.pattern.startswith("/")

    def matches(self, uri: str, relpath: str) -> bool:
        subject = _absolute(uri.removeprefix("file://")) if self.on_uri else relpath
        return bool(self._regex.match(subject))  # type: ignore[attr-defined]

    @property
    def label(self) -> str:
        return self.name or self.pattern

    def scoring(self) -> dict[str, Any]:
        """The scoring overrides: the route's ``method`` preset, then its explicit settings."""
        preset = dict(METHODS[self.settings["method"]]) if "method" in self.settings else {}
        return {**preset, **{k: v for k, v in self.settings.items() if k in SCORING_SETTINGS}}

    @property
    def threshold(self) -> float | None:
        return self.settings.get("threshold")

    @property
    def image_threshold(self) -> float | None:
        return self.settings.get("image_threshold")


@dataclass(frozen=True)
class RoutingTable:
    """The ordered routes; :meth:`route` gives the first that matches an image, or None."""

    routes: tuple[Route, ...]
    source: str = ""

    @classmethod
    def single(cls, bank: str) -> RoutingTable:
        """Every image to one bank: ``score --bank BANK`` is the one-route case of a routed run."""
        return cls((Route("**", bank, where="--bank"),), "--bank")

    def route(self, uri: str, relpath: str) -> Route | None:
        return next((r for r in self.routes if r.matches(uri, relpath)), None)

    @classmethod
    def load(cls, url: str, storage_options: dict[str, Any] | None = None) -> RoutingTable:
        return load_routes(url, storage_options)


def _setting(key: str, value: Any, where: str) -> Any:
    """One route setting, converted and checked as ``score`` checks its option (so a typo fails here, not at night)."""
    if key not in SETTING_KEYS:
        raise ValueError(f"{where}: unknown setting {key!r}; a route may set {', '.join(SETTING_KEYS)}")
    if key == "method":
        if value not in METHODS:
            raise ValueError(f"{where}: method {value!r} is not one of {', '.join(METHODS)}")
        return value
    try:
        if key in THRESHOLD_KEYS:
            return float(value)
        return getattr(SpadeConfig().with_scoring({key: value}), key)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: bad {key} {value!r} ({exc})") from None


def _route(data: Any, where: str) -> Route:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a route is a mapping with match and bank; got {type(data).__name__}")
    unknown = [k for k in data if k not in ROUTE_KEYS and k not in SETTING_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; a route has {', '.join(ROUTE_KEYS)} "
                         f"(settings: {', '.join(SETTING_KEYS)})")
    for key in ("match", "bank"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ValueError(f"{where}: the route has no {key}")
    raw = data.get("settings") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: settings must be a mapping; got {type(raw).__name__}")
    raw = {**raw, **{k: data[k] for k in SETTING_KEYS if k in data}}  # CSV columns: settings beside match and bank
    settings = {k: _setting(k, v, where) for k, v in raw.items() if v is not None and v != ""}
    optional = {k: str(data[k]).strip() or None for k in ("normals", "features") if data.get(k) is not None}
    return Route(data["match"].strip(), data["bank"].strip(), settings, str(data.get("name") or "").strip(),
                 where=where, **optional)


def _yaml_routes(text: str, url: str) -> list[Route]:
    import yaml

    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{url}: not valid YAML: {exc}") from None
    if isinstance(data, dict) and set(data) == {"routes"}:
        data, node = data["routes"], node.value[0][1]
    if not isinstance(data, list):
        raise ValueError(f"{url}: expected a list of routes (or a mapping with the key routes)")
    return [_route(item, f"{url} line {item_node.start_mark.line + 1}") for item, item_node in zip(data, node.value)]


def _csv_routes(text: str, url: str) -> list[Route]:
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    numbers = [i + 1 for i, line in enumerate(text.splitlines()) if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    header = [h.strip() for h in reader.fieldnames or []]
    if "match" not in header or "bank" not in header:
        raise ValueError(f"{url}: the CSV header must name the columns match and bank (got {', '.join(header) or 'none'})")
    reader.fieldnames = header
    return [_route({k: (v or "").strip() for k, v in row.items() if k is not None}, f"{url} line {numbers[i + 1]}")
            for i, row in enumerate(reader)]


def load_routes(url: str, storage_options: dict[str, Any] | None = None) -> RoutingTable:
    """The routing table at ``url`` (``.yaml``/``.yml`` or ``.csv``); ValueError naming the file and line when wrong."""
    ext = os.path.splitext(url)[1].lower()
    if ext not in (".yaml", ".yml", ".csv"):
        raise ValueError(f"routing table {url}: use a .yaml, .yml or .csv file")
    try:
        text = read_bytes(url, storage_options).decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"routing table {url}: no such file") from None
    routes = _csv_routes(text, url) if ext == ".csv" else _yaml_routes(text, url)
    if not routes:
        raise ValueError(f"routing table {url} has no routes")
    return RoutingTable(tuple(routes), url)
