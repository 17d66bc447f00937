"""What every distributed job shares: the Ray Data pipeline (decode tasks -> actor pool), its CPU
and GPU split and retry bounds, output file names, and the job summary.
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.annotations import RayDeprecationWarning

from spade_ray.distributed.decode_stage import DecodeImages
from spade_ray.distributed.devices import cluster_gpus, count_devices
from spade_ray.distributed.input_blocks import InputBlocks
from spade_ray.distributed.runtime import cluster_cpus, node_cpus, ray_data_output
from spade_ray.progress import Progress, no_progress, shows_ray_data_bars
from spade_ray.storage.retry import find_storage_failure

__all__ = ["DECODE_CPUS", "TASK_RETRIES", "WRITE_CPUS", "ActorPlan", "JobSummary", "new_run_id", "plan_actors", "run_pipeline"]


@dataclass
class JobSummary:
    """Counts and throughput of one job run, and where its outputs are."""

    job: str
    ok: int = 0
    error: int = 0
    skipped: int = 0
    skipped_error: int = 0  # of ``skipped``: images whose row from an earlier run is an error row
    seconds: float = 0.0
    output: str = ""
    errors: list[tuple[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)  # when the job began (perf_counter)
    startup_seconds: float | None = None  # from the job's start to its first result
    steady_seconds_per_image: float | None = None  # between the first and the last result

    def stream_timing(self, first_at: float, first_images: int, last_at: float, total_images: int) -> None:
        """Start-up (until the first batch of results) and steady state (after it), from when results arrived.

        A nightly job's cost per image is its steady state; start-up (Ray, actors loading the bank
        and the backbone) is paid once per run, however many images follow.
        """
        self.startup_seconds = first_at - self.started
        if total_images > first_images and last_at > first_at:
            self.steady_seconds_per_image = (last_at - first_at) / (total_images - first_images)

    @property
    def images_per_second(self) -> float:
        return (self.ok + self.error) / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_rate(self) -> float:
        """Share of the job's inputs that ended as error rows, rows kept from earlier runs included.

        Counting the rows a rerun skipped keeps the rate of a crashed-and-resumed night the same
        as that of an undisturbed one.
        """
        total = self.ok + self.error + self.skipped
        return (self.error + self.skipped_error) / total if total else 0.0

    def line(self) -> str:
        flagged = f", {self.extra['anomalous']} anomalous" if "anomalous" in self.extra else ""
        devices = self.extra.get("devices") or {}
        on = f" on {', '.join(f'{kind} ({n})' for kind, n in sorted(devices.items()))}" if devices else ""
        retries = f", {self.extra['storage_retries']} storage retries" if self.extra.get("storage_retries") else ""
        return (f"{self.job}: {self.ok} ok, {self.error} error, {self.skipped} skipped{flagged} in {self.seconds:.1f}s "
                f"({self.images_per_second:.1f} images/s){on}{retries} -> {self.output}")

    def fields(self) -> dict[str, Any]:
        """The summary as flat JSON-ready fields, for structured logs."""
        timing = {k: round(v, 4) for k, v in (("startup_seconds", self.startup_seconds),
                                               ("steady_seconds_per_image", self.steady_seconds_per_image)) if v is not None}
        return {"stage": self.job, "ok": self.ok, "error": self.error, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "images_per_second": round(self.images_per_second, 3),
                "output": self.output, **timing, **self.extra}



@dataclass(frozen=True)
class ActorPlan:
    """The UDF actor pool: its size, the CPUs and GPUs each actor reserves, and the threads each runs."""

    pool: ray.data.ActorPoolStrategy
    cpus_per_actor: float
    threads: int
    gpus_per_actor: float = 0.0


def plan_actors(n_items: int, batch_size: int, max_actors: int | None, reserved_cpus: float = 0.0,
                concurrent_batches: int = 1, gpus_per_actor: float = 0.0, reserved_gpus: float = 0.0) -> ActorPlan:
    """Size the actor pool to the CPUs left after the shard actors, the writers and one decode slot,
    and, when the actors take GPUs, to the GPUs left after the shard actors' (if they took any).

    A pool that takes every CPU starves Ray Data's decode tasks and the job hangs.  Each actor
    reserves 1 CPU on a cluster (0.5 on a machine of fewer than 4), but runs
    ``cluster CPUs // actors`` threads (at most a node's CPUs): the shard actors' reservations are
    mostly idle while an actor runs its backbone (it waits on them, they on it), so an actor that
    used only its reservation would leave cores idle; on a cluster, where the pool fills the
    workers, this is 1 thread per actor as before.

    An actor with a GPU still reserves its CPU share and runs as many CPU threads (its map fusion
    and encoding stay on the CPU), but the pool never holds more actors than GPUs / ``gpus_per_actor``:
    one more would wait for a GPU for the whole run.
    """
    cpus = cluster_cpus()
    per_actor = 1.0 if cpus >= 4 else 0.5
    room = max(per_actor, cpus - reserved_cpus - DECODE_CPUS)
    wanted = max(1, min(max_actors or 10**6, int(room // per_actor), -(-n_items // batch_size)))
    if gpus_per_actor > 0:
        wanted = max(1, min(wanted, int((cluster_gpus() - reserved_gpus) // gpus_per_actor)))
    threads = max(1, min(node_cpus(), cpus // wanted))
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=wanted, max_concurrent_calls_per_actor=concurrent_batches,
                                      enable_true_multi_threading=concurrent_batches > 1)
    return ActorPlan(pool, per_actor, threads, gpus_per_actor)


DECODE_CPUS = 0.25
# The writers mostly wait on storage; a small reservation lets them run beside the scorers
# without taking their CPUs (encoding already happened in the scorers).
WRITE_CPUS = 0.05


def _writers() -> int:
    """Writer actors: a few per node's worth of CPUs, each with many requests in flight.

    Actors, started with the pipeline, rather than tasks: a task may need a new worker process
    (seconds to import the package) while the scorers race ahead; an actor keeps its process and
    its storage client's connections for the whole run.
    """
    return max(1, cluster_cpus() // 8)


# Fault tolerance of the pipeline: a UDF actor that dies (node lost, OOM-killed, preempted) is
# restarted as often as needed, since a pool lives for the whole night, and each batch it had in
# flight is retried on a live actor up to TASK_RETRIES times.  A batch that kills its worker every
# time fails the job after that many tries instead of looping forever; the images already
# committed stay, and the rerun resumes.  Decode tasks get the same number of retries.  Ray Data's
# own defaults are unbounded (-1) for both; they are passed explicitly so the bound is ours
# (see _map_batches for how, in Ray 2.60).
TASK_RETRIES = 3
# Ray's deprecation of every option passed through ``**ray_remote_args`` (ray/data/dataset.py,
# _warn_on_ray_remote_args); matched from the start of the message.
_REMOTE_ARGS_DEPRECATED = r"`ray_remote_args` is deprecated"


def _map_batches(ds: ray.data.Dataset, fn: Any, *, retries: dict[str, int], **options: Any) -> ray.data.Dataset:
    """``ds.map_batches(fn, **options)`` with our retry bounds, without Ray's deprecation warning.

    Ray 2.60 deprecates ``**ray_remote_args`` (removal in 2.64) in favour of named parameters, but
    names only label_selector, fallback_strategy, max_calls, resources, accelerator_type and
    runtime_env (ray-project/ray#65227, #65228): ``max_retries``, ``max_restarts`` and
    ``max_task_retries`` have no replacement, no DataContext setting bounds system-failure retries
    (``max_map_retries`` covers only exceptions raised by the UDF), and without them the bounds are
    Ray Data's unbounded defaults.  So the bounds are still passed this way and that one warning is
    silenced here, where it is raised; a user reading it could do nothing about it.  Should Ray
    name these parameters, the same call binds to them; should 2.64 drop them unnamed, the call
    fails loudly instead of silently retrying forever.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_REMOTE_ARGS_DEPRECATED, category=RayDeprecationWarning)
        return ds.map_batches(fn, **options, **retries)


