"""What `score` writes for an image: masks always, heatmaps and overlays as `--write`/`--visuals` choose."""

from __future__ import annotations

import numpy as np
import pytest

from spade_ray.method.decision import Thresholds
from spade_ray.storage.artifacts import ArtifactChoice, Artifacts

THRESHOLDS = Thresholds(image=1.0, pixel=0.5)
MAP = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)


def _image() -> np.ndarray:
    return np.zeros((8, 8, 3), np.uint8)


@pytest.mark.parametrize("visuals, flagged, pictures", [
    ("anomalous", True, True), ("anomalous", False, False), ("all", False, True), ("none", True, False)])
def test_visuals_choose_which_images_get_a_heatmap_and_an_overlay(visuals: str, flagged: bool, pictures: bool) -> None:
    uris, files = Artifacts("s3://b/out", THRESHOLDS, ArtifactChoice(visuals=visuals)).encode("cam/1", MAP, _image, flagged)
    assert uris["mask_uri"] == "s3://b/out/masks/cam/1.png" and uris["mask_uri"] in files  # masks always
    assert (uris["heatmap_uri"] is not None) == (uris["overlay_uri"] is not None) == pictures
    assert len(files) == (3 if pictures else 1)


def test_the_image_is_only_decoded_for_an_overlay() -> None:
    def no_image() -> np.ndarray:
        raise AssertionError("decoded without an overlay to draw")

    Artifacts("out", THRESHOLDS, ArtifactChoice(visuals="anomalous")).encode("x", MAP, no_image, flagged=False)
    Artifacts("out", THRESHOLDS, ArtifactChoice(frozenset({"masks", "heatmaps"}), "all")).encode("x", MAP, no_image, True)


def test_write_and_save_maps_parse_like_the_command_line() -> None:
    choice = ArtifactChoice.parse("heatmaps", None, save_maps=True)
    assert choice.kinds == {"masks", "heatmaps", "maps"} and choice.visuals == "anomalous"
    assert not choice.may_need_images
    with pytest.raises(ValueError, match="unknown artifacts"):
        ArtifactChoice.parse("masks,thumbnails", "all")
