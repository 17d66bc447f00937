"""The three distributed jobs: extract features, build a sharded bank, score images.

Each job runs on a local Ray by default and on any cluster when ``address``/``RAY_ADDRESS`` is
set; all data moves through URLs (local paths, s3://, gs://) or Ray's object store, never through
a filesystem shared between nodes.  Each returns a :class:`JobSummary` and prints nothing itself;
the CLI and the ``jobs/`` entrypoints decide what to show.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from spade_ray.bank.store import (
    check_compatible,
    feature_meta_of,
    load_shard,
    make_manifest,
    next_version_name,
    open_bank,
    shard_for,
    version_name,
    write_manifest,
    write_shard,
)
from spade_ray.method.backbones import BACKBONES
from spade_ray.storage.featurestore import FeatureMeta, list_feature_shards, read_feature_meta
from spade_ray.method.features import FeatureBatch
from spade_ray.method.fusion import DEFAULT_SIGMA
from spade_ray.model import (DEFAULT_IMAGE_K, DEFAULT_KAPPA, DEFAULT_PIXEL_K, LEGACY_SCORING, Calibration, SpadeConfig,
                     calibration_rows)
from spade_ray.storage.images import DEFAULT_MAX_PIXELS
from spade_ray.storage.outputs import join_url, output_stem, unique_output_stems, write_bytes
from spade_ray.method.preprocess import Preprocessor
from spade_ray.progress import Progress, no_progress, shows_ray_data_bars
from spade_ray.report.report import DEFAULT_REPORT_TOP, score_report, write_report
from spade_ray.storage.sources import InputImage, resolve_inputs
from spade_ray.distributed.runtime import cluster_cpus, init_ray, ray_data_output
from spade_ray.distributed.serving import BankClient, ServedBank, shard_actor_cpus, start_shard_actors
from spade_ray.distributed.stages import DecodeImages, ExtractFeatures, ScoreImages, new_run_id

__all__ = ["JobSummary", "run_build_bank", "run_extract", "run_score"]

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
        return (f"{self.job}: {self.ok} ok, {self.error} error, {self.skipped} skipped{flagged} in {self.seconds:.1f}s "
                f"({self.images_per_second:.1f} images/s) -> {self.output}")

    def fields(self) -> dict[str, Any]:
        """The summary as flat JSON-ready fields, for structured logs."""
        return {"stage": self.job, "ok": self.ok, "error": self.error, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "images_per_second": round(self.images_per_second, 3),
                "output": self.output, **self.extra}


def _actor_pool(n_items: int, batch_size: int, max_actors: int | None, reserved_cpus: float = 0.0) -> tuple[ray.data.ActorPoolStrategy, float]:
    """The UDF actor pool and the CPUs per actor, leaving room for the decode tasks.

    A pool that takes every CPU starves Ray Data's read/decode tasks and the job hangs, so the
    pool is bounded by the CPUs left after the shard actors and one decode slot.
    """
    cpus = cluster_cpus()
    per_actor = 1.0 if cpus >= 4 else 0.5
    room = max(per_actor, cpus - reserved_cpus - DECODE_CPUS)
    wanted = max(1, min(max_actors or 10**6, int(room // per_actor), -(-n_items // batch_size)))
    return ray.data.ActorPoolStrategy(min_size=1, max_size=wanted), per_actor


DECODE_CPUS = 0.25


# Fault tolerance of the pipeline (Ray Data's ray_remote_args): a UDF actor that dies (node lost,
# OOM-killed, preempted) is restarted as often as needed, since a pool lives for the whole night,
# and each batch it had in flight is retried on a live actor up to TASK_RETRIES times.  A batch
# that kills its worker every time fails the job after that many tries instead of looping
# forever; the images already committed stay, and the rerun resumes.  Decode tasks get the same
# number of retries.  Ray Data's own defaults are unbounded (-1) for both; they are passed
# explicitly so the bound is ours.  (Ray 2.60 marks passing them through ``ray_remote_args`` as
# deprecated for 2.64 without a named replacement yet; revisit on upgrade.)
TASK_RETRIES = 3


def _run_pipeline(items: list[InputImage], decode: DecodeImages, udf: type, udf_kwargs: dict[str, Any],
                  batch_size: int, max_actors: int | None, summary: JobSummary, progress: Progress, desc: str,
                  reserved_cpus: float = 0.0, keys: dict[str, str] | None = None) -> None:
    """from_items -> decode (tasks) -> UDF (actor pool); counts results as they stream back.

    ``keys`` maps image ids to their output key stems (default: :func:`output_stem` of the relpath).
    """
    # On a terminal Ray Data draws its own bars (one per operator); otherwise it stays silent and
    # so does the driver's bar.  Set before the dataset exists: a dataset keeps the context it was made with.
    ray_bars = shows_ray_data_bars(progress)
    ray_data_output(interactive=ray_bars)
    keys = keys or {}
    ds = ray.data.from_items([{"uri": it.uri, "relpath": it.relpath, "image_id": it.image_id,
                               "key": keys.get(it.image_id) or output_stem(it.relpath)} for it in items],
                             override_num_blocks=max(1, -(-len(items) // batch_size)))
    ds = ds.map_batches(decode, batch_size=batch_size, num_cpus=DECODE_CPUS, max_retries=TASK_RETRIES)
    pool, per_actor = _actor_pool(len(items), batch_size, max_actors, reserved_cpus)
    ds = ds.map_batches(udf, fn_constructor_kwargs=udf_kwargs, batch_size=batch_size, num_cpus=per_actor, compute=pool,
                        max_restarts=-1, max_task_retries=TASK_RETRIES)
    bar = no_progress(len(items), desc) if ray_bars else progress(len(items), desc)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for image_id, status, error in zip(batch["image_id"], batch["status"], batch["error"]):
                if status == "ok":
                    summary.ok += 1
                else:
                    summary.error += 1
                    summary.errors.append((str(image_id), str(error)))
            bar.update(len(batch["image_id"]))
    finally:
        bar.close()


# ----------------------------------------------------------------------------- extract


def _read_rows(prefix: str, storage_options: dict[str, Any] | None, columns: list[str]) -> list[dict[str, Any]]:
    """The given columns of every Parquet file under ``prefix`` (none when it does not exist)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(prefix, **(storage_options or {}))
    if not fs.exists(path):
        return []
    rows: list[dict[str, Any]] = []
    for file in sorted(fs.find(path)):
        if file.endswith(".parquet") and "/." not in file:
            with fs.open(file, "rb") as fh:  # reads only the wanted column chunks, not the features
                parquet = pq.ParquetFile(fh)
                wanted = [c for c in columns if c in parquet.schema_arrow.names]
                rows.extend(parquet.read(columns=wanted).to_pylist())
    return rows


