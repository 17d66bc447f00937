"""URL helpers: which spelling comes back, how keys join, and that whole-file reads and writes round-trip."""

from __future__ import annotations

import os

from spade_ray.storage.urls import join, read_bytes, relative, resolve, write_bytes


def test_join_drops_the_base_trailing_slash_and_keeps_the_key_verbatim() -> None:
    assert join("s3://bucket/out", "masks/a.png") == "s3://bucket/out/masks/a.png"
    assert join("s3://bucket/out/", "masks/a.png") == "s3://bucket/out/masks/a.png"
    assert join("/", "data/a.png") == "/data/a.png"
    assert join("s3://bucket/in", "/a.png") == "s3://bucket/in//a.png"  # "in//a.png" is its own object key


def test_relative_is_none_outside_the_root() -> None:
    assert relative("bucket/in/a/b.png", "bucket/in") == "a/b.png"
    assert relative("bucket/in/a/b.png", "bucket/in/") == "a/b.png"
    assert relative("bucket/inbox/b.png", "bucket/in") is None


def test_resolve_keeps_remote_spelling_and_makes_local_paths_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, path, base = resolve("a/../b/")
    assert path == base == os.path.join(str(tmp_path), "b")
    _, path, base = resolve("memory://bucket/x/")
    assert (path, base) == ("/bucket/x", "memory://bucket/x")


def test_whole_file_round_trip(tmp_path) -> None:
    url = str(tmp_path / "deep" / "folder" / "f.bin")
    write_bytes(url, b"abc")
    assert read_bytes(url) == b"abc"
    assert os.listdir(tmp_path / "deep" / "folder") == ["f.bin"]
