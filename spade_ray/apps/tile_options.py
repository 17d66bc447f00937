"""``--tile``, ``--tile-overlap`` and ``--scale``: scoring high-resolution frames as a grid of tiles.

They decide which pixels a bank row is made of (``spade_ray.method.tiling``), so they go with the
features: ``evaluate`` and ``extract`` take them, ``build-bank`` and ``score`` take them from the
features and the bank.
"""

from __future__ import annotations

import argparse

from spade_ray.method.config import DEFAULT_OVERLAP_FRACTION
from spade_ray.method.tiling import Tiling

__all__ = ["add_tile_options", "tiling_of"]


def _scale(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number; got {text}")
    return value


def add_tile_options(parser: argparse.ArgumentParser) -> None:
    """The tiling flags (README, "High-resolution frames")."""
    group = parser.add_argument_group("tiling (high-resolution frames)")
    group.add_argument("--tile", type=int, default=0, metavar="SIZE",
                       help="score each frame at its own resolution (times --scale) as a grid of SIZE-px tiles, each "
                       "resized to --image-size; masks and maps stay at the frame's size (default 0: no tiles, the "
                       "whole frame is resized to --image-size)")
    group.add_argument("--tile-overlap", type=int, default=None, metavar="PX",
                       help="pixels shared by neighbouring tiles, blended with no seam (default: a quarter of --tile)")
    group.add_argument("--scale", type=_scale, default=1.0, metavar="F",
                       help="resize frames by F before tiling (default 1: native resolution)")


def tiling_of(args: argparse.Namespace) -> Tiling:
    """The tiling of parsed flags (overlap unset: the default fraction of the tile)."""
    tile, overlap = getattr(args, "tile", 0), getattr(args, "tile_overlap", None)
    return Tiling(tile, tile // DEFAULT_OVERLAP_FRACTION if overlap is None else overlap, getattr(args, "scale", 1.0))
