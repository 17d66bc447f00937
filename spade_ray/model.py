"""The in-process SPADE model: ``Spade(...).fit(normal_images).predict(images)``.

A bank of normal images is the whole model: their global vectors (for retrieval) and their
feature pyramids (for dense correspondence).  This class is the reference the distributed job is
checked against, and the API for notebooks and tests; it has no Ray in it.

Scoring an image (paper: Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid
Correspondences"):

1. image score = mean Euclidean distance of its global vector to the ``image_k`` nearest normal
   global vectors;
2. anomaly map = for each pyramid level, every pixel feature is matched against all pixel
   features of the ``pixel_k`` nearest normal images; the pixel's score is the mean distance to
   its ``kappa`` nearest matches; levels are upsampled to the input size, averaged, smoothed
   (Gaussian, sigma 4) and resized to the image's own frame.

``image_k`` and ``pixel_k`` are separate settings because the two tasks want different values: a
few neighbours give the sharpest image-level ranking while a larger gallery covers more of the
normal variation at the pixel level (see the README for the measurements behind the defaults).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from spade_ray.method.aggregation import aggregate_levels
from spade_ray.method.backbones import BACKBONES, Backbone, load_backbone
from spade_ray.method.coarse_to_fine import DEFAULT_COARSE_K, DEFAULT_MARGIN
from spade_ray.method.correspondence import DEFAULT_CHUNK_ELEMENTS
from spade_ray.method.features import FeatureBatch, features_from_tensor
from spade_ray.method.fusion import DEFAULT_SIGMA, fuse_levels, image_score
from spade_ray.method.image_scoring import IMAGE_SCORINGS, combine_image_scores, normal_scales
from spade_ray.method.matching import MATCHING
from spade_ray.method.preprocess import Preprocessor
from spade_ray.method.pyramid_bank import PyramidBank, PyramidBanks
from spade_ray.method.retrieval import GlobalIndex
from spade_ray.method.timing import StageTimer

__all__ = [
    "DEFAULT_IMAGE_K",
    "DEFAULT_KAPPA",
    "DEFAULT_PIXEL_K",
    "METHODS",
    "Calibration",
    "Prediction",
    "Spade",
    "SpadeConfig",
    "anomaly_maps",
]

# Chosen by measurement (README, "Choosing image_k and pixel_k"): the image score wants few
# neighbours (image AUROC falls steadily from k=1 to k=50 on both protocols); 2 rather than 1 so
# that one mislabelled or duplicated image in the normal set cannot hide a defect on its own.
# The pixel gallery wants many (pixel AUROC and AUPRO rise up to 50 and fall beyond), as in the paper.
DEFAULT_IMAGE_K = 2
DEFAULT_PIXEL_K = 50
DEFAULT_KAPPA = 1
# Chosen by measurement (README, "Detection quality"): the combined image score raises image AUROC
# on magnetic_tile and costs nothing on the synthetic set.  3x3 aggregation (PatchCore's locally
# aware features, whose paper measured 3x3 best across the 15 real MVTec AD categories) raises
# magnetic_tile's pixel AUROC by 6 points (paper protocol) and 4 (full), and is what reaches the
# anchors on every metric at once; it loses on our synthetic set's 1-2 px scratches, a generated
# texture that is not real data, so thin-defect products should measure `--aggregate 1` (README).
# With aggregated features coarse-to-fine margin 0 is within 0.3 point of exact matching on both
# protocols, and it is the cheapest matching: the approximate default issue 5's rule allows.
DEFAULT_AGGREGATE = 3
DEFAULT_IMAGE_SCORING = "knn+map"
DEFAULT_MATCHING = "coarse-to-fine"
MODEL_FORMAT_VERSION = 1

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

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        for name in ("image_k", "pixel_k", "kappa", "coarse_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0; got {self.margin}")
        if self.matching not in MATCHING:
            raise ValueError(f"unknown matching {self.matching!r}; choose one of {', '.join(MATCHING)}")
        if self.aggregate < 1 or self.aggregate % 2 == 0:
            raise ValueError(f"aggregate must be an odd window size >= 1; got {self.aggregate}")
        if self.image_scoring not in IMAGE_SCORINGS:
            raise ValueError(f"unknown image scoring {self.image_scoring!r}; choose one of {', '.join(IMAGE_SCORINGS)}")

    def scoring(self) -> dict[str, Any]:
        """The settings a scorer may override per run (stored in a bank's manifest as its defaults)."""
        return {name: getattr(self, name) for name in SCORING_SETTINGS}

    def calibration_settings(self) -> dict[str, Any]:
        """The settings a leave-one-out calibration depends on (stored with it, compared by :meth:`Calibration.matches`)."""
        return {name: getattr(self, name) for name in CALIBRATION_SETTINGS}

    def with_scoring(self, settings: dict[str, Any]) -> "SpadeConfig":
        """This config with the scoring settings found in ``settings`` (None values and other keys ignored)."""
        return replace(self, **{k: type(getattr(self, k))(v) for k, v in settings.items() if k in SCORING_SETTINGS and v is not None})


SCORING_SETTINGS = ("image_k", "pixel_k", "kappa", "sigma", "matching", "coarse_k", "margin", "aggregate", "image_scoring")

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


@dataclass(frozen=True)
class Calibration:
    """Normal-only thresholds and score scales from leave-one-out scoring of the bank's own images.

    ``knn_scores`` and ``pixel_maxima`` are the leave-one-out kNN scores and map maxima of up to
    ``n_images`` bank images, scored with ``settings`` (the calibration settings in force; scores
    made with other settings need another calibration).  Their medians are the scales of the
    ``knn+map`` image score; ``image_threshold`` is the (1 - target_fpr) quantile of the normal
    image scores under ``image_scoring`` and ``pixel_threshold`` the same quantile of the map
    maxima, so a normal image is flagged, and its mask is non-empty, with probability about
    ``target_fpr``.
    """

    target_fpr: float
    n_images: int
    image_threshold: float
    pixel_threshold: float
    image_scores: list[float] = field(default_factory=list)
    pixel_maxima: list[float] = field(default_factory=list)
    knn_scores: list[float] = field(default_factory=list)
    image_scoring: str = "knn"
    knn_scale: float | None = None
    map_scale: float | None = None
    settings: dict[str, Any] | None = None

    @classmethod
    def from_scores(cls, knn_scores: Sequence[float], pixel_maxima: Sequence[float], target_fpr: float,
                    image_scoring: str = "knn", settings: dict[str, Any] | None = None) -> "Calibration":
        """Scales and thresholds from leave-one-out normal kNN scores and map maxima."""
        knn = [float(v) for v in knn_scores]
        maxima = [float(v) for v in pixel_maxima]
        scales = normal_scales(knn, maxima)
        image = combine_image_scores(np.asarray(knn), np.asarray(maxima), image_scoring, scales)
        q = 1.0 - target_fpr
        return cls(target_fpr, len(knn), float(np.quantile(image, q)), float(np.quantile(maxima, q)),
                   [float(v) for v in image], maxima, knn, image_scoring, scales[0], scales[1],
                   dict(settings) if settings is not None else None)

    @property
    def scales(self) -> tuple[float, float] | None:
        return (self.knn_scale, self.map_scale) if self.knn_scale and self.map_scale else None

    def for_image_scoring(self, image_scoring: str) -> "Calibration":
        """The same leave-one-out scores with the image threshold of another image scoring."""
        if image_scoring == self.image_scoring:
            return self
        if not self.knn_scores:
            raise ValueError("this calibration predates image scorings (no leave-one-out kNN scores); rebuild the bank")
        return Calibration.from_scores(self.knn_scores, self.pixel_maxima, self.target_fpr, image_scoring, self.settings)

    def matches(self, config: "SpadeConfig") -> bool:
        """Whether these normal scores were made with ``config``'s calibration settings."""
        if self.settings is None:
            return False
        return all(self.settings.get(name, LEGACY_SCORING.get(name)) == value
                   for name, value in config.calibration_settings().items())


def calibration_rows(keys: Sequence[str], samples: int) -> np.ndarray:
    """Rows (ascending) of the up to ``samples`` bank images to score leave-one-out: those whose
    ``sha256(key)`` is smallest, ``key`` being the image's URI.

    A hash order is a uniform sample that depends on nothing but the images themselves: the same
    bank fitted in process or built into any number of shards, in any order, calibrates on the
    same images and so gets the same thresholds and score scales.  Choosing among the candidates
    each shard proposes (its own smallest ``samples``) gives the bank-wide choice.
    """
    digests = [hashlib.sha256(str(key).encode("utf-8")).digest() for key in keys]
    order = sorted(range(len(digests)), key=digests.__getitem__)
    return np.sort(np.asarray(order[: max(0, samples)], dtype=np.int64))


@dataclass
class Prediction:
    """Scores for a batch of images.

    ``maps[i]`` is the anomaly map in the image's output frame (its own size for the ``full``
    protocol, the 224 crop for ``paper``); ``neighbours[i]`` are the bank ids of the ``image_k``
    nearest normal images; ``knn_scores`` are the retrieval part of the image scores (equal to
    them under image scoring ``knn``).
    """

    image_scores: np.ndarray
    maps: list[np.ndarray]
    neighbours: list[list[str]]
    knn_scores: np.ndarray | None = None

    @property
    def pixel_max(self) -> np.ndarray:
        return np.array([float(m.max()) for m in self.maps], dtype=np.float32)


def anomaly_maps(
    query: FeatureBatch,
    bank: PyramidBank,
    neighbour_rows: np.ndarray,
    config: SpadeConfig,
    timer: StageTimer | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    device: torch.device | str | None = None,
) -> list[np.ndarray]:
    """SPADE's pixel-level step for a batch: fused, smoothed maps at the network's input size.

    ``bank`` holds the normal pyramids in the query's feature space (same aggregation);
    ``neighbour_rows[b]`` are the bank rows forming image b's gallery (negative ids are ignored).
    The matching runs on ``device`` (the backbone's, so a GPU does both); the bank stays in host
    memory and only the gallery data each query compares with is copied over.
    """
    timer = timer or StageTimer()
    maps = []
    for b in range(len(query)):
        rows = neighbour_rows[b]
        rows = np.sort(rows[rows >= 0])
        with timer.stage("correspondence"):
            queries = [torch.from_numpy(np.ascontiguousarray(level[b])).to(device, torch.float32) for level in query.levels]
            distances = bank.distances(queries, rows, config.kappa, config.matching, config.coarse_k, config.margin,
                                       chunk_elements)
        with timer.stage("fusion"):
            maps.append(fuse_levels([d.mean(dim=-1) for d in distances], config.image_size, config.sigma))
    return maps


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _as_image(item: object, storage_options: dict | None = None, max_pixels: int | None = None) -> np.ndarray:
    if isinstance(item, np.ndarray):
        if item.ndim == 2:
            item = np.repeat(item[:, :, None], 3, axis=2)
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise ValueError(f"image arrays must be HxWx3 (or HxW) uint8; got {item.shape} {item.dtype}")
        return item
    from spade_ray.storage.images import DEFAULT_MAX_PIXELS, load_image

    return load_image(os.fspath(item), storage_options, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)  # type: ignore[arg-type]


class Spade:
    """SPADE anomaly detection and segmentation from normal images only."""

    def __init__(
        self,
        backbone: str = "lite0",
        *,
        image_k: int = DEFAULT_IMAGE_K,
        pixel_k: int = DEFAULT_PIXEL_K,
        kappa: int = DEFAULT_KAPPA,
        image_size: int = 224,
        protocol: str = "full",
        sigma: float = DEFAULT_SIGMA,
        matching: str = DEFAULT_MATCHING,
        coarse_k: int = DEFAULT_COARSE_K,
        margin: int = DEFAULT_MARGIN,
        aggregate: int = DEFAULT_AGGREGATE,
        image_scoring: str = DEFAULT_IMAGE_SCORING,
        weights: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
        storage_options: dict | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.config = SpadeConfig(backbone, image_size, protocol, image_k, pixel_k, kappa, sigma, matching, coarse_k, margin,
                                  aggregate, image_scoring)
        self.batch_size = batch_size
        self.storage_options = storage_options
        self.max_pixels = max_pixels  # images above it are refused from the header (None: images.DEFAULT_MAX_PIXELS)
        self._weights = weights
        self._device = device
        self._backbone: Backbone | None = None
        self.preprocessor = Preprocessor(image_size, protocol, BACKBONES[backbone].mean, BACKBONES[backbone].std)  # type: ignore[arg-type]
        self.bank_ids: list[str] = []
        self.bank_global: np.ndarray | None = None
        self.bank_levels: list[np.ndarray] = []
        self._pyramids = PyramidBanks([])
        self.index: GlobalIndex | None = None
        self.calibration: Calibration | None = None
        self.weights_sha256: str | None = None
        self.timer = StageTimer()

    # ------------------------------------------------------------------ backbone and features

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = load_backbone(self.config.backbone, self._weights, self._device)
            if self.weights_sha256 is not None and self._backbone.weights_sha256 != self.weights_sha256:
                raise ValueError(
                    f"this model was fitted with {self.config.backbone} weights sha256 {self.weights_sha256}, "
                    f"but the weights loaded now ({self._backbone.weights_path}) have sha256 "
                    f"{self._backbone.weights_sha256}; scoring with other weights gives meaningless results"
                )
            self.weights_sha256 = self._backbone.weights_sha256
        return self._backbone

    def _input_batches(self, images: Sequence[object]) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
        """(each image's own (height, width), (B, S, S, 3) uint8 network-size pixels) per batch.

        The next batch is decoded and resized in a background thread while the caller runs the
        network and the matching on this one, as a data loader's worker would: PIL releases the
        GIL, and decoding plus the paper protocol's Lanczos resize cost about 4 ms per
        magnetic_tile image on one core, a fifth of the forward pass.  The ``decode`` stage is
        that thread's time.
        """
        def prepare(batch: Sequence[object]) -> tuple[list[tuple[int, int]], np.ndarray]:
            with self.timer.stage("decode"):
                decoded = [_as_image(item, self.storage_options, self.max_pixels) for item in batch]
                return [(im.shape[0], im.shape[1]) for im in decoded], np.stack([self.preprocessor.resize_rgb(im) for im in decoded])

        batches = _batches(images, self.batch_size)
        with ThreadPoolExecutor(1, thread_name_prefix="spade-decode") as pool:
            pending = [pool.submit(prepare, batch) for batch in itertools.islice(batches, 1)]
            while pending:
                ready = pending.pop().result()
                pending.extend(pool.submit(prepare, batch) for batch in itertools.islice(batches, 1))
                yield ready

    def _forward(self, resized: np.ndarray, level_dtype: type = np.float32) -> FeatureBatch:
        with self.timer.stage("forward"):
            return features_from_tensor(self.backbone, self.preprocessor.normalize(resized), level_dtype)

    def extract(self, images: Sequence[object], level_dtype: type = np.float32, progress: Callable[[int], None] | None = None) -> tuple[FeatureBatch, list[tuple[int, int]]]:
        """Features and original (height, width) of every image."""
        parts, sizes = [], []
        for batch_sizes, resized in self._input_batches(images):
            sizes.extend(batch_sizes)
            parts.append(self._forward(resized, level_dtype))
            if progress:
                progress(len(batch_sizes))
        return FeatureBatch.concat(parts), sizes

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        images: Sequence[object],
        ids: Sequence[str] | None = None,
        calibration_samples: int = 64,
        target_fpr: float = 0.01,
        progress: Callable[[int], None] | None = None,
    ) -> "Spade":
        """Build the normal bank from defect-free images (arrays or paths/URLs).

        Pyramids are stored as float16 (half the memory; the effect on scores is below 1e-3
        relative) and global vectors as float32.  ``calibration_samples`` bank images are scored
        leave-one-out to set normal-only thresholds (0 disables calibration).
        """
        if len(images) == 0:
            raise ValueError("fit needs at least one normal image")
        ids = list(ids) if ids is not None else [os.fspath(x) if not isinstance(x, np.ndarray) else str(i) for i, x in enumerate(images)]
        if len(ids) != len(images):
            raise ValueError(f"got {len(ids)} ids for {len(images)} images")
        features, _ = self.extract(images, np.float16, progress)
        self.set_bank(ids, features.global_, features.levels)
        if calibration_samples > 0 and len(ids) > 1:
            self.calibration = self.calibrate(calibration_samples, target_fpr)
        return self

    def set_bank(self, ids: Sequence[str], global_: np.ndarray, levels: Sequence[np.ndarray]) -> None:
        """Install a bank from already-extracted features (e.g. loaded from Parquet shards)."""
        self.bank_ids = list(ids)
        self.bank_global = np.ascontiguousarray(global_, dtype=np.float32)
        self.bank_levels = [np.ascontiguousarray(level, dtype=np.float16) for level in levels]
        self._pyramids = PyramidBanks(self.bank_levels)
        with self.timer.stage("index"):
            self.index = GlobalIndex(self.bank_global)

    def pyramid_bank(self, aggregate: int) -> PyramidBank:
        """The bank's pyramids in the feature space of ``aggregate``, laid out for matching (made once, then kept)."""
        if aggregate in self._pyramids:
            return self._pyramids(aggregate)
        with self.timer.stage("prepare bank"):
            return self._pyramids(aggregate)

    def calibrate(self, samples: int = 64, target_fpr: float = 0.01, progress: Callable[[int], None] | None = None) -> Calibration:
        """Leave-one-out scores of up to ``samples`` bank images (:func:`calibration_rows`) -> scales and thresholds.

        Each sampled image is scored as the bank holds it (its pyramids in the configured feature
        space), exactly as a served shard hands it out, so both paths calibrate alike.
        """
        self._require_fitted()
        assert self.bank_global is not None
        rows = calibration_rows(self.bank_ids, samples)
        scores, maxima = [], []
        with self.timer.stage("calibration"):
            bank = self.pyramid_bank(self.config.aggregate)
            for batch_rows in _batches(rows, self.batch_size):
                query = FeatureBatch(self.bank_global[batch_rows], [lvl.float().numpy() for lvl in bank.images(batch_rows)])
                s, maps, _ = self._score_features(query, exclude=np.asarray(batch_rows), aggregated=True)
                scores.extend(float(v) for v in s)
                maxima.extend(float(m.max()) for m in maps)
                if progress:
                    progress(len(batch_rows))
        return Calibration.from_scores(scores, maxima, target_fpr, self.config.image_scoring,
                                       self.config.calibration_settings())

    # ------------------------------------------------------------------ predict

    def _require_fitted(self) -> None:
        if self.index is None:
            raise RuntimeError("this Spade has no normal bank yet: call fit(normal_images) or Spade.load(dir)")

    def _score_features(self, query: FeatureBatch, exclude: np.ndarray | None = None,
                        aggregated: bool = False) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """kNN image scores, maps at input size, and neighbour rows for a batch of query features
        (raw, or ``aggregated`` already into the configured feature space)."""
        assert self.index is not None
        cfg = self.config
        with self.timer.stage("retrieval"):
            dists, rows = self.index.search(query.global_, max(cfg.image_k, cfg.pixel_k), exclude)
            scores = image_score(dists, cfg.image_k)
        if not aggregated:
            with self.timer.stage("aggregate"):
                query = FeatureBatch(query.global_, aggregate_levels(query.levels, cfg.aggregate))
        maps = anomaly_maps(query, self.pyramid_bank(cfg.aggregate), rows[:, : cfg.pixel_k], cfg, self.timer,
                            device=self.backbone.device)
        return scores, maps, rows

    def _calibration_for_scoring(self) -> Calibration | None:
        """The calibration, checked against the settings in force, with this config's image threshold."""
        cal = self.calibration
        if cal is None:
            return None
        if cal.settings is not None and not cal.matches(self.config):
            raise ValueError("this model's calibration was made with other scoring settings "
                             f"({cal.settings}); call calibrate() again after changing them")
        return cal.for_image_scoring(self.config.image_scoring)

    def predict(self, images: Sequence[object], progress: Callable[[int], None] | None = None) -> Prediction:
        """Image scores and anomaly maps (in each image's output frame) for arrays or paths/URLs."""
        self._require_fitted()
        self.backbone  # noqa: B018 - verifies the weights before any work
        cal = self._calibration_for_scoring()
        scales = cal.scales if cal else None
        if self.config.image_scoring != "knn" and scales is None:
            raise ValueError(f"image scoring {self.config.image_scoring!r} needs a calibrated model (normal score scales): "
                             "fit with calibration_samples > 0 or call calibrate(); or use image_scoring='knn'")
        all_scores, all_knn, all_maps, neighbours = [], [], [], []
        for sizes, resized in self._input_batches(images):
            knn, maps, rows = self._score_features(self._forward(resized))
            with self.timer.stage("fusion"):
                scores = combine_image_scores(knn, np.array([m.max() for m in maps]), self.config.image_scoring, scales)
                for (height, width), amap in zip(sizes, maps):
                    all_maps.append(self.preprocessor.map_to_output(amap, height, width))
            all_scores.append(scores)
            all_knn.append(knn)
            neighbours.extend([[self.bank_ids[r] for r in row[: self.config.image_k] if r >= 0] for row in rows])
            if progress:
                progress(len(sizes))
        return Prediction(np.concatenate(all_scores).astype(np.float32), all_maps, neighbours,
                          np.concatenate(all_knn).astype(np.float32))

    # ------------------------------------------------------------------ persistence (no pickle)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the fitted model as JSON + .npy files (loadable without pickle)."""
        self._require_fitted()
        assert self.bank_global is not None
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "global.npy", self.bank_global, allow_pickle=False)
        for i, level in enumerate(self.bank_levels):
            np.save(out / f"level{i}.npy", level, allow_pickle=False)
        meta = {
            "format": "spade_ray.model",
            "format_version": MODEL_FORMAT_VERSION,
            "config": asdict(self.config),
            "weights_sha256": self.weights_sha256,
            "ids": self.bank_ids,
            "levels": len(self.bank_levels),
            "calibration": asdict(self.calibration) if self.calibration else None,
        }
        tmp = out / "spade.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(out / "spade.json")  # written last: a folder without it is incomplete
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str], weights: str | None = None, device: str | None = None, batch_size: int = 16) -> "Spade":
        """Load a model written by :meth:`save`; the backbone weights must have the same sha256."""
        src = Path(directory)
        meta_path = src / "spade.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{src} is not a saved spade_ray model (no spade.json)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "spade_ray.model" or meta.get("format_version") != MODEL_FORMAT_VERSION:
            raise ValueError(f"{meta_path}: unsupported model format {meta.get('format')!r} v{meta.get('format_version')}")
        cfg = {**LEGACY_SCORING, **meta["config"]}  # a model saved before a setting existed used its old behaviour
        model = cls(cfg.pop("backbone"), weights=weights, device=device, batch_size=batch_size, **cfg)
        model.weights_sha256 = meta["weights_sha256"]
        levels = [np.load(src / f"level{i}.npy", allow_pickle=False) for i in range(meta["levels"])]
        model.set_bank(meta["ids"], np.load(src / "global.npy", allow_pickle=False), levels)
        if meta.get("calibration"):
            model.calibration = Calibration(**meta["calibration"])
        return model

    def __repr__(self) -> str:
        n = len(self.bank_ids)
        return f"Spade({self.config}, bank={n} images)"