def run_extract(source: str, output: str, *, backbone: str = "lite0", weights: str | None = None, image_size: int = 224,
                protocol: str = "full", batch_size: int = 16, max_actors: int | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, storage_options: dict[str, Any] | None = None,
                address: str | None = None, progress: Progress = no_progress) -> JobSummary:
    """Images under ``source`` -> Parquet feature shards under ``output`` (one file per batch).

    Images that already have a row in ``output`` are skipped, so an interrupted extract resumes.
    Images above ``max_pixels`` are error rows (refused from the header, never decoded).
    """
    start = time.perf_counter()
    items = resolve_inputs(source, storage_options)
    done = {row["image_id"]: row.get("status") for row in _read_rows(output, storage_options, ["image_id", "status"])}
    todo = [it for it in items if it.image_id not in done]
    summary = JobSummary("extract", skipped=len(items) - len(todo), output=output,
                         skipped_error=sum(1 for it in items if done.get(it.image_id, "ok") != "ok"))
    if todo:
        init_ray(address)
        spec = BACKBONES[backbone]
        pre = Preprocessor(image_size, protocol, spec.mean, spec.std)  # type: ignore[arg-type]
        _run_pipeline(todo, DecodeImages(pre, storage_options, max_pixels), ExtractFeatures,
                      {"backbone": backbone, "weights": weights, "preprocessor": pre, "output": output,
                       "run_id": new_run_id(), "storage_options": storage_options},
                      batch_size, max_actors, summary, progress, "extract")
    summary.seconds = time.perf_counter() - start
    return summary


# ----------------------------------------------------------------------------- build-bank