_ACTOR_RETRIES = {"max_restarts": -1, "max_task_retries": TASK_RETRIES}


def run_pipeline(inputs: InputBlocks, decode: DecodeImages, udf: type, udf_kwargs: dict[str, Any],
                  batch_size: int, max_actors: int | None, summary: JobSummary, progress: Progress, desc: str,
                  reserved_cpus: float = 0.0, write: tuple[type, dict[str, Any]] | None = None,
                  concurrent_batches: int = 1, gpus_per_actor: float = 0.0, reserved_gpus: float = 0.0) -> None:
    """input tables -> decode (tasks) -> UDF (actor pool) [-> write (tasks)]; counts results as they stream back.

    ``inputs``: the rows (uri, relpath, image_id, key, and any column the UDF reads, e.g. ``target``,
    the bank a routed image goes to) as tables in the object store, read in blocks of about one
    batch so decode tasks run in parallel however large the tables are.  ``write`` (a class and its
    constructor arguments) stores what the UDF produced, in a small pool
    of I/O actors of its own, so the scorers' next batch overlaps the previous one's requests.  The
    last stage returns ``image_id``, ``status``, ``error`` and ``device`` (where the UDF ran; counted
    per device kind in ``summary.extra["devices"]``).  ``gpus_per_actor`` (> 0) gives each UDF actor
    that share of a GPU (``reserved_gpus`` are the shard actors').
    """
    # On a terminal Ray Data draws its own bars (one per operator); otherwise it stays silent and
    # so does the driver's bar.  Set before the dataset exists: a dataset keeps the context it was made with.
    ray_bars = shows_ray_data_bars(progress)
    ray_data_output(interactive=ray_bars)
    ds = inputs.dataset(batch_size, DECODE_CPUS)
    ds = _map_batches(ds, decode, batch_size=batch_size, num_cpus=DECODE_CPUS, retries={"max_retries": TASK_RETRIES})
    writer_cpus = WRITE_CPUS * _writers() if write is not None else 0.0
    plan = plan_actors(inputs.rows, batch_size, max_actors, reserved_cpus + writer_cpus, concurrent_batches, gpus_per_actor,
                       reserved_gpus)
    ds = _map_batches(ds, udf, fn_constructor_kwargs={**udf_kwargs, "threads": plan.threads}, batch_size=batch_size,
                      num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None, compute=plan.pool,
                      retries=_ACTOR_RETRIES)
    if write is not None:
        writer, writer_kwargs = write
        ds = _map_batches(ds, writer, fn_constructor_kwargs=writer_kwargs, batch_size=None, num_cpus=WRITE_CPUS,
                          compute=ray.data.ActorPoolStrategy(size=_writers()), retries=_ACTOR_RETRIES)
    bar = no_progress(inputs.rows, desc) if ray_bars else progress(inputs.rows, desc)
    first: tuple[float, int] | None = None
    done = 0
    summary.extra["gpus_per_actor"] = plan.gpus_per_actor
    devices = summary.extra.setdefault("devices", {})
    try:
        for batch in _results(ds):
            done += len(batch["image_id"])
            if "device" in batch:
                count_devices(batch["device"], devices)
            first = first or (time.perf_counter(), done)
            _count_batch(summary, batch)
            bar.update(len(batch["image_id"]))
    finally:
        bar.close()
    if first is not None:
        summary.stream_timing(first[0], first[1], time.perf_counter(), done)
    _warn_if_gpus_idle(summary, plan.gpus_per_actor, desc)


