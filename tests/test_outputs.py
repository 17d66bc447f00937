"""Output keys and writes: nothing escapes the output prefix, nothing overwrites another image's output,
and a reader never sees half a file."""

from __future__ import annotations

import posixpath

import pytest

from spade_ray.storage.featurestore import image_id_for
from spade_ray.storage.outputs import output_key, unique_output_stems
from spade_ray.storage.urls import join, write_bytes


@pytest.mark.parametrize(
    ("relpath", "key"),
    [
        ("test/crack/001.jpg", "test/crack/001.png"),
        ("../../etc/cron.d/evil.png", "etc/cron.d/evil.png"),
        ("/etc/passwd", "etc/passwd.png"),
        ("a/./b/../c.png", "a/b/c.png"),
        ("C:\\images\\line 3\\x.tif", "C_/images/line_3/x.png"),
        ("weird name;rm -rf $HOME#1.png", "weird_name_rm_-rf_HOME_1.png"),
        ("..", "image.png"),
        ("", "image.png"),
    ],
)
def test_keys_stay_below_the_output_prefix(relpath: str, key: str) -> None:
    assert output_key(relpath) == key
    url = join("s3://bucket/out", f"masks/{key}")
    assert posixpath.normpath(url.split("://", 1)[1]).startswith("bucket/out/masks/")


def test_inputs_that_would_share_a_key_each_get_their_own() -> None:
    uris = ["s3://cam/a/001.png", "s3://cam/a/001.jpg", "s3://cam/a/b c.png", "s3://cam/a/b_c.png",
            "s3://cam/a/X.png", "s3://cam/a/x.png", "s3://cam/b/001.png"]
    relpaths = [u.split("s3://cam/", 1)[1] for u in uris]
    stems = unique_output_stems((image_id_for(u), r) for u, r in zip(uris, relpaths))
    assert len({s.lower() for s in stems.values()}) == len(uris)
    assert stems[image_id_for("s3://cam/b/001.png")] == "b/001"  # no clash, plain key
    assert stems[image_id_for("s3://cam/a/001.png")] == f"a/001-{image_id_for('s3://cam/a/001.png')[:8]}"


def test_local_writes_replace_whole_files_and_leave_no_temporaries(tmp_path) -> None:
    target = tmp_path / "out" / "masks" / "a.png"
    write_bytes(str(target), b"first")
    write_bytes(str(target), b"second version")
    assert target.read_bytes() == b"second version"
    assert [p.name for p in target.parent.iterdir()] == ["a.png"]


def test_object_store_writes_are_one_object_with_no_temporaries(s3_server, s3_bucket) -> None:
    url = f"{s3_bucket}/out/results/part-1.parquet"
    write_bytes(url, b"x" * 100_000, s3_server.storage_options)
    fs = s3_server.filesystem()
    assert fs.find(f"{s3_bucket}/out") == [url.split("://", 1)[1]]
    assert fs.cat_file(url) == b"x" * 100_000