@ray.remote
def _split_feature_file(url: str, keep_rows: list[int], n_shards: int, expected_meta: str,
                        storage_options: dict[str, Any] | None) -> tuple[Any, ...]:
    """Read one feature file and cut its kept rows into the bank shards they hash to."""
    from spade_ray.storage.featurestore import read_features, table_to_features

    table, meta = read_features([url], storage_options, only_ok=False)
    if meta.to_json() != expected_meta:
        raise ValueError(f"feature file {url} was extracted with other settings than the rest: {meta.to_json()}")
    table = table.take(keep_rows)
    ids, uris, features = table_to_features(table)
    assignment = np.array([shard_for(i, n_shards) for i in ids], dtype=np.int64)
    parts = []
    for s in range(n_shards):
        rows = np.flatnonzero(assignment == s)
        parts.append(([ids[r] for r in rows], [uris[r] for r in rows], features.select(rows)))
    return tuple(parts) if n_shards > 1 else parts[0]


@ray.remote
def _write_bank_shard(version_url: str, shard_index: int, storage_options: dict[str, Any] | None,
                      *parts: tuple[list[str], list[str], FeatureBatch]) -> dict[str, Any]:
    ids = [i for p in parts for i in p[0]]
    uris = [u for p in parts for u in p[1]]
    batches = [p[2] for p in parts if len(p[0])]
    if batches:
        features = FeatureBatch.concat(batches)
        global_, levels = features.global_, features.levels
    else:  # an empty shard (few images, many shards) is valid and answers nothing
        template = parts[0][2]
        global_ = template.global_[:0]
        levels = [level[:0] for level in template.levels]
    order = np.argsort(ids, kind="stable")  # deterministic row order whatever the file order
    return write_shard(version_url, shard_index, [ids[i] for i in order], [uris[i] for i in order],
                       global_[order], [level[order] for level in levels], storage_options)


def _select_rows(files: list[str], storage_options: dict[str, Any] | None, exclude: set[str]) -> tuple[dict[str, list[int]], int, int]:
    """Which rows of which file enter the bank: ok rows, first occurrence of each image id."""
    import fsspec

    seen = set(exclude)
    keep: dict[str, list[int]] = {}
    errors = duplicates = 0
    for url in files:
        with fsspec.open(url, "rb", **(storage_options or {})) as fh:
            table = pq.read_table(fh, columns=["image_id", "status"])
        rows = []
        for r, (image_id, status) in enumerate(zip(table.column("image_id").to_pylist(), table.column("status").to_pylist())):
            if status != "ok":
                errors += 1
            elif image_id in seen:
                duplicates += 1
            else:
                seen.add(image_id)
                rows.append(r)
        if rows:
            keep[url] = rows
    return keep, errors, duplicates


def _calibrate(bank: ServedBank, config: SpadeConfig, samples: int, target_fpr: float, batch_size: int,
               progress: Progress = no_progress) -> Calibration | None:
    """Leave-one-out scores of up to ``samples`` bank images (``calibration_rows`` of their URIs) -> thresholds."""
    n = bank.n_images
    if samples <= 0 or n < 2:
        return None
    candidates = ray.get([actor.calibration_candidates.remote(samples) for actor in bank.actors])
    uris = [uri for shard_uris, _ in candidates for uri in shard_uris]
    shard_rows = np.concatenate([rows for _, rows in candidates])
    rows = np.sort(shard_rows[calibration_rows(uris, samples)])
    bar = progress(len(rows), "calibrate (leave-one-out)")
    client = BankClient(bank, config)
    starts = np.asarray(bank.offsets)
    scores: list[float] = []
    maxima: list[float] = []
    for begin in range(0, len(rows), batch_size):
        batch_rows = rows[begin:begin + batch_size]
        owners = np.searchsorted(starts, batch_rows, side="right") - 1
        globals_, levels = [], []
        for s in np.unique(owners):
            g, lv = ray.get(bank.actors[s].features.remote(batch_rows[owners == s], config.aggregate))
            globals_.append(g)
            levels.append(lv)
        order = np.concatenate([np.flatnonzero(owners == s) for s in np.unique(owners)])
        query_rows = batch_rows[order]
        query = FeatureBatch(np.concatenate(globals_), [np.concatenate([lv[i] for lv in levels]) for i in range(len(levels[0]))])
        s, maps, _ = client.score(query, exclude=query_rows, aggregated=True)
        scores.extend(float(v) for v in s)
        maxima.extend(float(m.max()) for m in maps)
        bar.update(len(batch_rows))
    bar.close()
    return Calibration.from_scores(scores, maxima, target_fpr, config.image_scoring, config.calibration_settings())


