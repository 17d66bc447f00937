"""The result rows of a score output: written whole per batch, read back by column, rewritten for retries."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import spade_ray.storage.parquet as parquet
from spade_ray.storage.parquet import list_parquet_files, read_columns
from spade_ray.storage.results import RESULT_SCHEMA, batch_name, drop_error_rows, read_results, remove_results, write_results


def _row(image_id: str, status: str = "ok") -> dict:
    ok = status == "ok"
    return {"uri": f"/in/{image_id}.png", "relpath": f"{image_id}.png", "image_id": image_id, "bank_id": "v0001-x",
            "image_score": 1.5 if ok else None, "knn_score": 1.0 if ok else None, "pixel_max": 2.0 if ok else None,
            "is_anomalous": False if ok else None, "mask_uri": None, "heatmap_uri": None, "overlay_uri": None,
            "neighbours": ["/bank/n.png"] if ok else None, "status": status,
            "error": None if ok else "ImageDecodeError: truncated", "seconds": 0.25}


def test_a_batch_is_one_parquet_file_in_the_result_schema(tmp_path) -> None:
    rows = [_row("a"), _row("b", "error")]
    name = batch_name("run1", ["a", "b"])
    write_results(str(tmp_path), rows, name)
    assert [p.name for p in (tmp_path / "results").iterdir()] == [name]
    assert pq.read_table(tmp_path / "results" / name).schema == RESULT_SCHEMA
    assert read_results(str(tmp_path)).to_pylist() == pa.Table.from_pylist(rows, schema=RESULT_SCHEMA).to_pylist()


@pytest.mark.parametrize("whole_file_bytes", [parquet.WHOLE_FILE_BYTES, 0])  # fetched whole, or opened
def test_read_results_reads_only_the_asked_columns_of_every_visible_file(tmp_path, monkeypatch, whole_file_bytes) -> None:
    monkeypatch.setattr(parquet, "WHOLE_FILE_BYTES", whole_file_bytes)
    write_results(str(tmp_path), [_row("b")], "part-2.parquet")
    write_results(str(tmp_path), [_row("a")], "part-1.parquet")
    write_results(str(tmp_path), [_row("hidden")], ".part-0.parquet")
    write_results(str(tmp_path), [_row("marker")], "_part-0.parquet")
    older = pa.Table.from_pylist([_row("c")], schema=RESULT_SCHEMA).drop_columns(["overlay_uri", "neighbours"])
    pq.write_table(older, tmp_path / "results" / "part-0.parquet")

    table = read_results(str(tmp_path), ["image_id", "neighbours", "overlay_uri"])
    assert table.schema == pa.schema([RESULT_SCHEMA.field(n) for n in ("image_id", "neighbours", "overlay_uri")])
    assert table.to_pylist() == [{"image_id": "c", "neighbours": None, "overlay_uri": None},
                                 {"image_id": "a", "neighbours": ["/bank/n.png"], "overlay_uri": None},
                                 {"image_id": "b", "neighbours": ["/bank/n.png"], "overlay_uri": None}]


def test_an_output_without_results_reads_as_an_empty_table(tmp_path) -> None:
    table = read_results(str(tmp_path / "nothing"), ["image_id", "status"])
    assert table.num_rows == 0 and table.column_names == ["image_id", "status"]
    assert list_parquet_files(str(tmp_path / "nothing")) == []


def test_read_columns_works_on_any_prefix_and_on_a_single_file(tmp_path) -> None:
    pq.write_table(pa.table({"image_id": ["x", "y"], "status": ["ok", "error"], "big": [b"0" * 10, b"1" * 10]}),
                   tmp_path / "a.parquet")
    schema = pa.schema([("image_id", pa.string()), ("status", pa.string())])
    assert read_columns(str(tmp_path), schema).to_pylist() == [{"image_id": "x", "status": "ok"},
                                                              {"image_id": "y", "status": "error"}]
    assert list_parquet_files(str(tmp_path / "a.parquet")) == [str(tmp_path / "a.parquet")]


def test_dropping_error_rows_rewrites_or_removes_files_and_counts_rows(tmp_path) -> None:
    write_results(str(tmp_path), [_row("a"), _row("b", "error")], "part-1.parquet")
    write_results(str(tmp_path), [_row("c", "error")], "part-2.parquet")
    write_results(str(tmp_path), [_row("d")], "part-3.parquet")
    assert drop_error_rows(str(tmp_path)) == 2
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["part-1.parquet", "part-3.parquet"]
    assert read_results(str(tmp_path), ["image_id", "status"]).to_pylist() == [
        {"image_id": "a", "status": "ok"}, {"image_id": "d", "status": "ok"}]
    assert drop_error_rows(str(tmp_path / "nothing")) == 0


def test_remove_results_leaves_no_result_file(tmp_path) -> None:
    write_results(str(tmp_path), [_row("a")], "part-1.parquet")
    write_results(str(tmp_path), [_row("b")], ".part-0.parquet")
    remove_results(str(tmp_path))
    assert list((tmp_path / "results").iterdir()) == []
    remove_results(str(tmp_path / "nothing"))


def test_results_round_trip_on_an_object_store(s3_server, s3_bucket) -> None:
    write_results(f"{s3_bucket}/out/", [_row("a"), _row("b", "error")], "part-1.parquet", s3_server.storage_options)
    assert drop_error_rows(f"{s3_bucket}/out", s3_server.storage_options) == 1
    assert read_results(f"{s3_bucket}/out", ["image_id"], s3_server.storage_options).to_pylist() == [{"image_id": "a"}]
    remove_results(f"{s3_bucket}/out", s3_server.storage_options)
    assert read_results(f"{s3_bucket}/out", None, s3_server.storage_options).num_rows == 0
