"""Serving a bank on Ray: one actor per shard (:class:`~spade_ray.bank.shard_server.ShardServer` in an actor).

Jobs start the actors once, score through :class:`~spade_ray.distributed.remote_bank.RemoteBank`,
and shut them down in one ``finally``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray

from spade_ray.bank.manifest import BankManifest, ShardEntry
from spade_ray.bank.shard_server import ShardServer
from spade_ray.bank.store import open_bank
from spade_ray.distributed.devices import actor_device
from spade_ray.distributed.runtime import cluster_cpus, set_worker_threads

__all__ = ["BankLoadError", "ServedBank", "creation_error_reason", "serve_bank", "start_shard_actors"]


@ray.remote(max_restarts=3, max_task_retries=3)
class ShardActor(ShardServer):
    """A bank shard in a Ray actor; restarts reload and re-verify the shard from storage.

    Its correspondence runs on the CPU unless the job gave it a GPU (``--shard-gpus``).
    """

    def __init__(self, bank_root: str, entry: ShardEntry, offset: int, storage_options: dict[str, Any] | None = None,
                 aggregate: int | None = None) -> None:
        threads = set_worker_threads()
        super().__init__(bank_root, entry, offset, storage_options, verify=True, threads=threads, aggregate=aggregate,
                         device=actor_device("shard"))

    def ping(self) -> bool:
        return True


@dataclass
class ServedBank:
    """Handles of a bank's shard actors plus what a scorer needs to know about the bank."""

    bank_root: str
    manifest: BankManifest
    actors: list[Any]
    offsets: list[int]
    sizes: list[int]
    gpus_per_shard: float = 0.0

    @property
    def gpus(self) -> float:
        """GPUs the shard actors reserve together (the scorers get what is left)."""
        return self.gpus_per_shard * len(self.actors)

    @property
    def bank_id(self) -> str:
        return self.manifest.bank_id

    @property
    def n_images(self) -> int:
        return int(sum(self.sizes))

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def shard_actor_cpus(n_shards: int) -> float:
    """CPUs reserved per shard actor: one each on a cluster, a fair part of half the CPUs on a small machine.

    Asking a whole CPU per shard on a 2-CPU machine would leave a third shard unschedulable and the
    job waiting forever.
    """
    return float(min(1.0, max(0.05, cluster_cpus() / (2 * max(n_shards, 1)))))


def start_shard_actors(bank_root: str, manifest: BankManifest, storage_options: dict[str, Any] | None = None,
                       num_cpus: float | None = None, aggregate: int | None = None,
                       num_gpus: float = 0.0) -> ServedBank:
    """One shard actor per manifest entry; returns once every shard is loaded and verified.

    ``aggregate``: the feature space the job will query (the actors prepare it while loading, and
    keep only that copy of their pyramids).  ``num_gpus``: each actor's share of a GPU, on which it
    matches (none by default: the bank stays in host memory, and every query copies its gallery to the GPU).
    """
    if num_cpus is None:
        num_cpus = shard_actor_cpus(len(manifest.shards))
    actors, offsets, sizes, offset = [], [], [], 0
    for entry in manifest.shards:
        actors.append(ShardActor.options(num_cpus=num_cpus, num_gpus=num_gpus)
                      .remote(bank_root, entry, offset, storage_options, aggregate))
        offsets.append(offset)
        sizes.append(entry.n_images)
        offset += entry.n_images
    try:
        ray.get([a.ping.remote() for a in actors])  # surfaces load/verification errors now
    except ray.exceptions.RayActorError as exc:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        raise BankLoadError(f"a bank shard could not be served: {creation_error_reason(exc)}") from None
    return ServedBank(bank_root, manifest, actors, offsets, sizes, num_gpus)


class BankLoadError(RuntimeError):
    """A shard actor could not load its shard (missing or changed file, unreadable storage)."""


def creation_error_reason(exc: BaseException) -> str:
    """The original error of an actor whose constructor raised, without Ray's wrapping and traceback.

    Ray reports such an actor as dead with a message that starts with where it ran and ends with
    the constructor's own ``Type: message`` line; an operator needs only that last line.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def serve_bank(bank_url: str, storage_options: dict[str, Any] | None = None, num_cpus: float | None = None,
               aggregate: int | None = None) -> ServedBank:
    """Serve the bank's latest complete version (or the version folder given)."""
    bank_root, manifest = open_bank(bank_url, storage_options)
    return start_shard_actors(bank_root, manifest, storage_options, num_cpus, aggregate)