def run_build_bank(features: str, output: str | None, *, shards: int = 1, add_to: str | None = None,
                   image_k: int = DEFAULT_IMAGE_K, pixel_k: int = DEFAULT_PIXEL_K, kappa: int = DEFAULT_KAPPA, sigma: float = DEFAULT_SIGMA,
                   scoring: dict[str, Any] | None = None, calibration_samples: int = 64, target_fpr: float = 0.01, batch_size: int = 16,
                   storage_options: dict[str, Any] | None = None, address: str | None = None,
                   progress: Progress = no_progress) -> JobSummary:
    """Parquet feature shards -> a new bank version (``output``, or a new version of ``add_to``).

    Images are assigned to shards by a hash of their id (stable across rebuilds); one Ray task
    per shard writes its FAISS index, ids and pyramids; normal-only calibration runs on the
    served shards; the manifest is written last.
    """
    start = time.perf_counter()
    if shards < 1:
        raise ValueError(f"--shards must be >= 1; got {shards}")
    files = list_feature_shards(features, storage_options)
    if not files:
        raise ValueError(f"no feature shards (*.parquet) found under {features!r}; run `spade-ray extract` first")
    meta = read_feature_meta(files[0], storage_options)
    parent_manifest: dict[str, Any] | None = None
    exclude: set[str] = set()
    if add_to:
        bank_root, parent_manifest = open_bank(add_to, storage_options)
        if feature_meta_of(parent_manifest) != meta:
            raise ValueError(f"features under {features} ({meta.backbone}, {meta.image_size}px, {meta.protocol}) do not match "
                             f"bank {add_to} ({parent_manifest['backbone']}, {parent_manifest['image_size']}px, {parent_manifest['protocol']})")
        for entry in parent_manifest["shards"]:
            exclude.update(load_shard(bank_root, entry, verify=False, storage_options=storage_options).ids)
    elif output:
        bank_root = output.rstrip("/")
    else:
        raise ValueError("build-bank needs --output BANK or --add-to BANK")
    keep, n_errors, n_duplicates = _select_rows(files, storage_options, exclude)
    n_new = sum(len(v) for v in keep.values())
    if n_new == 0 and not parent_manifest:
        raise ValueError(f"no usable normal images in {features!r} ({n_errors} error rows)")
    version = next_version_name(bank_root, storage_options)
    version_url = join_url(bank_root, version)
    summary = JobSummary("build-bank", ok=n_new, error=n_errors, skipped=n_duplicates + len(exclude), output=version_url)

    init_ray(address)
    first_index = len(parent_manifest["shards"]) if parent_manifest else 0
    new_entries: list[dict[str, Any]] = []
    if n_new:
        bar = progress(shards, "build-bank (shards)")
        parts = [_split_feature_file.options(num_returns=shards).remote(url, rows, shards, meta.to_json(), storage_options)
                 for url, rows in keep.items()]
        parts = [p if isinstance(p, list) else [p] for p in parts]
        pending = [_write_bank_shard.remote(version_url, first_index + s, storage_options, *[p[s] for p in parts])
                   for s in range(shards)]
        order = list(pending)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            bar.update(len(ready))
        bar.close()
        new_entries = ray.get(order)
    entries = (list(parent_manifest["shards"]) if parent_manifest else []) + new_entries
    config = SpadeConfig(meta.backbone, meta.image_size, meta.protocol, image_k, pixel_k, kappa, sigma).with_scoring(scoring or {})
    draft = make_manifest(version, meta, entries, parent=version_name(parent_manifest["version"]) if parent_manifest else None)
    served = start_shard_actors(bank_root, draft, storage_options, num_cpus=shard_actor_cpus(len(entries)),
                                aggregate=config.aggregate)
    try:
        calibration = _calibrate(served, config, calibration_samples, target_fpr, batch_size, progress)
    finally:
        served.shutdown()
    build = {"shards": shards, **config.scoring(), "calibration_samples": calibration_samples, "target_fpr": target_fpr, "features": features}
    manifest = make_manifest(version, meta, entries, build=build,
                             calibration=asdict(calibration) if calibration else None,
                             parent=version_name(parent_manifest["version"]) if parent_manifest else None)
    write_manifest(version_url, manifest, storage_options)  # last: the version is complete from now on
    bank_bytes = sum(served_bytes for served_bytes in _entry_bytes(meta, manifest))
    summary.extra.update(version=version, n_images=manifest["n_images"], shards=len(entries),
                         bytes_per_image=round(bank_bytes / max(manifest["n_images"], 1)),
                         image_threshold=calibration.image_threshold if calibration else None,
                         pixel_threshold=calibration.pixel_threshold if calibration else None)
    summary.seconds = time.perf_counter() - start
    return summary


