"""The settings that change scores: one typed configuration, its defaults and its presets.

A bank stores them (its manifest's ``build``), ``score`` may override the scoring ones per run,
and a calibration records the ones its normal scores depend on.  Everything that computes a score
takes these objects, never loose keyword lists, so a new setting is added in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from spade_ray.method.backbones import BACKBONES
from spade_ray.method.coarse_to_fine import DEFAULT_COARSE_K, DEFAULT_MARGIN
from spade_ray.method.fusion import DEFAULT_SIGMA
from spade_ray.method.image_scoring import IMAGE_SCORINGS
from spade_ray.method.matching import DEFAULT_AGGREGATE, DEFAULT_KAPPA, DEFAULT_MATCHING, MatchSettings
from spade_ray.method.preprocess import PROTOCOLS
from spade_ray.method.tiling import Tiling

__all__ = [
    "CALIBRATION_SETTINGS",
    "DEFAULT_IMAGE_K",
    "DEFAULT_IMAGE_SCORING",
    "DEFAULT_OVERLAP_FRACTION",
    "DEFAULT_PIXEL_K",
    "LEGACY_SCORING",
    "METHODS",
    "SCORING_SETTINGS",
    "TILING_SETTINGS",
    "UNTILED",
    "SpadeConfig",
]

# Chosen by measurement (README, "Choosing image_k and pixel_k"): the image score wants few
# neighbours (image AUROC falls steadily from k=1 to k=50 on both protocols); 2 rather than 1 so
# that one mislabelled or duplicated image in the normal set cannot hide a defect on its own.
# The pixel gallery wants many (pixel AUROC and AUPRO rise up to 50 and fall beyond), as in the paper.
DEFAULT_IMAGE_K = 2
DEFAULT_PIXEL_K = 50
# Chosen by measurement (README, "Detection quality"): the combined image score raises image AUROC
# on magnetic_tile and costs nothing on the synthetic set.  The matching defaults are in
# spade_ray.method.matching.
DEFAULT_IMAGE_SCORING = "knn+map"
# A tile's outer eighth on each side sees the network's zero padding; overlapping tiles by a quarter
# lets every frame pixel be scored mostly by a tile that sees it away from its edge.
DEFAULT_OVERLAP_FRACTION = 4


@dataclass(frozen=True)
class SpadeConfig:
    """Every setting that changes the scores; stored with a fitted model or bank."""

    backbone: str = "lite0"
    image_size: int = 224
    protocol: str = "full"
    image_k: int = DEFAULT_IMAGE_K
    pixel_k: int = DEFAULT_PIXEL_K
    kappa: int = DEFAULT_KAPPA
    sigma: float = DEFAULT_SIGMA
    matching: str = DEFAULT_MATCHING
    coarse_k: int = DEFAULT_COARSE_K
    margin: int = DEFAULT_MARGIN
    aggregate: int = DEFAULT_AGGREGATE
    image_scoring: str = DEFAULT_IMAGE_SCORING
    tile: int = 0
    tile_overlap: int = -1
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.tile_overlap < 0:  # unset: a quarter of the tile (README, "High-resolution frames")
            object.__setattr__(self, "tile_overlap", self.tile // DEFAULT_OVERLAP_FRACTION)
        self.tiling  # noqa: B018 - validates the tiling settings
        if self.tile and self.protocol != "full":
            raise ValueError("tiling scores frames at their own size: it needs --protocol full")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        for name in ("image_k", "pixel_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.image_scoring not in IMAGE_SCORINGS:
            raise ValueError(f"unknown image scoring {self.image_scoring!r}; choose one of {', '.join(IMAGE_SCORINGS)}")
        self.match  # noqa: B018 - validates the matching settings

    @property
    def match(self) -> MatchSettings:
        """The matching settings, as every matcher takes them."""
        return MatchSettings(self.kappa, self.matching, self.coarse_k, self.margin, self.aggregate)

    @property
    def tiling(self) -> Tiling:
        """How frames are cut into tiles (``tile`` 0: not at all, the whole frame is resized to the input)."""
        return Tiling(self.tile, self.tile_overlap, self.scale)

    def scoring(self) -> dict[str, Any]:
        """The settings a scorer may override per run (stored in a bank's manifest as its defaults)."""
        return {name: getattr(self, name) for name in SCORING_SETTINGS}

    def calibration_settings(self) -> dict[str, Any]:
        """The settings a leave-one-out calibration depends on (stored with it, compared by ``Calibration.matches``)."""
        return {name: getattr(self, name) for name in CALIBRATION_SETTINGS}

    def with_scoring(self, settings: dict[str, Any]) -> SpadeConfig:
        """This config with the scoring settings found in ``settings`` (None values and other keys ignored)."""
        given = {k: v for k, v in settings.items() if k in SCORING_SETTINGS and v is not None}
        return replace(self, **{k: type(getattr(self, k))(v) for k, v in given.items()})


SCORING_SETTINGS = ("image_k", "pixel_k", "kappa", "sigma", "matching", "coarse_k", "margin", "aggregate", "image_scoring")

# The settings that decide which pixels make a bank row (with backbone and image_size): a bank built
# with them must be scored with them.  A manifest without them was built untiled.
TILING_SETTINGS = ("tile", "tile_overlap", "scale")
UNTILED: dict[str, Any] = {"tile": 0, "tile_overlap": 0, "scale": 1.0}

# What a bank written before a setting existed was scored with (its manifest lacks the key).
LEGACY_SCORING: dict[str, Any] = {"aggregate": 1, "image_scoring": "knn"}

# Settings that change the leave-one-out normal scores a calibration is made of (image_scoring
# only combines them, so a calibration serves every image scoring).
CALIBRATION_SETTINGS = tuple(name for name in SCORING_SETTINGS if name != "image_scoring")

# ``--method``: named presets of the scoring settings; explicit options override them.
# ``spade`` is the published method (raw pyramid features, exact all-pixel correspondence, image
# score from the pooled vector alone); ``spade-ray`` is this project's default (README, "Detection
# quality", has the measurements behind each difference).
METHODS: dict[str, dict[str, Any]] = {
    "spade": {"aggregate": 1, "image_scoring": "knn", "matching": "exact"},
    "spade-ray": {"aggregate": DEFAULT_AGGREGATE, "image_scoring": DEFAULT_IMAGE_SCORING, "matching": DEFAULT_MATCHING,
                  "coarse_k": DEFAULT_COARSE_K, "margin": DEFAULT_MARGIN},
}
