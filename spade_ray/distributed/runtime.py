"""Joining Ray: a local instance by default, a cluster with ``--address`` or ``RAY_ADDRESS``.

Workers do not inherit the driver's environment on a cluster, and variables set after
``ray.init()`` never reach them, so the variables that configure object storage and this
package are forwarded explicitly through the job's ``runtime_env``.

Credentials are never forwarded that way: Ray writes a job's ``runtime_env``, ``env_vars``
included, in clear text into ``runtime_env_agent.log`` on every node and shows it in the
dashboard.  Workers get credentials the way the driver did: a local Ray's workers inherit the
driver's environment (its processes are started from it), and cluster pods have their own (the
``spade-ray-s3`` Secret or the cloud identity, see ``infra/``) — or ``--storage-options``, which
travels inside the job's task arguments and is never logged.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from spade_ray.distributed import preemption

__all__ = ["FORWARDED_ENV_PREFIXES", "SECRET_ENV_MARKERS", "cluster_cpus", "forwarded_env", "init_ray",
           "node_cpus", "ray_data_output", "set_worker_threads"]

# AWS_* (s3fs/botocore: endpoint, region, profile), GOOGLE_* (gcsfs), SPADE_RAY_*, FSSPEC_*
FORWARDED_ENV_PREFIXES = ("AWS_", "GOOGLE_", "SPADE_RAY_", "FSSPEC_")
# ... except variables whose name says they hold (or point at) a credential
SECRET_ENV_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "ACCESS_KEY", "PRIVATE", "SESSION")


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a job forwards to its workers: storage settings, never credentials."""
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in environ.items()
            if k.startswith(FORWARDED_ENV_PREFIXES) and not any(m in k.upper() for m in SECRET_ENV_MARKERS)}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to (or start) Ray once per driver process, forwarding storage settings to workers."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {
        "runtime_env": {"env_vars": forwarded_env()},
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    if address is None:
        _start_local_ray({**kwargs, "include_dashboard": False, "num_cpus": num_cpus})
    else:
        ray.init(address=address, **kwargs)
    preemption.rearm()  # ray.init replaced the CLI's SIGTERM handler with its own sys.exit(15)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # on only for a run on a terminal (ray_data_output); bars spam logs


# A child of the CLI's ``spade_ray`` logger (apps/logs.py), which prints and formats its records.
_log = logging.getLogger(__name__)
# Ray's switch for authentication, and the logger that warns about it
# (ray/_private/authentication/authentication_token_setup.py).
AUTH_MODE_ENV = "RAY_AUTH_MODE"
_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


class _DropTokenAuthEnabled(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


_TOKEN_AUTH_FILTER = _DropTokenAuthEnabled()


def _start_local_ray(kwargs: dict[str, Any]) -> None:
    """Start a local Ray with its default, token authentication, and say once in our words what that means.

    With ``RAY_AUTH_MODE`` unset, Ray 2.60 turns token auth on for a new local cluster and logs a
    WARNING about it ("Token authentication is enabled for this Ray cluster. Set
    RAY_AUTH_MODE=disabled to opt out ...") on every run, which a new user reads as a problem.
    Setting the variable ourselves is no way out: Ray reads it once, when ``ray`` is imported, so
    set later it would reach the Ray processes but not this driver, which then fails to connect.
    So Ray keeps choosing (auth stays on, the secure default), only that one message is dropped,
    and one INFO line replaces it when token auth is really on.  An explicit ``RAY_AUTH_MODE``
    is the user's choice; Ray says nothing then, and neither do we unless it is ``token``.
    """
    ray_auth_logger = logging.getLogger(_RAY_AUTH_LOGGER)
    ray_auth_logger.addFilter(_TOKEN_AUTH_FILTER)
    try:
        ray.init(address=None, **kwargs)
    finally:
        ray_auth_logger.removeFilter(_TOKEN_AUTH_FILTER)
    if os.environ.get(AUTH_MODE_ENV, "").lower() == "token":
        _log.info("local Ray: token authentication is on, so only processes holding this user's Ray token "
                  "(~/.ray/auth_token, created on first use) can run work on it; "
                  f"{AUTH_MODE_ENV}=disabled turns it off (docs/operations.md)")


class _DropProgressBarsDisabled(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Progress bars disabled" not in record.getMessage()


_QUIET_FILTER = _DropProgressBarsDisabled()


def ray_data_output(interactive: bool) -> None:
    """Ray Data's bars and INFO lines on a terminal; otherwise only its warnings.

    Off a terminal its "Starting execution ..." lines and its advice to turn bars on are noise in
    a job's log (the one-line summary says what happened); its warnings still come through.
    """
    ray.data.DataContext.get_current().enable_progress_bars = interactive
    logging.getLogger("ray.data").setLevel(logging.INFO if interactive else logging.WARNING)
    progress_logger = logging.getLogger("ray.data._internal.progress")
    if interactive:
        progress_logger.removeFilter(_QUIET_FILTER)
    else:
        progress_logger.addFilter(_QUIET_FILTER)


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def node_cpus() -> int:
    """CPUs of the largest live node: more threads than that would only oversubscribe an actor's node."""
    sizes = [node.get("Resources", {}).get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    return max(1, int(max(sizes, default=1)))


def set_worker_threads(default: int = 1, threads: int | None = None) -> int:
    """Match torch/FAISS threads to the CPUs Ray gave this worker (Ray sets OMP_NUM_THREADS=1),
    or to ``threads`` when the job planned more for it (see ``pipeline.plan_actors``)."""
    import faiss
    import torch

    if threads is None:
        try:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", default)
        except Exception:  # outside a worker
            cpus = default
        threads = int(round(cpus)) or default
    threads = max(1, threads)
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    return threads