def _entry_bytes(meta: FeatureMeta, manifest: dict[str, Any]) -> list[int]:
    """In-memory bytes per shard: float32 global vectors + float16 pyramids (what a shard actor holds)."""
    per_image = 4 * meta.global_dim + 2 * sum(c * h * w for c, h, w in meta.level_shapes)
    return [per_image * int(entry["n_images"]) for entry in manifest["shards"]]


# ----------------------------------------------------------------------------- score


def _remove_results(output: str, storage_options: dict[str, Any] | None) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(join_url(output, "results"), **(storage_options or {}))
    if fs.exists(path):
        for file in fs.find(path):
            if file.endswith(".parquet"):
                fs.rm_file(file)


def _drop_error_rows(output: str, storage_options: dict[str, Any] | None) -> int:
    """Rewrite each result file that holds error rows without them; returns how many rows went.

    Done before scoring so the images are simply "not done" again: a crash at any point leaves
    every image with one row or none (the next run scores it), never two.  Each file is
    replaced whole (atomic write), and a file left with no rows is removed.
    """
    import fsspec
    import pyarrow.compute as pc

    fs, path = fsspec.core.url_to_fs(join_url(output, "results"), **(storage_options or {}))
    if not fs.exists(path):
        return 0
    dropped = 0
    for file in sorted(fs.find(path)):
        if not file.endswith(".parquet") or "/." in file:
            continue
        with fs.open(file, "rb") as fh:
            table = pq.read_table(fh)
        kept = table.filter(pc.equal(table.column("status"), "ok"))
        if kept.num_rows == table.num_rows:
            continue
        if kept.num_rows:
            buf = io.BytesIO()
            pq.write_table(kept, buf)
            write_bytes(fs.unstrip_protocol(file), buf.getvalue(), storage_options)
        else:
            fs.rm_file(file)
        dropped += table.num_rows - kept.num_rows
    return dropped


def _bank_config(manifest: dict[str, Any]) -> SpadeConfig:
    """The scoring settings a bank was built (and calibrated) with; keys a bank predates take their old behaviour."""
    build = {**LEGACY_SCORING, **(manifest.get("build") or {})}
    return SpadeConfig(manifest["backbone"], int(manifest["image_size"]), manifest["protocol"]).with_scoring(build)


def _bank_calibration(manifest: dict[str, Any]) -> Calibration | None:
    """The bank's calibration, with the settings it was made with (older manifests: the build's)."""
    saved = manifest.get("calibration")
    if not saved:
        return None
    if saved.get("settings") is None:
        saved = {**saved, "settings": _bank_config(manifest).calibration_settings()}
    return Calibration(**saved)


def _check_weights_on_driver(manifest: dict[str, Any], config: SpadeConfig, weights: str | None) -> None:
    """Refuse a bank of another backbone or other weights before any worker starts.

    The scorer actors check again (they are what really loads the weights); this check only makes
    the common mistake one clear error.  A driver that cannot see the weights file leaves it to them.
    """
    from spade_ray.method.backbones import WeightsNotFoundError, file_sha256, weights_path

    try:
        sha = file_sha256(weights_path(config.backbone, weights))
    except WeightsNotFoundError:
        return
    check_compatible(manifest, config.backbone, sha, config.image_size, config.protocol)


