"""The KubeRay jobs leave the driver time for its bounded stop on SIGTERM.

Deleting a RayJob (or its RayCronJob's run) makes KubeRay stop the Ray job: Ray's job supervisor
sends the driver SIGTERM and SIGKILLs it ``RAY_JOB_STOP_WAIT_TIME_S`` later (Ray's default: 3 s);
the head pod, where the driver runs, is then deleted and killed after its
``terminationGracePeriodSeconds``.  Both must exceed the driver's documented stop bound
(:data:`spade_ray.distributed.preemption.STOP_SECONDS`), or a stop is cut short into a SIGKILL.
"""

from __future__ import annotations

import inspect

import pytest
from test_infra import RENDERINGS, cluster_specs, job_specs, rendering

from spade_ray.distributed.preemption import STOP_SECONDS

STOP_WAIT = "RAY_JOB_STOP_WAIT_TIME_S"


def test_rays_job_supervisor_still_reads_the_stop_wait_variable() -> None:
    """If Ray renamed it, the manifests' setting would silently fall back to Ray's 3 s."""
    from ray.dashboard.modules.job import job_supervisor

    assert STOP_WAIT in inspect.getsource(job_supervisor.JobSupervisor)


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_job_head_waits_longer_than_the_driver_takes_to_stop(name: str) -> None:
    heads = 0
    for doc in rendering(name):
        if not job_specs(doc):  # interactive clusters: a person's driver, not a scheduled job
            continue
        for spec in cluster_specs(doc):
            pod = spec["headGroupSpec"]["template"]["spec"]
            head = pod["containers"][0]
            env = {e["name"]: e.get("value") for e in head.get("env", [])}
            where = f"{name}: {doc['kind']} {doc['metadata']['name']}"
            assert STOP_WAIT in env, f"{where}: the head has no {STOP_WAIT}; Ray would SIGKILL the driver after 3 s"
            wait = float(env[STOP_WAIT])
            grace = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
            assert wait > STOP_SECONDS, f"{where}: {STOP_WAIT}={wait:g} <= the driver's stop bound {STOP_SECONDS:g} s"
            assert grace >= wait, f"{where}: the pod is killed ({grace} s) before Ray's stop wait ({wait:g} s) ends"
            heads += 1
    assert heads, f"{name}: no RayJob or RayCronJob head found"
