"""The score driver's one pass over its listing, chunk by chunk: route, skip what is done, key, hand the rest on.

The driver holds one chunk of the listing as Python objects at a time (and the compact done-set);
each bank's inputs to score go to Ray's object store as Arrow tables (:class:`InputBlocks`), so
what stays on the driver per input is a few bytes, whatever the size of the night.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from spade_ray.distributed.bank_plan import BankPlanner, route_items
from spade_ray.distributed.input_blocks import input_table
from spade_ray.storage.done_set import DoneSet
from spade_ray.storage.outputs import unique_output_stems
from spade_ray.storage.routes import RoutingTable
from spade_ray.storage.sources import InputImage

__all__ = ["InputCounts", "plan_inputs"]


@dataclass
class InputCounts:
    """What the pass found: inputs, those skipped (of which error rows), those no route matches, and the
    images routed to another bank than their row's (whose rows the caller drops before scoring)."""

    inputs: int = 0
    skipped: int = 0
    skipped_error: int = 0
    no_bank: int = 0
    rerouted: set[str] = field(default_factory=set)
    unmatched_rerouted: list[InputImage] = field(default_factory=list)  # their "no bank" rows wait for the drop


def _todo(items: list[InputImage], bank: str | None, done: DoneSet, exclusive: bool, counts: InputCounts) -> list[InputImage]:
    """The items without a row to keep: no row, or (routed runs) a row of another bank than ``bank``."""
    if not items:
        return []
    ids = np.asarray([it.image_id for it in items])
    held = done.holds(ids)
    if not exclusive:
        moved = done.elsewhere(ids, bank)
        counts.rerouted.update(ids[moved].tolist())
        held &= ~moved
    counts.skipped += int(held.sum())
    counts.skipped_error += done.count_errors(ids[held])
    return [it for it, kept in zip(items, held) if not kept]


def plan_inputs(chunks: Iterable[list[InputImage]], table: RoutingTable, planner: BankPlanner, done: DoneSet,
                exclusive: bool, write_unmatched: Callable[[list[InputImage]], None],
                start_ray: Callable[[], None]) -> InputCounts:
    """Route every chunk's inputs, count them per bank, and add the ones to score to their bank's plan.

    Output keys are computed per chunk over all its inputs (skipped ones included, so a rerun
    gives the same keys); chunks end at folder-key boundaries (:func:`~spade_ray.storage.sources.list_chunks`),
    so these are the keys of the whole listing.  Inputs no route matches get their error rows
    through ``write_unmatched`` chunk by chunk; ``start_ray`` is called before the first input is
    put in the object store (a rerun with nothing to do never starts Ray).
    """
    counts = InputCounts()
    for chunk in chunks:
        counts.inputs += len(chunk)
        keys = unique_output_stems((it.image_id, it.relpath) for it in chunk)
        routed, unmatched = route_items(table, chunk)
        for route, items in routed.items():
            plan = planner.plan(route)
            plan.inputs += len(items)
            todo = _todo(items, plan.bank_id, done, exclusive, counts)
            if todo:
                start_ray()
                plan.todo.add(input_table(todo, keys, target=plan.key))
        counts.no_bank += len(unmatched)
        no_bank = _todo(unmatched, None, done, exclusive, counts)
        counts.unmatched_rerouted.extend(it for it in no_bank if it.image_id in counts.rerouted)
        write_unmatched([it for it in no_bank if it.image_id not in counts.rerouted])
    if counts.rerouted:
        logging.getLogger(__name__).info(f"score: {len(counts.rerouted)} images are routed to another bank than their "
                                         "row's; scoring them again")
    return counts
