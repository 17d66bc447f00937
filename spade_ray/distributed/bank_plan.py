"""What a score run will do per bank, decided on the driver before any actor starts.

``score --bank`` is the one-route case of ``score --routes``: the inputs are routed (first
matching route wins), each routed bank is opened once (when its first input is routed to it) and
its settings resolved, the images already done for the bank their route points to now are skipped,
and the banks are packed into waves whose shard actors fit the memory budget together (all at once
when they fit, otherwise bank by bank).  A plan counts its inputs and holds references to its
inputs to score (in Ray's object store), not the inputs themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc

from spade_ray.bank.ignore_mask import load_ignore_mask
from spade_ray.bank.manifest import BankManifest
from spade_ray.bank.store import check_compatible, open_bank
from spade_ray.distributed.input_blocks import InputBlocks
from spade_ray.method.calibration import Calibration
from spade_ray.method.config import SpadeConfig
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.method.tiling import Tiling
from spade_ray.storage.done_set import DoneSet
from spade_ray.storage.results import drop_error_rows, read_results, remove_results
from spade_ray.storage.routes import Route, RoutingTable
from spade_ray.storage.sources import InputImage

__all__ = ["SHARD_ACTOR_BASE_BYTES", "BankPlan", "BankPlanner", "done_images", "pack_waves", "route_items",
           "served_bytes"]

# A shard actor's own footprint before it holds a bank image (Python, torch, FAISS, buffers):
# the figure infra/README.md sizes the workers with.
SHARD_ACTOR_BASE_BYTES = int(0.8 * 2**30)


def served_bytes(manifest: BankManifest) -> int:
    """Memory the bank's shard actors take when served: each actor's base, plus per image its pyramids
    (fp16 plus a float32 norm per pixel, as the matcher lays them out) and its global vector twice."""
    per_image = 2 * 4 * manifest.global_dim + sum(c * h * w * 2 + h * w * 4 for c, h, w in manifest.levels)
    return SHARD_ACTOR_BASE_BYTES * len(manifest.shards) + per_image * manifest.n_images


def check_weights_on_driver(manifest: BankManifest, config: SpadeConfig, weights: str | None) -> None:
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


@dataclass
class BankPlan:
    """One bank of the run: where it is, how its images are scored and decided, and which images go to it."""

    key: str
    route: Route
    bank_root: str
    manifest: BankManifest
    config: SpadeConfig
    calibration: Calibration | None
    threshold: float | None
    image_threshold: float | None
    ignore: IgnoreRegion | None
    inputs: int = 0  # inputs routed here
    todo: InputBlocks = field(default_factory=InputBlocks)  # those this run scores

    @property
    def bank_id(self) -> str:
        return self.manifest.bank_id

    @property
    def geometry(self) -> tuple[str, int, str, str, Tiling]:
        """What a scorer actor's backbone and decode stage depend on: banks that share it share a pipeline."""
        return (self.config.backbone, self.config.image_size, self.config.protocol, self.manifest.weights_sha256,
                self.config.tiling)

    @property
    def recalibrate(self) -> bool:
        return self.calibration is not None and not self.calibration.matches(self.config)

    @property
    def needs_serving(self) -> bool:
        return self.todo.rows > 0 or self.recalibrate

    @property
    def memory(self) -> int:
        return served_bytes(self.manifest)


def route_items(table: RoutingTable, items: Sequence[InputImage]) -> tuple[dict[Route, list[InputImage]], list[InputImage]]:
    """Each input under the first route that matches it (routes in table order), and the inputs no route matches."""
    routed: dict[Route, list[InputImage]] = {}
    unmatched = []
    for item in items:
        route = table.route(item.uri, item.relpath)
        if route is None:
            unmatched.append(item)
        else:
            routed.setdefault(route, []).append(item)
    return routed, unmatched


