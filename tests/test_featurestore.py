"""Parquet feature shards: exact round trips, error rows, metadata, memory:// (stand-in for S3)."""

from __future__ import annotations

import dataclasses
import json
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spade_ray.method.features import FeatureBatch
from spade_ray.method.tiling import Tiling
from spade_ray.storage.featurestore import (
    FEATURE_FORMAT_VERSION,
    META_KEY,
    FeatureMeta,
    features_to_table,
    image_id_for,
    list_feature_shards,
    read_feature_meta,
    read_features,
    table_to_features,
    write_feature_shard,
)

META = FeatureMeta("lite0", "ab" * 32, 64, "full", [(3, 8, 8), (5, 4, 4)], 6)


def _batch(n: int, seed: int = 0) -> FeatureBatch:
    rng = np.random.default_rng(seed)
    return FeatureBatch(
        rng.standard_normal((n, 6)).astype(np.float32),
        [rng.standard_normal((n,) + shape).astype(np.float16) for shape in META.level_shapes],
    )


def _uris(n: int, prefix: str = "s3://bucket/img") -> list[str]:
    return [f"{prefix}/{i:03d}.png" for i in range(n)]


def _table(n: int, seed: int = 0, meta: FeatureMeta = META,
           prefix: str = "s3://bucket/img") -> tuple[pa.Table, FeatureBatch, list[str]]:
    uris = _uris(n, prefix)
    batch = _batch(n, seed)
    table = features_to_table(
        [image_id_for(u) for u in uris], uris, [100 + i for i in range(n)], [200] * n, batch, meta,
        relpaths=[u.rsplit("/", 1)[1] for u in uris],
    )
    return table, batch, uris


@pytest.fixture
def mem_prefix():
    prefix = f"memory://feat-{uuid.uuid4().hex[:8]}"
    yield prefix
    fs = fsspec.filesystem("memory")
    path = prefix[len("memory://") :]
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_image_id_is_stable_hex():
    a = image_id_for("s3://bucket/x/001.png")
    assert a == image_id_for("s3://bucket/x/001.png")
    assert len(a) == 20 and all(c in "0123456789abcdef" for c in a)
    assert a != image_id_for("s3://bucket/x/002.png")
    assert image_id_for("abc") == "ba7816bf8f01cfea4141"  # sha256("abc") prefix: no salt, no drift


def test_meta_json_round_trip():
    text = META.to_json()
    back = FeatureMeta.from_json(text)
    assert back == META
    assert back.level_shapes == [(3, 8, 8), (5, 4, 4)]
    assert back.format_version == FEATURE_FORMAT_VERSION
    with pytest.raises(ValueError, match="format version"):
        FeatureMeta.from_json(text.replace('"format_version": 1', '"format_version": 99'))


def test_round_trip_exact(tmp_path):
    table, batch, uris = _table(7)
    url = str(tmp_path / "feat" / "part-0.parquet")
    write_feature_shard(url, table)
    assert read_feature_meta(url) == META

    back, meta = read_features([url])
    assert meta == META
    assert back.column("relpath").to_pylist() == [u.rsplit("/", 1)[1] for u in uris]
    assert back.column("height").type == pa.int32() and back.column("height").to_pylist() == list(range(100, 107))
    ids, uris_back, feats = table_to_features(back)
    assert ids == [image_id_for(u) for u in uris] and uris_back == uris
    assert feats.global_.dtype == np.float32 and feats.global_.shape == (7, 6)
    np.testing.assert_array_equal(feats.global_, batch.global_)
    for got, want in zip(feats.levels, batch.levels):
        assert got.dtype == np.float16 and got.shape == want.shape
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))  # bit-identical fp16


def test_tensor_columns_use_the_canonical_extension_type(tmp_path):
    table, _, _ = _table(3)
    url = str(tmp_path / "a.parquet")
    write_feature_shard(url, table)
    schema = pq.read_schema(url)
    for i, (c, h, w) in enumerate(META.level_shapes):
        t = schema.field(f"level{i}").type
        assert isinstance(t, pa.FixedShapeTensorType)
        assert t.value_type == pa.float16() and list(t.shape) == [c, h, w]
    g = schema.field("global").type
    assert pa.types.is_fixed_size_list(g) and g.list_size == 6 and g.value_type == pa.float32()
    assert FeatureMeta.from_json(schema.metadata[META_KEY]) == META


