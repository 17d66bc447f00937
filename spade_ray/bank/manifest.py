"""A bank version's ``manifest.json`` as a typed, immutable object.

The manifest is read and validated in exactly one place, :meth:`BankManifest.from_dict`, and
written by :meth:`BankManifest.to_dict`; everything else (loading shards, checking features,
serving, scoring settings, the bank's identity in result rows) uses the typed fields, so a field
can neither be misspelt nor go unchecked.  ``to_dict`` gives back the dict the manifest was read
from (every manifest this package has written carries every key), which keeps the file bytes and
:attr:`BankManifest.bank_id` of existing banks unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from spade_ray.method.calibration import Calibration
from spade_ray.method.config import LEGACY_SCORING, SpadeConfig
from spade_ray.method.tiling import NO_TILING, Tiling

__all__ = ["BANK_FORMAT", "BANK_FORMAT_VERSION", "BankManifest", "IgnoreMaskEntry", "ShardEntry"]

BANK_FORMAT = "spade_ray.bank"
BANK_FORMAT_VERSION = 1
_REQUIRED = ("version", "backbone", "weights_sha256", "image_size", "protocol", "levels", "global_dim", "n_images",
             "shards")


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a version: its name, its folder relative to the bank root, its size and files.

    ``path`` may point into a parent version's folder (an ``--add-to`` version lists its parent's
    shards unchanged); ``files`` maps each file name to its sha256, checked before it is parsed.
    """

    name: str
    path: str
    n_images: int
    files: dict[str, str]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardEntry:
        return cls(name=data["name"], path=data["path"], n_images=int(data["n_images"]), files=dict(data["files"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "n_images": self.n_images, "files": dict(self.files)}


@dataclass(frozen=True)
class IgnoreMaskEntry:
    """The bank's ignore mask: a 0/255 PNG at the camera's frame size (white = ignore), and its sha256.

    ``path`` is relative to the bank root like a shard's, so an ``--add-to`` version that inherits
    its parent's mask lists the parent's entry unchanged (``v0001/ignore_mask.png``).
    """

    path: str
    sha256: str
    height: int
    width: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IgnoreMaskEntry:
        return cls(path=data["path"], sha256=data["sha256"], height=int(data["height"]), width=int(data["width"]))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "height": self.height, "width": self.width}


@dataclass(frozen=True)
class BankManifest:
    """What one bank version holds and how it was made (see :mod:`spade_ray.bank.store` for the layout).

    ``levels`` are the pyramid shapes (C, H, W); ``build`` the settings the bank was built and
    calibrated with (its scoring defaults); ``calibration`` the saved normal-only calibration as
    written (None when the build skipped it); ``parent`` the version an ``--add-to`` grew from;
    ``ignore_mask`` the region whose map values never count (None: none; the key is then left out
    of the file, so manifests of banks without a mask are those written before masks existed).
    """

    format_version: int
    version: int
    created: str
    backbone: str
    weights_sha256: str
    image_size: int
    protocol: str
    levels: tuple[tuple[int, int, int], ...]
    global_dim: int
    n_images: int
    build: dict[str, Any]
    calibration: dict[str, Any] | None
    parent: str | None
    shards: tuple[ShardEntry, ...]
    ignore_mask: IgnoreMaskEntry | None = None
    tiling: Tiling = NO_TILING

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> BankManifest:
        """Validate a manifest dict (as read from ``manifest.json``); ValueError naming ``where`` when it is not one.

        Refuses another format, another format version (this package reads exactly one) and a
        manifest lacking a field, rather than failing later somewhere less clear.
        """
        if not isinstance(data, dict) or data.get("format") != BANK_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where} is not a spade_ray bank manifest (format {got!r}, expected {BANK_FORMAT!r})")
        if data.get("format_version") != BANK_FORMAT_VERSION:
            raise ValueError(
                f"{where}: bank format version {data.get('format_version')!r} is not supported; "
                f"this spade_ray reads version {BANK_FORMAT_VERSION}"
            )
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ValueError(f"{where}: manifest lacks {', '.join(missing)}")
        if not isinstance(data["version"], int) or isinstance(data["version"], bool):
            raise ValueError(f"{where}: version must be an integer; got {data['version']!r}")
        try:
            return cls(
                format_version=data["format_version"],
                version=data["version"],
                created=data.get("created"),
                backbone=data["backbone"],
                weights_sha256=data["weights_sha256"],
                image_size=data["image_size"],
                protocol=data["protocol"],
                levels=tuple((lv["channels"], lv["height"], lv["width"]) for lv in data["levels"]),
                global_dim=data["global_dim"],
                n_images=data["n_images"],
                build=copy.deepcopy(data.get("build") or {}),
                calibration=copy.deepcopy(data.get("calibration")),
                parent=data.get("parent"),
                shards=tuple(ShardEntry.from_dict(entry) for entry in data["shards"]),
                ignore_mask=IgnoreMaskEntry.from_dict(data["ignore_mask"]) if data.get("ignore_mask") else None,
                tiling=_tiling_from(data.get("tiling")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON dict of ``manifest.json`` (a fresh copy: changing it changes nothing here)."""
        data = {
            "format": BANK_FORMAT,
            "format_version": self.format_version,
            "version": self.version,
            "created": self.created,
            "backbone": self.backbone,
            "weights_sha256": self.weights_sha256,
            "image_size": self.image_size,
            "protocol": self.protocol,
            "levels": [{"channels": c, "height": h, "width": w} for c, h, w in self.levels],
            "global_dim": self.global_dim,
            "n_images": self.n_images,
            "build": copy.deepcopy(self.build),
            "calibration": copy.deepcopy(self.calibration),
            "parent": self.parent,
            "shards": [entry.to_dict() for entry in self.shards],
        }
        if self.ignore_mask is not None:
            data["ignore_mask"] = self.ignore_mask.to_dict()
        if self.tiling.enabled:  # untiled banks keep the bytes (and bank ids) they had before tiling existed
            data["tiling"] = self.tiling.settings()
        return data

    @property
    def bank_id(self) -> str:
        """A short identity of this version: ``vNNNN-`` plus 12 hex of sha256 of the manifest.

        Recorded in every result row, so an output scored against one bank is never mixed with
        rows of another (same folder rebuilt, or another bank) without ``--overwrite``.
        """
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        return f"v{self.version:04d}-{digest}"

    def built_config(self) -> SpadeConfig:
        """The scoring settings the bank was built (and calibrated) with; keys a bank predates take their old behaviour."""
        build = {**LEGACY_SCORING, **self.build}
        return SpadeConfig(self.backbone, int(self.image_size), self.protocol,
                           **self.tiling.settings()).with_scoring(build)

    def built_calibration(self) -> Calibration | None:
        """The bank's calibration, with the settings it was made with (older manifests: the build's)."""
        saved = self.calibration
        if not saved:
            return None
        if saved.get("settings") is None:
            saved = {**saved, "settings": self.built_config().calibration_settings()}
        return Calibration(**saved)


def _tiling_from(data: Any) -> Tiling:
    """The ``tiling`` entry of a manifest (absent: the bank was built untiled, one row per image)."""
    return Tiling.from_settings(data) if data else NO_TILING
