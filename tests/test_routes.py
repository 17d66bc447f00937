"""The routing table of ``score --routes``: how an engineer writes it (YAML or CSV), which route an image
takes (first match wins; globs and prefixes, below the input root or on full URIs), and the errors a
wrong table gets (naming the file and the line) before any image is scored."""

from __future__ import annotations

import pytest

from spade_ray.storage.routes import Route, RoutingTable, load_routes

YAML = """\
# the plant's mixed archive
routes:
  - match: line1/cam*/**
    bank: s3://plant/banks/line1
  - match: line2/
    bank: s3://plant/banks/line2
    settings: {pixel_k: 20, method: spade, threshold: 3.5}
  - match: s3://plant/*/line3/top.png
    bank: s3://plant/banks/line3-top
    name: line 3, top camera
"""


def test_a_yaml_table_routes_each_image_to_the_first_matching_route(tmp_path) -> None:
    (tmp_path / "routes.yaml").write_text(YAML)
    table = load_routes(str(tmp_path / "routes.yaml"))
    assert [r.bank for r in table.routes] == ["s3://plant/banks/line1", "s3://plant/banks/line2",
                                               "s3://plant/banks/line3-top"]

    def bank(uri: str, relpath: str) -> str | None:
        route = table.route(uri, relpath)
        return route.bank if route else None

    assert bank("s3://plant/d/line1/cam2/a/b.png", "line1/cam2/a/b.png") == "s3://plant/banks/line1"  # ** crosses folders
    assert bank("s3://plant/d/line1/misc/b.png", "line1/misc/b.png") is None  # cam* is one folder named cam...
    assert bank("s3://plant/d/line2/any/depth.png", "line2/any/depth.png") == "s3://plant/banks/line2"  # prefix
    assert bank("s3://plant/d/line22/x.png", "line22/x.png") is None  # a prefix ending in / is a folder
    assert bank("s3://plant/2026-11-28/line3/top.png", "line3/top.png") == "s3://plant/banks/line3-top"  # full URI
    assert bank("s3://other/2026-11-28/line3/top.png", "line3/top.png") is None

    line2 = table.routes[1]
    # a route's preset, then its explicit settings; its thresholds apart
    assert line2.scoring() == {"aggregate": 1, "image_scoring": "knn", "matching": "exact", "pixel_k": 20}
    assert (line2.threshold, line2.image_threshold) == (3.5, None)
    assert table.routes[2].label == "line 3, top camera" and table.routes[0].label == "line1/cam*/**"


def test_a_csv_table_takes_settings_as_columns_and_a_catch_all_last(tmp_path) -> None:
    (tmp_path / "routes.csv").write_text(
        "match,bank,pixel_k,image_threshold,normals,features\n"
        "# comments and blank lines are skipped\n\n"
        "line1/**,/banks/line1,7,,/normals/line1,/features/line1\n"
        "**,/banks/default,,,,\n")
    table = load_routes(str(tmp_path / "routes.csv"))
    first, last = table.routes
    assert first.settings == {"pixel_k": 7} and first.normals == "/normals/line1" and first.features == "/features/line1"
    assert last.settings == {} and last.normals is None
    assert table.route("/in/line1/a.png", "line1/a.png") is first
    assert table.route("/in/line9/a.png", "line9/a.png") is last


def test_local_paths_are_matched_as_absolute_paths(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    route = Route(f"{tmp_path}/archive/line1/", "b")
    assert route.matches(str(tmp_path / "archive" / "line1" / "x.png"), "line1/x.png")
    assert route.matches(f"file://{tmp_path}/archive/line1/x.png", "line1/x.png")
    assert not route.matches(str(tmp_path / "archive" / "line10" / "x.png"), "line10/x.png")
    assert RoutingTable.single("/banks/a").route("anything", "any/where.png").bank == "/banks/a"


@pytest.mark.parametrize("text, message", [
    ("routes:\n  - match: a/\n    bank: /b\n  - match: c/\n    bank: /d\n    pixelk: 3\n",
     "line 4: unknown key 'pixelk'"),
    ("- match: a/\n  bank: /b\n  settings: {pixel_k: many}\n", "line 1: bad pixel_k 'many'"),
    ("- match: a/\n  bank: /b\n  settings: {matching: fuzzy}\n", "line 1: bad matching 'fuzzy'"),
    ("- match: a/\n  bank: /b\n  settings: {method: best}\n", "line 1: method 'best' is not one of"),
    ("- match: a/\n", "line 1: the route has no bank"),
    ("match: a/\nbank: /b\n", "expected a list of routes"),
    ("routes: []\n", "has no routes"),
    ("- [a, b\n", "not valid YAML"),
])
def test_a_wrong_yaml_table_is_refused_naming_the_file_and_line(tmp_path, text, message) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="routes.yaml") as info:
        load_routes(str(path))
    assert message in str(info.value)


def test_a_wrong_csv_table_or_file_is_refused_naming_it(tmp_path) -> None:
    (tmp_path / "routes.csv").write_text("match,bank,kappa\nline1/,/b,1\nline2/,/c,two\n")
    with pytest.raises(ValueError, match=r"routes.csv line 3: bad kappa 'two'"):
        load_routes(str(tmp_path / "routes.csv"))
    (tmp_path / "nobank.csv").write_text("pattern,target\nline1/,/b\n")
    with pytest.raises(ValueError, match="must name the columns match and bank"):
        load_routes(str(tmp_path / "nobank.csv"))
    with pytest.raises(ValueError, match="no such file"):
        load_routes(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="use a .yaml, .yml or .csv file"):
        load_routes(str(tmp_path / "routes.json"))


def test_the_readme_table_reads_and_routes_as_it_says(tmp_path) -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [example] = [b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "routes:" in b and "bank:" in b]
    (tmp_path / "routes.yaml").write_text(example)
    table = load_routes(str(tmp_path / "routes.yaml"))
    day = "s3://plant/2026-11-28"
    assert table.route(f"{day}/line1/cam2/x.png", "line1/cam2/x.png").bank == "s3://plant/banks/line1"
    line2 = table.route(f"{day}/line2/cam9/x.png", "line2/cam9/x.png")
    assert line2.label == "line 2 (both cameras)" and line2.scoring() == {"pixel_k": 20} and line2.threshold == 3.5
    top = table.route(f"{day}/line3/top/x.png", "line3/top/x.png")
    assert top.bank == "s3://plant/banks/line3-top" and top.normals == "s3://plant/normals/line3-top"
    assert table.route(f"{day}/line9/x.png", "line9/x.png") is None