def test_error_rows_are_null_and_survive(tmp_path):
    uris = _uris(5)
    statuses = ["ok", "error", "ok", "ok", "error"]
    ok_batch = _batch(3, seed=4)  # features of the ok rows only
    table = features_to_table(
        [image_id_for(u) for u in uris], uris, [10, None, 12, 13, None], [20, None, 22, 23, None], ok_batch, META,
        statuses=statuses, errors=[None, "cannot decode", "ignored for ok rows", None, "timeout"],
    )
    url = str(tmp_path / "e.parquet")
    write_feature_shard(url, table)

    full, _ = read_features([url], only_ok=False)
    assert full.num_rows == 5
    assert full.column("status").to_pylist() == statuses
    assert full.column("error").to_pylist() == [None, "cannot decode", None, None, "timeout"]
    assert full.column("height").to_pylist() == [10, None, 12, 13, None]
    for name in ("global", "level0", "level1"):
        assert full.column(name).is_null().to_pylist() == [s == "error" for s in statuses]
    with pytest.raises(ValueError, match="status is not 'ok'"):
        table_to_features(full)

    ok, _ = read_features([url])
    ids, uris_ok, feats = table_to_features(ok)
    assert uris_ok == [uris[0], uris[2], uris[3]]
    np.testing.assert_array_equal(feats.global_, ok_batch.global_)
    np.testing.assert_array_equal(feats.levels[1], ok_batch.levels[1])


def test_all_rows_batch_and_all_error_shard(tmp_path):
    uris = _uris(3)
    batch = _batch(3)
    table = features_to_table(["a", "b", "c"], uris, [1, 2, 3], [1, 2, 3], batch, META, statuses=["ok", "error", "ok"])
    _, _, feats = table_to_features(table.filter(pa.array([True, False, True])))
    np.testing.assert_array_equal(feats.global_, batch.global_[[0, 2]])

    bad = features_to_table(["a"], uris[:1], [None], [None], None, META, statuses=["error"], errors=["boom"])
    url = str(tmp_path / "bad.parquet")
    write_feature_shard(url, bad)
    ok, meta = read_features([url])
    assert ok.num_rows == 0 and meta == META
    ids, _, feats = table_to_features(ok)
    assert ids == [] and feats.global_.shape == (0, 6) and feats.levels[0].shape == (0, 3, 8, 8)


def test_shapes_must_match_meta():
    with pytest.raises(ValueError, match="level1"):
        wrong = dataclasses.replace(META, level_shapes=[(3, 8, 8), (5, 2, 2)])
        features_to_table(["a"], ["u"], [1], [1], _batch(1), wrong)
    with pytest.raises(ValueError, match="no features"):
        features_to_table(["a"], ["u"], [1], [1], None, META)


def test_mismatched_meta_across_shards_is_rejected(tmp_path):
    t1, _, _ = _table(2)
    other = dataclasses.replace(META, weights_sha256="cd" * 32)
    t2, _, _ = _table(2, meta=other)
    a, b = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    write_feature_shard(a, t1)
    write_feature_shard(b, t2)
    with pytest.raises(ValueError, match=r"b\.parquet.*weights_sha256"):
        read_features([a, b])


def test_not_a_feature_shard(tmp_path):
    url = str(tmp_path / "plain.parquet")
    pq.write_table(pa.table({"x": [1]}), url)
    with pytest.raises(ValueError, match="not a spade_ray feature shard"):
        read_feature_meta(url)


def test_memory_urls_listing_and_concat(mem_prefix):
    urls = []
    batches = []
    for part in range(3):
        table, batch, _ = _table(4, seed=part, prefix=f"s3://b/p{part}")
        url = f"{mem_prefix}/run/{'sub/' if part == 2 else ''}part-{part}.parquet"
        write_feature_shard(url, table)
        urls.append(url)
        batches.append(batch)
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{mem_prefix[len('memory://'):]}/run/_SUCCESS", b"")
    fs.pipe_file(f"{mem_prefix[len('memory://'):]}/run/notes.txt", b"x")

    listed = list_feature_shards(f"{mem_prefix}/run")
    assert listed == sorted(urls)
    assert all(u.startswith("memory://") for u in listed)
    assert list_feature_shards(urls[0]) == [urls[0]]
    assert read_feature_meta(urls[1]) == META

    table, meta = read_features(listed)
    assert table.num_rows == 12 and meta == META
    ids, uris, feats = table_to_features(table)
    order = [urls.index(u) for u in listed]
    want = FeatureBatch.concat([batches[i] for i in order])
    np.testing.assert_array_equal(feats.global_, want.global_)
    for got, exp in zip(feats.levels, want.levels):
        np.testing.assert_array_equal(got, exp)
    assert len(set(ids)) == 12


def test_listing_a_local_folder_gives_absolute_paths(tmp_path, monkeypatch):
    table, _, _ = _table(1)
    write_feature_shard(str(tmp_path / "f" / "x.parquet"), table)
    monkeypatch.chdir(tmp_path)
    assert list_feature_shards("f") == [str(tmp_path / "f" / "x.parquet")]
    assert list_feature_shards(str(tmp_path / "missing")) == []


def test_tiled_features_carry_their_tiling_and_untiled_metadata_keeps_its_bytes():
    tiled = dataclasses.replace(META, tile=224, tile_overlap=56, scale=0.5)
    assert FeatureMeta.from_json(tiled.to_json()).tiling == Tiling(224, 56, 0.5)
    assert tiled != META  # features cut another way are not comparable
    assert "tile" not in json.loads(META.to_json())  # as written before tiling existed
    assert FeatureMeta.from_json(META.to_json()).tiling == Tiling()
