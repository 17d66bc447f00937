"""The "already done" set a rerun skips: right answers from real result files, and no Python object per row."""

from __future__ import annotations

import tracemalloc

import pyarrow as pa
import pytest

from spade_ray.distributed.bank_plan import done_images
from spade_ray.storage.done_set import DoneSet
from spade_ray.storage.results import RESULT_SCHEMA, batch_name, read_results, write_results
from spade_ray.storage.sources import image_id_for


def rows(uris: list[str], status: str = "ok") -> list[dict]:
    return [{"uri": u, "relpath": u.rsplit("/", 1)[-1], "image_id": image_id_for(u), "bank_id": "v0001-x",
             "status": status, "error": None if status == "ok" else "truncated or corrupt image data"} for u in uris]


def test_holds_the_rows_of_every_result_file_and_tells_the_error_rows(tmp_path) -> None:
    ok = [f"s3://b/in/{n:03d}.png" for n in range(30)]
    bad = [f"s3://b/in/bad{n}.png" for n in range(3)]
    for part in (ok[:10], ok[10:], bad):
        batch = rows(part, "ok" if part is not bad else "error")
        write_results(str(tmp_path), batch, batch_name("run", [r["image_id"] for r in batch]))
    done = DoneSet.from_rows(read_results(str(tmp_path), ["image_id", "status"]))
    new = [f"s3://b/in/new{n}.png" for n in range(5)]
    asked = [image_id_for(u) for u in ok + bad + new]
    assert done.holds(asked).tolist() == [True] * 33 + [False] * 5
    assert len(done) == 33 and done.count_errors(asked) == 3


def test_an_empty_output_holds_nothing(tmp_path) -> None:
    done = DoneSet.from_rows(read_results(str(tmp_path), ["image_id", "status"]))
    assert len(done) == 0 and not done.holds([image_id_for("a.png")]).any()
    assert not DoneSet.empty().holds([image_id_for("a.png")]).any()


def test_an_id_of_another_length_is_refused_naming_it() -> None:
    table = pa.table({"image_id": ["abc"], "status": ["ok"]})
    with pytest.raises(ValueError, match="image_id that is not 20 characters"):
        DoneSet.from_rows(table)


def test_a_hundred_thousand_rows_cost_bytes_per_row_not_python_objects() -> None:
    n = 100_000
    table = pa.Table.from_pylist(rows([f"s3://b/in/{i:08d}.png" for i in range(n)]),
                                 schema=pa.schema([RESULT_SCHEMA.field(c) for c in ("image_id", "status")]))
    tracemalloc.start()
    done = DoneSet.from_rows(table)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(done) == n
    # 20 bytes per id (the array) and the sort's copy; a dict of Python strings took ~160 held, ~440 at the peak
    assert held / n < 30 and peak / n < 100, (held / n, peak / n)


def test_a_rerun_into_results_of_another_bank_is_refused_naming_it(tmp_path) -> None:
    batch = rows(["s3://b/in/000.png"])
    write_results(str(tmp_path), batch, batch_name("run", [r["image_id"] for r in batch]))
    with pytest.raises(ValueError, match=r"holds results scored against another bank \(v0001-x\)"):
        done_images(str(tmp_path), {"v0002-y"}, overwrite=False, retry_errors=False, exclusive=True,
                    storage_options=None)
    done = done_images(str(tmp_path), {"v0001-x"}, overwrite=False, retry_errors=False,
                       exclusive=True, storage_options=None)
    assert len(done) == 1
