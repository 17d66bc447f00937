"""Reading a :class:`~spade_ray.model.Spade` back: a saved model, or the bank ``spade-ray build-bank`` wrote.

Kept apart from the class so the model's own module stays about fitting and scoring; both
readers check what they load (the weights' sha256, the files' sha256) before anything is scored.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from typing import TYPE_CHECKING

import numpy as np

from spade_ray.bank.ignore_mask import decode_ignore_mask, load_ignore_mask
from spade_ray.bank.manifest import BankManifest
from spade_ray.bank.shard_loader import load_bank_arrays
from spade_ray.bank.store import check_compatible
from spade_ray.method.backbones import WeightsNotFoundError, file_sha256, weights_path
from spade_ray.method.calibration import Calibration
from spade_ray.method.config import LEGACY_SCORING, SpadeConfig
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.storage.urls import join, read_bytes

if TYPE_CHECKING:
    from spade_ray.model import Spade

__all__ = ["MODEL_FORMAT_VERSION", "load_bank_model", "load_saved_model"]

MODEL_FORMAT_VERSION = 1


def _load_ignore(url: str, sha256: str, storage_options: dict | None) -> IgnoreRegion:
    """A saved model's ignore mask, checked against the sha256 its spade.json recorded."""
    try:
        data = read_bytes(url, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: the model's ignore mask is missing") from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ValueError(f"{url} (the model's ignore mask) is corrupt or was replaced: sha256 {got} != {sha256}")
    return decode_ignore_mask(data, url)


def load_saved_model(cls: type[Spade], base: str, weights: str | None, device: str | None, batch_size: int,
                     storage_options: dict | None) -> Spade:
    """A model written by :meth:`Spade.save` (``spade.json`` and its arrays under ``base``)."""

    meta_url = join(base, "spade.json")
    meta = json.loads(read_bytes(meta_url, storage_options))
    if meta.get("format") != "spade_ray.model" or meta.get("format_version") != MODEL_FORMAT_VERSION:
        raise ValueError(f"{meta_url}: unsupported model format {meta.get('format')!r} v{meta.get('format_version')}")
    cfg = {**LEGACY_SCORING, **meta["config"]}  # a model saved before a setting existed used its old behaviour
    model = cls(SpadeConfig(**cfg), weights=weights, device=device, batch_size=batch_size,
                storage_options=storage_options)
    model.weights_sha256 = meta["weights_sha256"]

    def array(name: str) -> np.ndarray:
        return np.load(io.BytesIO(read_bytes(join(base, name), storage_options)), allow_pickle=False)

    levels = [array(f"level{i}.npy") for i in range(meta["levels"])]
    model.set_bank(meta["ids"], array("global.npy"), levels)
    if meta.get("ignore_mask"):
        name = posixpath.basename(meta["ignore_mask"]["file"])
        model.ignore = _load_ignore(join(base, name), meta["ignore_mask"]["sha256"], storage_options)
    if meta.get("calibration"):
        model.calibration = Calibration(**meta["calibration"])
        model._calibrated_with = model.ignore.sha256 if model.ignore is not None else None
    return model

def load_bank_model(cls: type[Spade], root: str, manifest: BankManifest, weights: str | None, device: str | None, batch_size: int,
                    storage_options: dict | None) -> Spade:
    """Every shard of the version, verified, in one LocalBank in manifest order (the sharded rows).

    The bank images are named by their source URIs, as the score job names neighbours, and the
    calibration sample is chosen by URI hash, so :meth:`calibrate` here picks the images the
    build did.  Weights are checked up front, as the score job's driver does.
    """
    config = manifest.built_config()
    try:
        sha = file_sha256(weights_path(config.backbone, weights))
    except WeightsNotFoundError:
        sha = None  # loading the backbone will say what is missing; nothing to compare before then
    if sha is not None:
        check_compatible(manifest, config.backbone, sha, config.image_size, config.protocol)
    model = cls(config, weights=weights, device=device, batch_size=batch_size, storage_options=storage_options)
    model.weights_sha256 = manifest.weights_sha256
    arrays = load_bank_arrays(root, manifest, storage_options)
    model.set_bank(arrays.uris, arrays.global_, arrays.levels)
    model.ignore = load_ignore_mask(root, manifest, storage_options)  # the same region `score` applies
    model.calibration = manifest.built_calibration()
    model._calibrated_with = model.ignore.sha256 if model.ignore is not None else None
    return model