def run_score(source: str, bank_url: str, output: str, *, weights: str | None = None, image_k: int | None = None,
              pixel_k: int | None = None, kappa: int | None = None, scoring: dict[str, Any] | None = None,
              threshold: float | None = None, image_threshold: float | None = None, batch_size: int = 16,
              max_actors: int | None = None, overwrite: bool = False, retry_errors: bool = False, save_maps: bool = False,
              max_pixels: int = DEFAULT_MAX_PIXELS, storage_options: dict[str, Any] | None = None,
              address: str | None = None, progress: Progress = no_progress,
              report_top: int = DEFAULT_REPORT_TOP) -> JobSummary:
    """Score every image under ``source`` against a served bank; masks, heatmaps, overlays and result rows to ``output``.

    Images already scored into ``output`` against the same bank are skipped (``overwrite`` redoes
    them all, ``retry_errors`` only those whose row is an error); the mask threshold defaults to
    the bank's normal-only calibration.  Finally ``output/report.html`` shows everything scored
    into ``output``, with the ``report_top`` most anomalous images.
    """
    start = time.perf_counter()
    bank_root, manifest = open_bank(bank_url, storage_options)
    config = _bank_config(manifest).with_scoring({"image_k": image_k, "pixel_k": pixel_k, "kappa": kappa, **(scoring or {})})
    calibration = _bank_calibration(manifest)
    needs_recalibration = calibration is not None and not calibration.matches(config)
    if calibration is None and (threshold is None or image_threshold is None or config.image_scoring != "knn"):
        raise ValueError(f"bank {bank_url} has no calibration; pass --threshold and --image-threshold "
                         "(and --image-scoring knn: the knn+map score needs the normal scales)")

    _check_weights_on_driver(manifest, config, weights)
    items = resolve_inputs(source, storage_options)
    from spade_ray.distributed.serving import bank_id_of

    bank_id = bank_id_of(bank_root, manifest)
    if overwrite:
        _remove_results(output, storage_options)
        done: dict[str, str] = {}
    else:
        existing = _read_rows(join_url(output, "results"), storage_options, ["image_id", "bank_id", "status"])
        others = {r["bank_id"] for r in existing} - {bank_id}
        if others:
            raise ValueError(f"{output} holds results scored against another bank ({', '.join(sorted(others))}); "
                             f"use --overwrite to replace them or choose another --output")
        if retry_errors and any(r["status"] != "ok" for r in existing):
            _drop_error_rows(output, storage_options)
            existing = [r for r in existing if r["status"] == "ok"]
        done = {r["image_id"]: r["status"] for r in existing}
    todo = [it for it in items if it.image_id not in done]
    summary = JobSummary("score", skipped=len(items) - len(todo), output=output,
                         skipped_error=sum(1 for it in items if done.get(it.image_id, "ok") != "ok"),
                         extra={"bank_id": bank_id})
    spec = BACKBONES[config.backbone]
    pre = Preprocessor(config.image_size, config.protocol, spec.mean, spec.std)  # type: ignore[arg-type]
    served, shard_cpus = None, 0.0
    if needs_recalibration or todo:
        init_ray(address)
        shard_cpus = shard_actor_cpus(len(manifest["shards"]))
        served = start_shard_actors(bank_root, manifest, storage_options, num_cpus=shard_cpus, aggregate=config.aggregate)
    try:
        if needs_recalibration:  # scoring settings differ from the bank's: thresholds and scales must follow them
            assert calibration is not None and served is not None
            calibration = _calibrate(served, config, max(calibration.n_images, 2), calibration.target_fpr, batch_size,
                                     progress)
        if calibration is not None:
            calibration = calibration.for_image_scoring(config.image_scoring)
        pixel_threshold = threshold if threshold is not None else calibration.pixel_threshold  # type: ignore[union-attr]
        image_thr = image_threshold if image_threshold is not None else calibration.image_threshold  # type: ignore[union-attr]
        summary.extra.update(pixel_threshold=pixel_threshold, image_threshold=image_thr, recalibrated=needs_recalibration)
        if todo:
            keys = unique_output_stems((it.image_id, it.relpath) for it in items)  # all inputs: same keys on a rerun
            _run_pipeline(todo, DecodeImages(pre, storage_options, max_pixels), ScoreImages,
                          {"bank": served, "config": config, "weights": weights, "output": output, "run_id": new_run_id(),
                           "pixel_threshold": float(pixel_threshold), "image_threshold": float(image_thr),
                           "scales": calibration.scales if calibration else None,
                           "storage_options": storage_options, "save_maps": save_maps},
                          batch_size, max_actors, summary, progress, "score", reserved_cpus=shard_cpus * len(manifest["shards"]),
                          keys=keys)
    finally:
        if served is not None:
            served.shutdown()
    bar = progress(min(report_top, len(items)), "report")
    try:
        report = score_report(output, source=source, bank_id=bank_id, image_threshold=float(image_thr),
                              pixel_threshold=float(pixel_threshold), preprocessor=pre, skipped=summary.skipped,
                              top=report_top, storage_options=storage_options, progress=bar.update)
    finally:
        bar.close()
    summary.extra["report"] = join_url(output, "report.html")
    summary.extra["anomalous"] = report.counts["anomalous"]
    write_report(summary.extra["report"], report, storage_options)
    summary.seconds = time.perf_counter() - start
    return summary
