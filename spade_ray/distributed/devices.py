"""GPUs on Ray: how many a job's actors ask for, and which device an actor then runs on.

Ray places an actor on a GPU only when it asks for one (``num_gpus``); it then sets
``CUDA_VISIBLE_DEVICES`` in the actor's process to the GPUs it was given, so torch's ``cuda:0`` is
the actor's first assigned GPU.  An actor that asked for none runs on the CPU even where torch
could see a GPU: Ray 2.60 leaves ``CUDA_VISIBLE_DEVICES`` alone for such actors, and a GPU used
without asking would be shared, unscheduled, by every actor of the node.

The decision lives in :func:`actor_device` alone, so the extractor, scorer and shard actors can
never disagree about it.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable

import ray

__all__ = ["AUTO", "actor_device", "cluster_gpus", "count_devices", "device_kind", "gpus_per_actor", "shard_gpus"]

AUTO = None  # the automatic setting of ``gpus_per_actor``: a GPU per actor when the cluster has GPUs

log = logging.getLogger(__name__)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def gpus_per_actor(requested: float | None, reserved: float = 0.0) -> float:
    """GPUs each extractor/scorer actor asks for: ``requested``, or automatically 1 when the cluster
    has a GPU left after ``reserved`` (the shard actors').

    A request the cluster can never meet is refused here, in one line, rather than leaving the
    actor pool waiting forever for a GPU that does not exist.
    """
    free = cluster_gpus() - reserved
    if requested is None:
        return 1.0 if free >= 1.0 else 0.0
    if requested < 0:
        raise ValueError(f"--gpus-per-actor must be >= 0; got {requested:g}")
    if requested > 0 and free < requested:
        raise ValueError(f"--gpus-per-actor {requested:g}, but the Ray cluster has {free:g} GPUs for the actors; "
                         "use --gpus-per-actor 0 to run on CPUs")
    return float(requested)


def shard_gpus(requested: float, n_shards: int) -> float:
    """GPUs each shard actor asks for (``--shard-gpus``): checked like :func:`gpus_per_actor`, never automatic."""
    if requested < 0:
        raise ValueError(f"--shard-gpus must be >= 0; got {requested:g}")
    if requested > 0 and cluster_gpus() < requested * n_shards:
        raise ValueError(f"--shard-gpus {requested:g} for {n_shards} shards needs {requested * n_shards:g} GPUs; "
                         f"the Ray cluster has {cluster_gpus():g}")
    return float(requested)


def actor_device(role: str) -> str:
    """The torch device of this actor: ``cuda:0`` when Ray assigned it a GPU that torch can use, else ``cpu``.

    An actor given a GPU whose torch sees no CUDA (a CPU-only torch wheel on a GPU node, a
    missing driver, or a logical ``GPU`` resource with no device behind it) says so once, with
    what Ray assigned, and runs on the CPU: slower, but the same scores.
    """
    try:
        ids = ray.get_gpu_ids()
    except Exception:  # outside a Ray worker: nothing was assigned
        ids = []
    if not ids:
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda:0"  # Ray's CUDA_VISIBLE_DEVICES makes the first assigned GPU torch's device 0
    try:
        actor = ray.get_runtime_context().get_actor_id()
    except Exception:
        actor = None
    log.warning(f"spade-ray {role} actor {actor} (pid {os.getpid()}) was assigned GPU {ids} "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}) but torch "
                f"{torch.__version__} sees no CUDA device: running on the CPU")
    return "cpu"


def device_kind(device: str) -> str:
    """``cuda`` or ``cpu``: what a job summary counts (``cuda:0`` names a different GPU in every actor)."""
    return device.split(":", 1)[0]


def count_devices(devices: Iterable[str], counts: dict[str, int]) -> None:
    """Add images per device kind to ``counts`` (the job summary's ``devices``)."""
    for kind, n in Counter(device_kind(str(d)) for d in devices).items():
        counts[kind] = counts.get(kind, 0) + n
