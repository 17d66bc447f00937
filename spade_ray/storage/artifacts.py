"""The pictures written for every scored image: mask, heatmap, overlay (and on request the raw map).

One writer for ``score`` and ``evaluate``, so both name, scale and draw them the same way: keys
come from the image's output stem, the heat scale tops out at twice the pixel threshold for every
image (maps of different images compare by colour), and the mask is the decision rule's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from spade_ray.method.decision import Thresholds
from spade_ray.storage.outputs import heatmap_rgb, write_jpeg, write_npy, write_png
from spade_ray.storage.overlay import overlay_rgb
from spade_ray.storage.urls import join

__all__ = ["ArtifactWriter", "overlay_with_mask"]


def overlay_with_mask(image: np.ndarray, anomaly_map: np.ndarray, thresholds: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(the heatmap blended on the image with the mask outlined, the mask): what a person looks at.

    ``image`` and ``anomaly_map`` are in the same output frame.
    """
    mask = thresholds.mask(anomaly_map)
    return overlay_rgb(image, anomaly_map, thresholds.heat_max, mask), mask


@dataclass(frozen=True)
class ArtifactWriter:
    """Writes ``OUT/masks/<stem>.png``, ``OUT/heatmaps/<stem>.png``, ``OUT/overlays/<stem>.jpg``
    (and ``OUT/maps/<stem>.npy`` with ``save_maps``) for one image's anomaly map."""

    output: str
    thresholds: Thresholds
    storage_options: dict[str, Any] | None = None
    save_maps: bool = False

    def write(self, stem: str, anomaly_map: np.ndarray, image: np.ndarray) -> dict[str, str]:
        """Write the artifacts of one image; returns their URIs as result-row fields.

        ``anomaly_map`` and ``image`` are in the same output frame (the overlay draws one on the other).
        """
        uris = {"mask_uri": join(self.output, f"masks/{stem}.png"),
                "heatmap_uri": join(self.output, f"heatmaps/{stem}.png"),
                "overlay_uri": join(self.output, f"overlays/{stem}.jpg")}
        overlay, mask = overlay_with_mask(image, anomaly_map, self.thresholds)
        write_png(uris["mask_uri"], (mask * 255).astype(np.uint8), self.storage_options)
        write_png(uris["heatmap_uri"], heatmap_rgb(anomaly_map, vmax=self.thresholds.heat_max), self.storage_options)
        write_jpeg(uris["overlay_uri"], overlay, self.storage_options)
        if self.save_maps:
            write_npy(join(self.output, f"maps/{stem}.npy"), anomaly_map, self.storage_options)
        return uris