def _count_batch(summary: JobSummary, batch: dict[str, Any]) -> None:
    """A result batch's rows (ok or error, with the reason) and its storage retries, into the summary."""
    if "storage_retries" in batch:
        summary.extra["storage_retries"] = summary.extra.get("storage_retries", 0) + int(batch["storage_retries"].sum())
    for image_id, status, error in zip(batch["image_id"], batch["status"], batch["error"]):
        if status == "ok":
            summary.ok += 1
        else:
            summary.error += 1
            summary.errors.append((str(image_id), str(error)))


def _results(ds: ray.data.Dataset) -> Iterator[dict[str, Any]]:
    """The last stage's batches as they stream back; a storage failure in a worker is raised as itself.

    Ray raises a worker's exception inside its own wrappers, whose first line names the task; the
    operator needs the storage URL and what it said (:func:`~spade_ray.storage.retry.find_storage_failure`).
    """
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except Exception as exc:
        failure = find_storage_failure(exc)
        if failure is None:
            raise
        raise failure from None


def _warn_if_gpus_idle(summary: JobSummary, gpus_per_actor: float, desc: str) -> None:
    """Say on the driver, once per job, when actors were given GPUs and still ran on the CPU.

    Each such actor warns in its own log too, but those lines are easy to miss among a cluster's
    output; a night that paid for GPUs and used none should say so where its summary is read.
    """
    on_cpu = summary.extra.get("devices", {}).get("cpu", 0)
    if gpus_per_actor > 0 and on_cpu:
        logging.getLogger(__name__).warning(
            f"{desc}: {on_cpu} images ran on the CPU although each actor was given {gpus_per_actor:g} GPU: "
            "torch sees no CUDA device in the actors (a CPU-only torch, no driver, or a GPU resource "
            "without a device); the actors' warnings name the GPUs Ray assigned")


# ----------------------------------------------------------------------------- extract


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
