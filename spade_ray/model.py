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
import io
import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from spade_ray.method.backbones import BACKBONES, Backbone, load_backbone
from spade_ray.method.calibration import Calibration
from spade_ray.method.config import SpadeConfig
from spade_ray.method.decision import Thresholds
from spade_ray.method.features import FeatureBatch, features_from_tensor
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.method.local_bank import LocalBank
from spade_ray.method.preprocess import Preprocessor
from spade_ray.method.scorer import Prediction, Scorer
from spade_ray.method.tiled_scoring import FrameTiles, calibration_routine, cut_frame, extract_tiles, score_frames
from spade_ray.method.tiling import tile_key
from spade_ray.method.timing import StageTimer

if TYPE_CHECKING:
    pass

__all__ = ["Spade"]

IgnoreMask = IgnoreRegion | np.ndarray | str | os.PathLike  # what ``Spade(ignore_mask=...)`` accepts


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
        backbone: str | SpadeConfig = "lite0",
        *,
        weights: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
        storage_options: dict | None = None,
        max_pixels: int | None = None,
        ignore_mask: IgnoreMask | None = None,
        **settings: Any,
    ) -> None:
        """``backbone`` names the feature extractor, or is a whole :class:`SpadeConfig`; ``settings`` are
        :class:`SpadeConfig` fields (``image_k=5, pixel_k=20, protocol="paper"``, ...) overriding its defaults.

        ``ignore_mask``: image regions whose map values never count (serials, fixtures, timestamps),
        as a bool/0-255 array at the camera's frame size (nonzero = ignore), a PNG path or URL (white
        = ignore) or an :class:`IgnoreRegion`; it applies to calibration and scoring alike."""
        base = backbone if isinstance(backbone, SpadeConfig) else SpadeConfig(backbone)
        if "tile" in settings and "tile_overlap" not in settings:
            settings["tile_overlap"] = -1  # the default overlap of the tile asked for, not the base's
        self._config = replace(base, **settings)
        self.batch_size = batch_size
        self.storage_options = storage_options
        self.max_pixels = max_pixels  # images above it are refused from the header (None: images.DEFAULT_MAX_PIXELS)
        self._weights = weights
        self._device = device
        self._backbone: Backbone | None = None
        spec = BACKBONES[self._config.backbone]
        self.preprocessor = Preprocessor(self._config.image_size, self._config.protocol, spec.mean, spec.std)  # type: ignore[arg-type]
        self.bank: LocalBank | None = None
        self.calibration: Calibration | None = None
        self.weights_sha256: str | None = None
        self.timer = StageTimer()
        self.ignore = self._region(ignore_mask)
        self._calibrated_with: str | None = None  # the ignore region's sha256 the calibration was made with

    def _region(self, mask: IgnoreMask | None) -> IgnoreRegion | None:
        if mask is None or isinstance(mask, IgnoreRegion):
            return mask
        if isinstance(mask, np.ndarray):
            return IgnoreRegion(mask > 0)
        from spade_ray.bank.ignore_mask import read_ignore_mask

        return read_ignore_mask(os.fspath(mask), self.storage_options)

    @property
    def config(self) -> SpadeConfig:
        return self._config

    @config.setter
    def config(self, config: SpadeConfig) -> None:
        """Other scoring settings for the same bank (the backbone and input size cannot change)."""
        features = ("backbone", "image_size", "protocol", "tile", "tile_overlap", "scale")
        if any(getattr(config, name) != getattr(self._config, name) for name in features):
            raise ValueError("backbone, image size, protocol and tiling are the bank's features; "
                             "fit another model to change them")
        self._config = config
        if self.bank is not None:
            self.bank.aggregate = config.aggregate

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

    def _input_batches(self, images: Sequence[object]) -> Iterator[tuple[list[tuple[int, int]], np.ndarray | FrameTiles]]:
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
                sizes = [(im.shape[0], im.shape[1]) for im in decoded]
                return sizes, np.stack([self.preprocessor.resize_rgb(im) for im in decoded])

        if self.config.tile:
            yield from self._tiled_batches(images)
            return
        batches = _batches(images, self.batch_size)
        with ThreadPoolExecutor(1, thread_name_prefix="spade-decode") as pool:
            pending = [pool.submit(prepare, batch) for batch in itertools.islice(batches, 1)]
            while pending:
                ready = pending.pop().result()
                pending.extend(pool.submit(prepare, batch) for batch in itertools.islice(batches, 1))
                yield ready

    def _tiled_batches(self, images: Sequence[object]) -> Iterator[tuple[list[tuple[int, int]], FrameTiles]]:
        """([the frame's (height, width)], its tiles) per frame, cut in a background thread like ``_input_batches``."""
        def prepare(item: object) -> tuple[list[tuple[int, int]], FrameTiles]:
            with self.timer.stage("decode"):
                frame = cut_frame(_as_image(item, self.storage_options, self.max_pixels), self.config.tiling,
                                  self.preprocessor)
                return [(frame.height, frame.width)], frame

        with ThreadPoolExecutor(1, thread_name_prefix="spade-decode") as pool:
            pending = [pool.submit(prepare, item) for item in images[:1]]
            for following in itertools.chain(images[1:], [None]):
                ready = pending.pop().result()
                if following is not None:
                    pending.append(pool.submit(prepare, following))
                yield ready

    def _forward(self, resized: np.ndarray, level_dtype: type = np.float32) -> FeatureBatch:
        with self.timer.stage("forward"):
            return features_from_tensor(self.backbone, self.preprocessor.normalize(resized), level_dtype)

    def extract(self, images: Sequence[object], level_dtype: type = np.float32,
                progress: Callable[[int], None] | None = None) -> tuple[FeatureBatch, list[tuple[int, int]]]:
        """Features and original (height, width) of every image."""
        parts, sizes = [], []
        for batch_sizes, resized in self._input_batches(images):
            sizes.extend(batch_sizes)
            if isinstance(resized, FrameTiles):  # a tiled frame: its tiles, in rows of the bank
                parts.append(extract_tiles(resized, lambda px: self._forward(px, level_dtype), self.batch_size))
            else:
                parts.append(self._forward(resized, level_dtype))
            if progress:
                progress(len(batch_sizes))
        return FeatureBatch.concat(parts), sizes

    def _extract_tiled(self, images: Sequence[object],
                       progress: Callable[[int], None] | None) -> tuple[FeatureBatch, list[int]]:
        """float16 features of every tile of every frame, and each frame's tile count."""
        parts, counts = [], []
        for _, frame in self._tiled_batches(images):
            parts.append(extract_tiles(frame, lambda px: self._forward(px, np.float16), self.batch_size))
            counts.append(len(frame.boxes))
            if progress:
                progress(1)
        return FeatureBatch.concat(parts), counts

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        images: Sequence[object],
        ids: Sequence[str] | None = None,
        calibration_samples: int = 64,
        target_fpr: float = 0.01,
        progress: Callable[[int], None] | None = None,
    ) -> Spade:
        """Build the normal bank from defect-free images (arrays or paths/URLs).

        Pyramids are stored as float16 (half the memory; the effect on scores is below 1e-3
        relative) and global vectors as float32.  ``calibration_samples`` bank images are scored
        leave-one-out to set normal-only thresholds (0 disables calibration).
        """
        if len(images) == 0:
            raise ValueError("fit needs at least one normal image")
        if ids is None:
            ids = [str(i) if isinstance(x, np.ndarray) else os.fspath(x) for i, x in enumerate(images)]  # type: ignore[arg-type]
        ids = list(ids)
        if len(ids) != len(images):
            raise ValueError(f"got {len(ids)} ids for {len(images)} images")
        if self.config.tile:  # a bank row per tile, named after its frame (tiling.tile_key)
            features, tile_counts = self._extract_tiled(images, progress)
            ids = [tile_key(frame, i) for frame, count in zip(ids, tile_counts) for i in range(count)]
        else:
            features, _ = self.extract(images, np.float16, progress)
        self.set_bank(ids, features.global_, features.levels)
        if calibration_samples > 0 and len(ids) > 1:
            self.calibration = self.calibrate(calibration_samples, target_fpr)
        return self

    def set_bank(self, ids: Sequence[str], global_: np.ndarray, levels: Sequence[np.ndarray]) -> None:
        """Install a bank from already-extracted features (e.g. loaded from Parquet shards)."""
        self.bank = LocalBank(ids, global_, levels, self.config.aggregate, timer=self.timer)

    @property
    def bank_ids(self) -> list[str]:
        return self.bank.ids if self.bank is not None else []

    def calibrate(self, samples: int = 64, target_fpr: float = 0.01,
                  progress: Callable[[int], None] | None = None) -> Calibration:
        """Leave-one-out scores of up to ``samples`` bank images -> scales and thresholds
        (:func:`spade_ray.method.calibration.calibrate`, the routine the sharded bank uses too)."""
        bank = self._require_fitted()
        with self.timer.stage("calibration"):
            bank.pyramids()
            self._calibrated_with = self.ignore.sha256 if self.ignore is not None else None
            return calibration_routine(self.config)(self._scorer(), bank, samples, target_fpr, self.batch_size, progress)

    def _require_fitted(self) -> LocalBank:
        if self.bank is None:
            raise RuntimeError("this Spade has no normal bank yet: call fit(normal_images) or Spade.load(dir)")
        return self.bank

    def _scorer(self, calibration: Calibration | None = None) -> Scorer:
        """The scorer over this process's bank, on the backbone's device (so a GPU matches too)."""
        bank = self._require_fitted()
        bank.device = self.backbone.device
        thresholds = Thresholds(calibration.image_threshold, calibration.pixel_threshold) if calibration else None
        return Scorer(self.config, bank, bank, calibration.scales if calibration else None, thresholds, self.timer,
                      self.ignore)

    def _calibration_for_scoring(self) -> Calibration | None:
        """The calibration, checked against the settings in force, with this config's image threshold."""
        cal = self.calibration
        if cal is None:
            return None
        if cal.settings is not None and not cal.matches(self.config):
            raise ValueError("this model's calibration was made with other scoring settings "
                             f"({cal.settings}); call calibrate() again after changing them")
        if self._calibrated_with != (self.ignore.sha256 if self.ignore is not None else None):
            raise ValueError("this model's calibration was made with another ignore mask; call calibrate() again")
        return cal.for_image_scoring(self.config.image_scoring)

    def predict(self, images: Sequence[object], progress: Callable[[int], None] | None = None) -> Prediction:
        """Image scores and anomaly maps (in each image's output frame) for arrays or paths/URLs.

        A calibrated model also decides: ``is_anomalous`` per image at its normal-only thresholds.
        """
        self._require_fitted()
        self.backbone  # noqa: B018 - verifies the weights before any work
        cal = self._calibration_for_scoring()
        if self.config.image_scoring != "knn" and cal is None:
            raise ValueError(f"image scoring {self.config.image_scoring!r} needs a calibrated model (normal score scales): "
                             "fit with calibration_samples > 0 or call calibrate(); or use image_scoring='knn'")
        scorer = self._scorer(cal)
        parts = []
        for sizes, resized in self._input_batches(images):
            if isinstance(resized, FrameTiles):
                parts.append(score_frames(scorer, [resized], self._forward, self.batch_size))
            else:
                parts.append(scorer.score(self._forward(resized), sizes, self.preprocessor))
            if progress:
                progress(len(sizes))
        return Prediction.concat(parts)

    # ------------------------------------------------------------------ persistence (no pickle)

    def save(self, url: str | os.PathLike[str], storage_options: dict | None = None) -> str:
        """Write the fitted model as JSON + .npy files (loadable without pickle) to a folder or any fsspec URL.

        Every file is written whole (:func:`spade_ray.storage.urls.write_bytes`) and ``spade.json``
        last, so a reader never finds a model without all of its arrays.  Returns where it went.
        """
        # imported here, not at the top: `import spade_ray` must not pull in fsspec (the method layer imports without it)
        from spade_ray.model_files import MODEL_FORMAT_VERSION
        from spade_ray.storage.urls import join, resolve, write_bytes

        bank = self._require_fitted()
        options = storage_options if storage_options is not None else self.storage_options
        _, _, base = resolve(os.fspath(url), options)
        arrays = {"global.npy": bank.global_, **{f"level{i}.npy": level for i, level in enumerate(bank.levels)}}
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            write_bytes(join(base, name), buffer.getvalue(), options)
        meta = {
            "format": "spade_ray.model",
            "format_version": MODEL_FORMAT_VERSION,
            "config": asdict(self.config),
            "weights_sha256": self.weights_sha256,
            "ids": bank.ids,
            "levels": len(bank.levels),
            "calibration": asdict(self.calibration) if self.calibration else None,
        }
        if self.ignore is not None:
            from spade_ray.bank.ignore_mask import IGNORE_MASK_FILE, encode_ignore_mask

            data = encode_ignore_mask(self.ignore)
            write_bytes(join(base, IGNORE_MASK_FILE), data, options)
            meta["ignore_mask"] = {"file": IGNORE_MASK_FILE, "sha256": hashlib.sha256(data).hexdigest()}
        write_bytes(join(base, "spade.json"), json.dumps(meta, indent=1).encode("utf-8"), options)  # last
        return base

    @classmethod
    def load(cls, url: str | os.PathLike[str], weights: str | None = None, device: str | None = None,
             batch_size: int = 16, storage_options: dict | None = None) -> Spade:
        """A model written by :meth:`save`, or the bank ``spade-ray build-bank`` wrote, from a folder or any fsspec URL.

        A bank is opened like the score job opens it (a bank root means its latest complete
        version; ``BANK/vNNNN`` pins one), with the bank's scoring settings and calibration, so a
        notebook scores exactly as the nightly job does.  Either way the backbone weights must have
        the sha256 the model or bank records.
        """
        from spade_ray.model_files import load_bank_model, load_saved_model  # imported on use, as in save
        from spade_ray.storage.urls import join, resolve

        fs, path, base = resolve(os.fspath(url), storage_options)
        if fs.exists(f"{path}/spade.json"):
            return load_saved_model(cls, base, weights, device, batch_size, storage_options)
        from spade_ray.bank.store import open_bank

        try:
            root, manifest = open_bank(base, storage_options)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{base} is neither a saved spade_ray model (no {join(base, 'spade.json')}) "
                                    f"nor a bank: {exc}") from None
        return load_bank_model(cls, root, manifest, weights, device, batch_size, storage_options)

    def __repr__(self) -> str:
        n = len(self.bank_ids)
        return f"Spade({self.config}, bank={n} images)"