def _open(route: Route, key: str, overrides: dict[str, Any], threshold: float | None, image_threshold: float | None,
          weights: str | None, storage_options: dict[str, Any] | None) -> BankPlan:
    """Open a route's bank; its settings: the route's, then the command line's, then the bank's own."""
    bank_root, manifest = open_bank(route.bank, storage_options)
    config = manifest.built_config().with_scoring({**overrides, **route.scoring()})
    calibration = manifest.built_calibration()
    pixel = route.threshold if route.threshold is not None else threshold
    image = route.image_threshold if route.image_threshold is not None else image_threshold
    if calibration is None and (pixel is None or image is None or config.image_scoring != "knn"):
        raise ValueError(f"bank {route.bank} has no calibration; pass --threshold and --image-threshold "
                         "(and --image-scoring knn: the knn+map score needs the normal scales)"
                         + (f", or set threshold and image_threshold in its route ({route.where})"
                            if route.where != "--bank" else ""))
    check_weights_on_driver(manifest, config, weights)
    ignore = load_ignore_mask(bank_root, manifest, storage_options)
    return BankPlan(key, route, bank_root, manifest, config, calibration, pixel, image, ignore)


class BankPlanner:
    """One plan per distinct (bank, settings) that some input is routed to, in the order of their first input.

    Routes naming the same bank with the same settings share one plan (one served copy); a bank
    that no input is routed to is not opened, so a table may list tomorrow's products already.
    """

    def __init__(self, overrides: dict[str, Any], threshold: float | None, image_threshold: float | None,
                 weights: str | None, storage_options: dict[str, Any] | None) -> None:
        self._open = (overrides, threshold, image_threshold, weights, storage_options)
        self._plans: dict[tuple[str, str], BankPlan] = {}

    def plan(self, route: Route) -> BankPlan:
        """The plan of ``route``'s bank and settings, opening the bank the first time."""
        ident = (route.bank, repr(sorted(route.settings.items())))
        if ident not in self._plans:
            self._plans[ident] = _open(route, f"b{len(self._plans)}", *self._open)
        return self._plans[ident]

    @property
    def plans(self) -> list[BankPlan]:
        return list(self._plans.values())


def done_images(output: str, banks: Collection[str | None], overwrite: bool, retry_errors: bool, exclusive: bool,
                storage_options: dict[str, Any] | None) -> DoneSet:
    """The images with a row in ``output`` (and each row's bank), compact (10^7 rows fit).

    ``banks``: the bank ids this run's inputs may be routed to.  ``overwrite`` removes every
    result first; ``retry_errors`` drops the error rows first.  A row of another bank is refused
    when ``exclusive`` (``--bank``: the output is one bank's), before any input is scored; a routed
    run instead asks :meth:`DoneSet.elsewhere` per chunk of its listing which images are routed to
    another bank now, and scores those again.  Rows are handled column-wise (no Python object per row).
    """
    if overwrite:
        remove_results(output, storage_options)
        return DoneSet.empty()
    existing = read_results(output, ["image_id", "bank_id", "status"], storage_options)
    if exclusive:
        others = set(pc.unique(existing.column("bank_id")).to_pylist()) - set(banks)
        if others:
            raise ValueError(f"{output} holds results scored against another bank ({', '.join(sorted(map(str, others)))}); "
                             f"use --overwrite to replace them or choose another --output")
    if retry_errors and pc.any(pc.not_equal(existing.column("status"), "ok")).as_py():
        drop_error_rows(output, storage_options)
        existing = existing.filter(pc.equal(existing.column("status"), "ok"))
    return DoneSet.from_rows(existing)


def pack_waves(plans: Sequence[BankPlan], budget: float) -> list[list[BankPlan]]:
    """The banks to serve, in waves whose shard actors fit ``budget`` bytes together.

    Banks of another backbone, input geometry or tiling go in another wave (a wave is one pipeline, whose
    scorers share a backbone); within a geometry, banks join the current wave in table order while
    it fits, so all are served at once when they fit and one by one when none fit together.  A bank
    larger than the budget alone still gets its own wave (with a warning): it cannot be split.
    """
    waves: list[list[BankPlan]] = []
    by_geometry: dict[tuple[str, int, str, str, Tiling], list[BankPlan]] = {}
    for plan in plans:
        if plan.needs_serving:
            by_geometry.setdefault(plan.geometry, []).append(plan)
    for group in by_geometry.values():
        current: list[BankPlan] = []
        for plan in group:
            if plan.memory > budget:
                logging.getLogger(__name__).warning(
                    f"score: bank {plan.route.bank} needs about {plan.memory / 2**30:.1f} GiB served, more than the "
                    f"--bank-memory budget of {budget / 2**30:.1f} GiB; it is served alone")
            if current and sum(p.memory for p in current) + plan.memory > budget:
                waves.append(current)
                current = []
            current.append(plan)
        if current:
            waves.append(current)
    return waves
