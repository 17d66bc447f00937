"""The pictures written for a scored image: mask, heatmap, overlay (and on request the raw map).

One definition for ``score`` and ``evaluate``, so both name, scale and draw them the same way:
keys come from the image's output stem, the heat scale tops out at twice the pixel threshold for
every image (maps of different images compare by colour), and the mask is the decision rule's.

What is written is the user's choice (:class:`ArtifactChoice`): a nightly job over millions of
frames may want masks for every image but heatmaps and overlays only for the flagged ones, since
each artifact is one more request to the object store and one more encode.  Encoding
(:meth:`Artifacts.encode`) is apart from writing, so a job writes a batch's files concurrently
and commits an image's row only once they are all stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spade_ray.method.decision import Thresholds
from spade_ray.storage.outputs import encode_jpeg, encode_npy, encode_png, heatmap_rgb
from spade_ray.storage.overlay import overlay_rgb
from spade_ray.storage.urls import join, write_many

__all__ = ["ARTIFACT_KINDS", "VISUALS", "ArtifactChoice", "Artifacts", "overlay_with_mask"]

# masks are always written: the result row's decision is only checkable with them
ARTIFACT_KINDS = ("masks", "heatmaps", "overlays", "maps")
VISUALS = ("all", "anomalous", "none")
_FOLDERS = {"masks": ("masks", ".png", "mask_uri"), "heatmaps": ("heatmaps", ".png", "heatmap_uri"),
            "overlays": ("overlays", ".jpg", "overlay_uri"), "maps": ("maps", ".npy", None)}


def overlay_with_mask(image: np.ndarray, anomaly_map: np.ndarray, thresholds: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(the heatmap blended on the image with the mask outlined, the mask): what a person looks at.

    ``image`` and ``anomaly_map`` are in the same output frame.
    """
    mask = thresholds.mask(anomaly_map)
    return overlay_rgb(image, anomaly_map, thresholds.heat_max, mask), mask


@dataclass(frozen=True)
class ArtifactChoice:
    """Which artifacts are written, and for which images.

    ``kinds`` among :data:`ARTIFACT_KINDS` (``masks`` is always included); ``visuals`` says which
    images get their heatmap and overlay: ``all``, only the ``anomalous`` ones (flagged by the
    decision), or ``none``.  The default is the nightly job's: masks for every image, pictures for
    the flagged ones, which are what a person opens (the report shows every flagged image's
    overlay; an unflagged image in its top list shows its original and mask).
    """

    kinds: frozenset[str] = field(default_factory=lambda: frozenset({"masks", "heatmaps", "overlays"}))
    visuals: str = "anomalous"

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(ARTIFACT_KINDS)
        if unknown:
            raise ValueError(f"unknown artifacts {sorted(unknown)}; choose among {', '.join(ARTIFACT_KINDS)}")
        if self.visuals not in VISUALS:
            raise ValueError(f"unknown visuals {self.visuals!r}; choose one of {', '.join(VISUALS)}")
        object.__setattr__(self, "kinds", frozenset(self.kinds) | {"masks"})

    @classmethod
    def parse(cls, write: str | None, visuals: str | None, save_maps: bool = False) -> ArtifactChoice:
        """From ``--write masks,heatmaps,overlays`` and ``--visuals``; ``--save-maps`` adds the raw maps."""
        kinds = {k.strip() for k in write.split(",") if k.strip()} if write else {"masks", "heatmaps", "overlays"}
        return cls(frozenset(kinds | ({"maps"} if save_maps else set())), visuals or "anomalous")

    def adding(self, kinds: set[str]) -> ArtifactChoice:
        """The same choice with more kinds written (``--save-maps`` adds ``maps``)."""
        return ArtifactChoice(self.kinds | kinds, self.visuals)

    def kinds_for(self, flagged: bool) -> list[str]:
        """The artifacts an image gets, given whether it was flagged."""
        visual = self.visuals == "all" or (self.visuals == "anomalous" and flagged)
        return [k for k in ARTIFACT_KINDS if k in self.kinds and (visual or k not in ("heatmaps", "overlays"))]

    @property
    def may_need_images(self) -> bool:
        """Whether any image may get an overlay (so the image itself must be at hand)."""
        return "overlays" in self.kinds and self.visuals != "none"


@dataclass(frozen=True)
class Artifacts:
    """Encodes (and :meth:`write` stores) one image's artifacts under ``output``."""

    output: str
    thresholds: Thresholds
    choice: ArtifactChoice = field(default_factory=ArtifactChoice)

    def encode(self, stem: str, anomaly_map: np.ndarray, image: Callable[[], np.ndarray], flagged: bool
               ) -> tuple[dict[str, str | None], dict[str, bytes]]:
        """(result-row URI fields, {URL: bytes} to store) for one image.

        ``image`` returns the image in the map's output frame; it is called only when an overlay is
        made.  A URI field is None for an artifact not written for this image.
        """
        uris: dict[str, str | None] = {"mask_uri": None, "heatmap_uri": None, "overlay_uri": None}
        files: dict[str, bytes] = {}
        mask = self.thresholds.mask(anomaly_map)
        for kind in self.choice.kinds_for(flagged):
            folder, suffix, column = _FOLDERS[kind]
            url = join(self.output, f"{folder}/{stem}{suffix}")
            if kind == "masks":
                files[url] = encode_png((mask * 255).astype(np.uint8))
            elif kind == "heatmaps":
                files[url] = encode_png(heatmap_rgb(anomaly_map, vmax=self.thresholds.heat_max))
            elif kind == "overlays":
                files[url] = encode_jpeg(overlay_rgb(image(), anomaly_map, self.thresholds.heat_max, mask))
            else:
                files[url] = encode_npy(anomaly_map)
            if column:
                uris[column] = url
        return uris, files

    def write(self, stem: str, anomaly_map: np.ndarray, image: Callable[[], np.ndarray], flagged: bool,
              storage_options: dict[str, Any] | None = None) -> dict[str, str | None]:
        """Encode and store one image's artifacts (concurrently); returns the result-row URI fields."""
        uris, files = self.encode(stem, anomaly_map, image, flagged)
        write_many(files, storage_options)
        return uris
