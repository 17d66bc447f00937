"""The storage retry policy on its own, against the real SeaweedFS server through the fault proxy.

What a read or write does when the store blips, stays away, throttles, or refuses for good: the
behaviour the jobs build on (tests/test_storage_faults.py runs them through it).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from spade_ray.distributed.write_stage import WriteResults
from spade_ray.storage.retry import (
    OutputWriteError,
    StorageRetry,
    StorageUnavailableError,
    client_options,
    retries_so_far,
)
from spade_ray.storage.urls import read_bytes, write_bytes
from spade_ray.testing.s3server import S3Server
from spade_ray.testing.tcpproxy import FaultProxy

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def policy(monkeypatch: pytest.MonkeyPatch):
    """Set a test's policy for this process only (the variables are restored after it)."""
    def use(retry: StorageRetry) -> None:  # what use_retry does, undone after the test
        for name, value in retry.env().items():
            monkeypatch.setenv(name, value)
    return use


def proxied(server: S3Server, proxy: FaultProxy) -> dict:
    return {**server.storage_options, "endpoint_url": proxy.endpoint_url}


def test_a_short_outage_is_ridden_out_and_counted(s3_server, s3_bucket, fault_proxy, policy) -> None:
    policy(StorageRetry(retries=10, seconds=30))
    options = proxied(s3_server, fault_proxy)
    write_bytes(f"{s3_bucket}/a", b"payload", options)
    before = retries_so_far()
    fault_proxy.outage(1.5)
    t0 = time.monotonic()
    assert read_bytes(f"{s3_bucket}/a", options) == b"payload"
    assert time.monotonic() - t0 >= 1.0  # it waited for the store to come back
    assert retries_so_far() > before


def test_a_long_outage_raises_naming_the_url_within_the_budget(s3_server, s3_bucket, fault_proxy, policy) -> None:
    policy(StorageRetry(retries=20, seconds=2))
    options = proxied(s3_server, fault_proxy)
    fault_proxy.set_down(True)
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=rf"storage unavailable: {s3_bucket}/b: .*--storage-retry-seconds 2"):
        write_bytes(f"{s3_bucket}/b", b"x", options)
    assert time.monotonic() - t0 < 5  # the seconds bound it, not the 20 retries
    fault_proxy.set_down(False)
    assert not s3_server.filesystem().exists(f"{s3_bucket}/b")  # nothing half-written is visible


def test_throttling_is_retried_and_every_request_succeeds(s3_server, s3_bucket, fault_proxy, policy) -> None:
    policy(StorageRetry(retries=10, seconds=30))
    options = proxied(s3_server, fault_proxy)
    before = retries_so_far()
    fault_proxy.throttle(0.5)
    for i in range(6):
        write_bytes(f"{s3_bucket}/t{i}", bytes([i]), options)
        assert read_bytes(f"{s3_bucket}/t{i}", options) == bytes([i])
    assert fault_proxy.counts().throttled == retries_so_far() - before > 0  # one retry per 503, no hidden layer


def test_a_missing_object_or_a_refused_write_is_raised_at_once(s3_server, s3_bucket, fault_proxy, policy) -> None:
    policy(StorageRetry(retries=10, seconds=60))
    options = proxied(s3_server, fault_proxy)
    before = retries_so_far()
    with pytest.raises(FileNotFoundError):
        read_bytes(f"{s3_bucket}/missing", options)
    with pytest.raises(PermissionError):
        write_bytes(f"{s3_bucket}/denied", b"x", {**options, "secret": "wrong-secret"})
    assert retries_so_far() == before


def test_a_denied_output_write_fails_the_batch_naming_the_output(s3_server, s3_bucket) -> None:
    output = f"{s3_bucket}/out"
    writer = WriteResults(output, "run", {**s3_server.storage_options, "secret": "wrong-secret"})
    row = '{"image_id": "i0", "status": "ok", "error": null}'
    batch = {"image_id": np.array(["i0"], dtype=object), "row": np.array([row], dtype=object),
             "file_urls": np.array([[f"{output}/masks/i0.png"]], dtype=object),
             "file_bytes": np.array([[b"png"]], dtype=object)}
    with pytest.raises(OutputWriteError, match=rf"cannot write the output {output}: PermissionError"):
        writer(batch)
    assert not s3_server.filesystem().exists(f"{s3_bucket}/out")


def test_s3_clients_make_one_attempt_and_the_user_can_still_choose() -> None:
    assert client_options("s3", {})["config_kwargs"]["retries"] == {"total_max_attempts": 1}
    mine = {"config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 3}}}
    assert client_options("s3", mine)["config_kwargs"]["retries"]["total_max_attempts"] == 3
    assert client_options("gs", {"token": "anon"}) == {"token": "anon"}


def test_the_policy_from_the_environment_and_bad_values() -> None:
    assert StorageRetry.from_env({}) == StorageRetry()
    assert StorageRetry.from_env(StorageRetry(retries=3, seconds=7.5).env()) == StorageRetry(retries=3, seconds=7.5)
    with pytest.raises(ValueError, match="SPADE_RAY_STORAGE_RETRIES='many'"):
        StorageRetry.from_env({"SPADE_RAY_STORAGE_RETRIES": "many"})
