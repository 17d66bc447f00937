"""The sharded bank format: versions, manifests written last, sha256 checks, add-to, search."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections import Counter

import fsspec
import numpy as np
import pytest

from spade_ray.bank.manifest import BANK_FORMAT_VERSION, BankManifest
from spade_ray.bank.shard_loader import load_shard
from spade_ray.bank.store import (
    check_compatible,
    feature_meta_of,
    list_versions,
    make_manifest,
    next_version_name,
    open_bank,
    shard_for,
    write_manifest,
    write_shard,
)
from spade_ray.method.matching import MatchSettings
from spade_ray.storage.featurestore import FeatureMeta, image_id_for

META = FeatureMeta("lite0", "ab" * 32, 64, "full", [(3, 8, 8), (5, 4, 4)], 6)


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    uris = [f"s3://bucket/good/{seed}-{i:03d}.png" for i in range(n)]
    ids = [image_id_for(u) for u in uris]
    global_ = rng.standard_normal((n, META.global_dim)).astype(np.float32)
    levels = [rng.standard_normal((n,) + s).astype(np.float16) for s in META.level_shapes]
    return ids, uris, global_, levels


def _build(bank: str, n_shards: int = 2, n: int = 10, seed: int = 0, parent: dict | None = None):
    """Write one version the way build-bank / --add-to would; returns (version name, manifest, data)."""
    version = next_version_name(bank)
    vurl = f"{bank.rstrip('/')}/{version}"
    ids, uris, global_, levels = _data(n, seed)
    first = len(parent.shards) if parent else 0
    assign = np.array([shard_for(i, n_shards) for i in ids])
    entries = []
    for s in range(n_shards):
        rows = np.flatnonzero(assign == s)
        entries.append(
            write_shard(vurl, first + s, [ids[r] for r in rows], [uris[r] for r in rows], global_[rows],
                        [lv[rows] for lv in levels])
        )
    shards = (list(parent.shards) if parent else []) + entries
    manifest = make_manifest(
        version, META, shards, build={"n_shards": n_shards}, calibration={"image_threshold": 1.5},
        parent=f"v{parent.version:04d}" if parent else None,
    )
    write_manifest(vurl, manifest)
    return version, manifest, (ids, uris, global_, levels)


@pytest.fixture(params=["local", "memory"])
def bank_url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "bank")
        return
    name = f"bank-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def _fs_path(url: str) -> tuple:
    return fsspec.core.url_to_fs(url)


def test_shard_for_is_stable_and_uniform():
    assert shard_for("abc", 8) == 2  # sha256("abc") = ba7816bf8f01cfea...; 0x...a % 8
    assert shard_for("0123456789abcdef0123", 1000) == 369
    assert shard_for(image_id_for("s3://bucket/x.png"), 7) == shard_for(image_id_for("s3://bucket/x.png"), 7)
    counts = Counter(shard_for(image_id_for(f"img-{i}"), 8) for i in range(8000))
    assert sorted(counts) == list(range(8))
    assert all(850 < c < 1150 for c in counts.values()), counts
    with pytest.raises(ValueError):
        shard_for("abc", 0)


def test_write_open_load_round_trip(bank_url):
    assert list_versions(bank_url) == [] and next_version_name(bank_url) == "v0001"
    version, manifest, (ids, uris, global_, levels) = _build(bank_url)
    assert version == "v0001"
    assert list_versions(bank_url) == ["v0001"] and next_version_name(bank_url) == "v0002"

    root, m = open_bank(bank_url)
    assert root == bank_url and m == manifest
    assert m.to_dict()["format"] == "spade_ray.bank" and m.format_version == BANK_FORMAT_VERSION
    assert m.n_images == 10 and m.parent is None and m.calibration == {"image_threshold": 1.5}
    assert m.to_dict()["levels"] == [{"channels": 3, "height": 8, "width": 8}, {"channels": 5, "height": 4, "width": 4}]
    assert feature_meta_of(m) == META
    assert [s.path for s in m.shards] == ["v0001/shard-00000", "v0001/shard-00001"]
    assert set(m.shards[0].files) == {"ids.json", "index.faiss", "global.npy", "level0.npy", "level1.npy"}

    root2, m2 = open_bank(f"{bank_url}/v0001/")
    assert root2 == bank_url and m2 == m

    seen = {}
    for entry in m.shards:
        shard = load_shard(root, entry)
        assert shard.name == entry.name and len(shard) == entry.n_images
        assert shard.global_.dtype == np.float32 and all(lv.dtype == np.float16 for lv in shard.levels)
        for r, image_id in enumerate(shard.ids):
            seen[image_id] = True
            src = ids.index(image_id)
            assert shard.uris[r] == uris[src]
            np.testing.assert_array_equal(shard.global_[r], global_[src])
            for lv, want in zip(shard.levels, levels):
                assert np.array_equal(lv[r].view(np.uint16), want[src].view(np.uint16))
    assert len(seen) == 10


def test_shard_search_equals_brute_force(tmp_path):
    bank = str(tmp_path / "bank")
    _, manifest, _ = _build(bank, n_shards=1, n=25)
    shard = load_shard(bank, manifest.shards[0])
    queries = np.random.default_rng(9).standard_normal((4, META.global_dim)).astype(np.float32)
    dists, rows = shard.search(queries, 5)
    brute = np.linalg.norm(queries[:, None, :] - shard.global_[None], axis=2)
    want_rows = np.argsort(brute, axis=1)[:, :5]
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(dists, np.take_along_axis(brute, want_rows, axis=1), rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(dists, axis=1) >= 0)

    dists, rows = shard.search(queries, 30)  # more than the shard holds
    assert np.all(rows[:, 25:] == -1) and np.all(np.isinf(dists[:, 25:])) and np.all(rows[:, :25] >= 0)


def test_empty_shard_is_allowed(tmp_path):
    bank = str(tmp_path / "bank")
    vurl = f"{bank}/v0001"
    entry = write_shard(vurl, 0, [], [], np.zeros((0, 6), np.float32),
                        [np.zeros((0,) + s, np.float16) for s in META.level_shapes])
    write_manifest(vurl, make_manifest(1, META, [entry]))
    root, m = open_bank(bank)
    shard = load_shard(root, m.shards[0])
    dists, rows = shard.search(np.zeros((2, 6), np.float32), 3)
    assert len(shard) == 0 and np.all(rows == -1) and np.all(np.isinf(dists))


def test_incomplete_version_is_ignored(bank_url):
    _build(bank_url)
    # a crashed second build: shard files written, manifest never
    ids, uris, global_, levels = _data(4, seed=5)
    write_shard(f"{bank_url}/v0002", 0, ids, uris, global_, levels)
    assert list_versions(bank_url) == ["v0001"]
    root, m = open_bank(bank_url)
    assert m.version == 1
    with pytest.raises(FileNotFoundError, match=r"v0002.*no complete bank version"):
        open_bank(f"{bank_url}/v0002")
    assert next_version_name(bank_url) == "v0003"  # never reuses the crashed folder


def test_missing_bank_is_a_clear_error(bank_url):
    with pytest.raises(FileNotFoundError, match="no complete bank version"):
        open_bank(bank_url)
    ids, uris, global_, levels = _data(2)
    write_shard(f"{bank_url}/v0001", 0, ids, uris, global_, levels)
    with pytest.raises(FileNotFoundError, match=re.escape(bank_url) + ".*no complete bank version"):
        open_bank(bank_url)


def test_tampered_file_is_refused(bank_url):
    _, manifest, _ = _build(bank_url)
    entry = manifest.shards[0]
    url = f"{bank_url}/{entry.path}/level0.npy"
    fs, path = _fs_path(url)
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0x01
    fs.pipe_file(path, bytes(data))
    with pytest.raises(ValueError, match=r"shard-00000/level0\.npy.*sha256") as info:
        load_shard(bank_url, entry)
    assert entry.files["level0.npy"] in str(info.value)
    shard = load_shard(bank_url, entry, verify=False)  # explicit opt-out still parses
    assert len(shard) == entry.n_images
    load_shard(bank_url, manifest.shards[1])  # the other shard is untouched


def test_wrong_format_is_refused(tmp_path):
    bank = tmp_path / "bank"
    _build(str(bank))
    manifest_path = bank / "v0001" / "manifest.json"
    m = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        open_bank(str(bank))
    manifest_path.write_text(json.dumps({**m, "format": "something.else"}))
    with pytest.raises(ValueError, match="not a spade_ray bank manifest"):
        open_bank(str(bank / "v0001"))
    manifest_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        open_bank(str(bank))
    with pytest.raises(ValueError, match="version 2"):
        write_manifest(str(bank / "v0001"), dataclasses.replace(BankManifest.from_dict(m), version=2))


def test_check_compatible():
    m = make_manifest(1, META, [])
    check_compatible(m, "lite0", "ab" * 32, 64, "full")
    with pytest.raises(ValueError, match=r"bank was built with backbone lite0 \(weights sha256 abab.*this scorer uses resnet18"):
        check_compatible(m, "resnet18", "ab" * 32, 64, "full")
    with pytest.raises(ValueError, match="weights sha256 cdcd"):
        check_compatible(m, "lite0", "cd" * 32, 64, "full")
    with pytest.raises(ValueError, match="image size 64.*224"):
        check_compatible(m, "lite0", "ab" * 32, 224, "full")
    with pytest.raises(ValueError, match="protocol 'full'.*'paper'"):
        check_compatible(m, "lite0", "ab" * 32, 64, "paper")


def test_add_to_references_parent_shards(bank_url):
    _, parent, first = _build(bank_url, n_shards=2, n=10, seed=0)
    version, child, second = _build(bank_url, n_shards=2, n=6, seed=1, parent=parent)
    assert version == "v0002" and child.parent == "v0001"
    assert child.shards[:2] == parent.shards
    assert [s.path for s in child.shards] == ["v0001/shard-00000", "v0001/shard-00001", "v0002/shard-00002", "v0002/shard-00003"]
    assert child.n_images == 16
    assert list_versions(bank_url) == ["v0001", "v0002"]

    root, latest = open_bank(bank_url)
    assert latest.version == 2
    all_ids = [i for e in latest.shards for i in load_shard(root, e).ids]
    assert sorted(all_ids) == sorted(first[0] + second[0])

    root1, old = open_bank(f"{bank_url}/v0001")
    assert old.version == 1 and root1 == root
    assert sorted(i for e in old.shards for i in load_shard(root1, e).ids) == sorted(first[0])

    with pytest.raises(ValueError, match="unique"):
        make_manifest(3, META, parent.shards + parent.shards[:1])


def test_a_served_shard_keeps_one_copy_of_its_pyramids_in_the_setting_it_serves(bank_url):
    from spade_ray.bank.shard_server import ShardServer
    from spade_ray.method.aggregation import aggregate_level
    from spade_ray.method.pyramid_bank import PyramidBank

    _, manifest, (ids, _, _, levels) = _build(bank_url, n_shards=1, n=6)
    entry = manifest.shards[0]
    server = ShardServer(bank_url, entry, offset=0, aggregate=3)
    shard_ids = server.shard.ids
    order = [ids.index(i) for i in shard_ids]
    raw_bytes = sum(level.nbytes for level in levels)
    assert server.shard.levels == []  # the raw pyramids went as the served copy was made
    served = server.pyramids(3)
    assert server.info()["bytes"] == server.shard.global_.nbytes + served.nbytes < server.shard.global_.nbytes + 2 * raw_bytes

    # calibration reads bank images as the served bank holds them: aggregated, float32
    _, got = server.features(np.array([1, 4]), 3)
    for level, want in zip(got, levels):
        assert level.dtype == np.float32
        np.testing.assert_array_equal(level, aggregate_level(want[order], 3)[[1, 4]].astype(np.float32))

    # another feature space reloads the shard from storage and then serves that one only
    query = [np.random.default_rng(1).standard_normal(level.shape[1:]).astype(np.float32) for level in levels]
    answer = server.correspond([q[None] for q in query], {0: np.arange(6)}, MatchSettings(1, "coarse-to-fine", aggregate=1))[0]
    assert server.pyramids(1) is not served and server.pyramids(1).aggregate == 1
    import torch

    want = PyramidBank([level[order] for level in levels]).distances([torch.from_numpy(q) for q in query], np.arange(6),
                                                                       MatchSettings(1, "coarse-to-fine", aggregate=1))
    for a, w in zip(answer, want):
        np.testing.assert_array_equal(a, w.numpy())
