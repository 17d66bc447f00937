"""FaultProxy in front of the real SeaweedFS server, driven by real s3fs: what each fault looks like to a client.

These tests double as the record of what s3fs/aiobotocore do on their own (versions in the report):

* ``cat_file`` with the default ``max_concurrency`` (10) sends HEAD (for the size) then GET; with
  ``max_concurrency=1`` only the GET.  ``pipe_file`` of a small object is one PUT.
* botocore's default retry mode is ``legacy``, 5 attempts in all; ``config_kwargs={"retries":
  {"total_max_attempts": 1}}`` turns it off.  On top of it s3fs retries 5 times (``S3FileSystem.retries``,
  a class attribute, not a constructor argument) on ``SlowDown`` and on connection/short-read errors, but not
  on a connection refused/reset at connect (EndpointConnectionError) and not on a HEAD answered 503 (no body,
  so no "SlowDown" in the message).
"""

from __future__ import annotations

import errno
import http.client
import os
import statistics
import time

import botocore.config
import botocore.exceptions
import botocore.session
import pytest
import s3fs

from spade_ray.testing.s3server import S3Server
from spade_ray.testing.tcpproxy import FaultProxy

#: botocore makes one attempt per call: what the proxy does is what the caller sees (s3fs may still retry)
ONE_ATTEMPT = {"config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}


def through(proxy: FaultProxy, server: S3Server, **options) -> s3fs.S3FileSystem:
    """A fresh s3fs client that reaches the server through the proxy."""
    return s3fs.S3FileSystem(skip_instance_cache=True, **{**server.storage_options, "endpoint_url": proxy.endpoint_url,
                                                          **options})


def botocore_client(endpoint_url: str, server: S3Server, retries: dict):
    return botocore.session.Session().create_client(
        "s3", endpoint_url=endpoint_url, region_name=server.region, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, config=botocore.config.Config(retries=retries),
    )


def median_seconds(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_latency_is_added_to_every_chunk_each_way(s3_server: S3Server, s3_bucket: str, fault_proxy: FaultProxy) -> None:
    url = f"{s3_bucket}/small"
    s3_server.filesystem().pipe_file(url, b"x" * 1000)
    direct = s3_server.filesystem(max_concurrency=1)
    proxied = through(fault_proxy, s3_server, max_concurrency=1)
    for fs in (direct, proxied):  # connections open and pooled before timing
        fs.cat_file(url)
    fault_proxy.latency_ms = 20
    extra = median_seconds(lambda: proxied.cat_file(url)) - median_seconds(lambda: direct.cat_file(url))
    # one GET: the request (one chunk) waits 20 ms, the response (one chunk) waits 20 ms
    assert 0.040 <= extra < 1.0, extra


def test_counts_requests_by_kind_and_path_on_one_keep_alive_connection(s3_server: S3Server, s3_bucket: str,
                                                                        fault_proxy: FaultProxy) -> None:
    fs = through(fault_proxy, s3_server)
    bucket = s3_bucket.removeprefix("s3://")
    payloads = {f"{bucket}/obj{i}": os.urandom(1000 + i) for i in range(3)}
    for path, data in payloads.items():
        fs.pipe_file(path, data)
    for path in list(payloads)[:2]:
        assert fs.cat_file(path) == payloads[path]
    counts = fault_proxy.counts()
    # cat_file asks the size first (HEAD) to decide whether to read in parallel ranges, then GETs
    assert counts.by_kind == {"PUT": 3, "HEAD": 2, "GET": 2}
    assert counts.by_path[f"/{bucket}/obj0"] == {"PUT": 1, "HEAD": 1, "GET": 1}
    assert counts.by_path[f"/{bucket}/obj2"] == {"PUT": 1}
    assert counts.connections == 1  # seven requests, one after another, on one pooled connection

    fault_proxy.reset_counts()
    fs.ls(s3_bucket)
    through(fault_proxy, s3_server, max_concurrency=1).cat_file(f"{bucket}/obj0")
    assert fault_proxy.counts().by_kind == {"LIST": 1, "GET": 1}
    assert fault_proxy.counts().by_path == {f"/{bucket}": {"LIST": 1}, f"/{bucket}/obj0": {"GET": 1}}


def test_counts_a_chunked_request_and_the_next_one_on_the_same_connection(s3_server: S3Server, s3_bucket: str,
                                                                         fault_proxy: FaultProxy) -> None:
    # botocore sends Content-Length; other clients stream with Transfer-Encoding: chunked
    bucket = s3_bucket.removeprefix("s3://")
    connection = http.client.HTTPConnection("127.0.0.1", fault_proxy.port, timeout=10)
    connection.request("PUT", f"/{bucket}/chunked", body=iter([b"a" * 70_000, b"b" * 10, b"c"]), encode_chunked=True)
    assert connection.getresponse().read() is not None  # unsigned: the server refuses it, and says so
    connection.request("HEAD", f"/{bucket}/chunked")
    connection.getresponse().read()
    connection.close()
    assert fault_proxy.counts().by_kind == {"PUT": 1, "HEAD": 1}


def test_an_outage_fails_requests_and_the_store_comes_back(s3_server: S3Server, s3_bucket: str,
                                                           fault_proxy: FaultProxy) -> None:
    url = f"{s3_bucket}/during-outage"
    s3_server.filesystem().pipe_file(url, b"still here")
    fs = through(fault_proxy, s3_server, max_concurrency=1, **ONE_ATTEMPT)
    assert fs.cat_file(url) == b"still here"
    fault_proxy.outage(1.0)
    assert fault_proxy.is_down
    t0 = time.monotonic()
    # the pooled connection is reset and a new one is reset on arrival; s3fs does not retry a failed connect
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        fs.cat_file(url)
    assert time.monotonic() - t0 < 1.0
    assert fault_proxy.counts().reset >= 1
    while fault_proxy.is_down:
        time.sleep(0.05)
    assert fs.cat_file(url) == b"still here"


def test_throttled_requests_get_s3s_503_slowdown(s3_server: S3Server, s3_bucket: str, fault_proxy: FaultProxy) -> None:
    bucket = s3_bucket.removeprefix("s3://")
    s3_server.filesystem().pipe_file(f"{bucket}/hot", b"hot object")
    fault_proxy.throttle(1.0)

    # botocore sees S3's error: code SlowDown, status 503
    once = botocore_client(fault_proxy.endpoint_url, s3_server, {"total_max_attempts": 1})
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        once.get_object(Bucket=bucket, Key="hot")
    assert caught.value.response["Error"]["Code"] == "SlowDown"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503

    # s3fs retries a SlowDown itself, 5 times (backoff 0.1 s * 1.7**i), then raises OSError(EBUSY)
    fault_proxy.reset_counts()
    fs = through(fault_proxy, s3_server, max_concurrency=1, **ONE_ATTEMPT)
    with pytest.raises(OSError) as caught:
        fs.cat_file(f"{bucket}/hot")
    assert caught.value.errno == errno.EBUSY and "reduce your request rate" in str(caught.value)
    assert fault_proxy.counts().by_kind == {"GET": 5} and fault_proxy.counts().throttled == 5

    # ...but not a HEAD: a 503 to a HEAD has no body, so no "SlowDown" in the error for s3fs to match
    fault_proxy.reset_counts()
    with pytest.raises(OSError):
        fs.info(f"{bucket}/hot")
    assert fault_proxy.counts().by_kind == {"HEAD": 1}

    # botocore's own retries (standard mode: 3 attempts) get through when only every second request is throttled
    fault_proxy.throttle(0.5)
    fault_proxy.reset_counts()
    retrying = botocore_client(fault_proxy.endpoint_url, s3_server, {"mode": "standard"})
    response = retrying.get_object(Bucket=bucket, Key="hot")
    assert response["Body"].read() == b"hot object"
    assert response["ResponseMetadata"]["RetryAttempts"] == 1
    assert fault_proxy.counts().by_kind == {"GET": 2} and fault_proxy.counts().throttled == 1


def test_a_response_cut_mid_stream_is_an_error_or_a_retried_success_never_wrong_bytes(
    s3_server: S3Server, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    url = f"{s3_bucket}/big"
    payload = os.urandom(2**20)
    s3_server.filesystem().pipe_file(url, payload)

    # no retries anywhere: the short read surfaces
    no_retries = through(fault_proxy, s3_server, max_concurrency=1, **ONE_ATTEMPT)
    no_retries.retries = 1
    fault_proxy.drop_next(1)
    with pytest.raises(Exception, match="not completed|Not enough data"):
        no_retries.cat_file(url)
    assert fault_proxy.counts().dropped == 1

    # s3fs's own retry reads it again, whole
    fault_proxy.reset_counts()
    fs = through(fault_proxy, s3_server, max_concurrency=1)
    fault_proxy.drop_next(1)
    assert fs.cat_file(url) == payload
    assert fault_proxy.counts().by_kind == {"GET": 2} and fault_proxy.counts().dropped == 1

    # cut uploads too: the PUT's response is lost, the retried PUT stores the same bytes
    fault_proxy.drop_next(1)
    fs.pipe_file(f"{s3_bucket}/uploaded", payload)
    assert s3_server.filesystem().cat_file(f"{s3_bucket}/uploaded") == payload

    # random cuts: every read is the object or an error
    fault_proxy.drop_probability = 0.5
    outcomes = []
    for _ in range(6):
        try:
            outcomes.append(no_retries.cat_file(url) == payload)
        except Exception:
            outcomes.append("error")
    assert set(outcomes) <= {True, "error"} and True in outcomes and "error" in outcomes, outcomes


def test_only_loopback_upstreams_and_a_clean_close(s3_server: S3Server) -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("http://10.1.2.3:8333")
    proxy = FaultProxy(s3_server.endpoint_url).start()
    assert proxy.endpoint_url.startswith("http://127.0.0.1:")
    assert through(proxy, s3_server).ls("", detail=False) is not None
    thread = proxy._thread
    proxy.close()
    assert thread is not None and not thread.is_alive()
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=2).request("GET", "/")
