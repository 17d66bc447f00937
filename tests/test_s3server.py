"""The SeaweedFS test server (spade_ray/testing/s3server.py) is a real S3 endpoint that s3fs, fsspec and workers reach."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import fsspec
import pytest

from spade_ray.testing.s3server import S3Server, processes_running, run_s3_server, wait_port_closed


def test_write_and_read_back(s3_server: S3Server, s3_bucket: str) -> None:
    url = f"{s3_bucket}/dir/hello.bin"
    payload = os.urandom(3 * 2**20 + 17)
    with fsspec.open(url, "wb", **s3_server.storage_options) as f:
        f.write(payload)
    with fsspec.open(url, "rb", **s3_server.storage_options) as f:
        assert f.read() == payload
    # a second, independent client sees the same bytes (nothing is served from a local cache)
    assert s3_server.filesystem().cat_file(url) == payload


def test_large_multipart_upload(s3_server: S3Server, s3_bucket: str) -> None:
    url = f"{s3_bucket}/big.bin"
    payload = os.urandom(12 * 2**20)  # above s3fs's 5 MiB block: a multipart upload
    fs = s3_server.filesystem()
    with fs.open(url, "wb", block_size=5 * 2**20) as f:
        f.write(payload)
    assert fs.size(url) == len(payload)
    assert fs.cat_file(url, start=2**20, end=2**20 + 100) == payload[2**20 : 2**20 + 100]


def test_list_prefix(s3_server: S3Server, s3_bucket: str) -> None:
    fs = s3_server.filesystem()
    bucket = s3_bucket.removeprefix("s3://")
    for key in ["train/good/a.png", "train/good/b.png", "train/bad/c.png", "test/d.png"]:
        fs.pipe_file(f"{bucket}/{key}", key.encode())
    assert sorted(fs.ls(f"{bucket}/train/good", detail=False)) == [f"{bucket}/train/good/a.png", f"{bucket}/train/good/b.png"]
    assert sorted(fs.ls(f"{bucket}/train", detail=False)) == [f"{bucket}/train/bad", f"{bucket}/train/good"]
    assert sorted(fs.find(f"{bucket}/train")) == [
        f"{bucket}/train/bad/c.png",
        f"{bucket}/train/good/a.png",
        f"{bucket}/train/good/b.png",
    ]
    assert sorted(fs.glob(f"{s3_bucket}/*/good/*.png")) == [f"{bucket}/train/good/a.png", f"{bucket}/train/good/b.png"]
    files = fsspec.open_files(f"{s3_bucket}/train/**/*.png", "rb", **s3_server.storage_options)
    assert len(files) == 3


def test_make_bucket(s3_server: S3Server) -> None:
    fs = s3_server.filesystem()
    first, second = s3_server.make_bucket(), s3_server.make_bucket()
    assert first != second
    named = s3_server.make_bucket("spade-named-bucket")
    assert named == "spade-named-bucket"
    buckets = set(fs.ls("", detail=False))
    assert {first, second, named} <= buckets
    assert fs.ls(first, detail=False) == []


_READER = textwrap.dedent(
    """
    import os, sys, fsspec
    assert not any(k.startswith("AWS_") and k not in {allowed!r} for k in os.environ), sorted(os.environ)
    with fsspec.open(sys.argv[1], "rb") as f:  # no storage_options: everything comes from the environment
        data = f.read()
    with fsspec.open(sys.argv[1] + ".copy", "wb") as f:
        f.write(data[::-1])
    print(len(data))
    """
)


@pytest.mark.parametrize("endpoint_var", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_subprocess_configured_by_env_only(s3_server: S3Server, s3_bucket: str, tmp_path, endpoint_var: str) -> None:
    url = f"{s3_bucket}/shared/object.bin"
    payload = os.urandom(4096)
    s3_server.filesystem().pipe_file(url, payload)
    other = {"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"} - {endpoint_var}
    aws = {k: v for k, v in s3_server.env.items() if k not in other}
    # nothing from this process's environment but PATH, and a HOME without ~/.aws
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **aws}
    code = _READER.format(allowed=sorted(aws))
    out = subprocess.run([sys.executable, "-c", code, url], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(len(payload))
    assert s3_server.filesystem().cat_file(url + ".copy") == payload[::-1]


def test_pyarrow_s3_reads_with_env_endpoint(s3_server: S3Server, s3_bucket: str, tmp_path) -> None:
    """Ray Data reads s3:// through pyarrow's S3FileSystem; it must reach the server from the environment too."""
    pytest.importorskip("pyarrow.fs")
    url = f"{s3_bucket}/arrow/object.bin"
    s3_server.filesystem().pipe_file(url, b"arrow-bytes")
    code = textwrap.dedent(
        """
        import sys, pyarrow.fs as pafs
        fs, path = pafs.FileSystem.from_uri(sys.argv[1])
        with fs.open_input_stream(path) as f:
            sys.stdout.write(f.read().decode())
        """
    )
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **s3_server.env}
    out = subprocess.run([sys.executable, "-c", code, url], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "arrow-bytes"


@pytest.mark.parametrize(
    "override",
    [
        pytest.param({"secret": "wrong-secret"}, id="wrong-secret"),
        pytest.param({"key": "NOSUCHKEY", "secret": "whatever"}, id="unknown-key"),
        pytest.param({"anon": True, "key": None, "secret": None}, id="anonymous"),
    ],
)
def test_wrong_credentials_rejected(s3_server: S3Server, s3_bucket: str, override: dict) -> None:
    url = f"{s3_bucket}/secret.txt"
    s3_server.filesystem().pipe_file(url, b"top secret")
    bad = s3_server.filesystem(**override)
    with pytest.raises(PermissionError):
        bad.cat_file(url)
    with pytest.raises(PermissionError):
        bad.pipe_file(f"{s3_bucket}/intruder.txt", b"x")
    with pytest.raises(PermissionError):
        bad.ls(s3_bucket)
    assert not s3_server.filesystem().exists(f"{s3_bucket}/intruder.txt")


def test_server_stops_without_leftovers(s3_server: S3Server, tmp_path) -> None:
    """A second server (the session's holds the default ports, so it moves to free ones) stops completely."""
    with run_s3_server(tmp_path / "second") as second:
        assert second.endpoint_url != s3_server.endpoint_url
        assert second.access_key != s3_server.access_key
        bucket = second.make_bucket()
        second.filesystem().pipe_file(f"{bucket}/x", b"x")
        assert second.filesystem().cat_file(f"{bucket}/x") == b"x"
        # credentials are per server
        with pytest.raises(PermissionError):
            s3_server.filesystem(endpoint_url=second.endpoint_url).ls(bucket)
        proc = second.process
        assert proc is not None and proc.poll() is None
        if sys.platform.startswith("linux"):
            assert processes_running(str(second.data_dir)) == [proc.pid]
    assert proc.returncode is not None
    assert processes_running(str(second.data_dir)) == []
    assert wait_port_closed(second.port)
    # the session server is unaffected
    assert s3_server.filesystem().ls("", detail=False) is not None
