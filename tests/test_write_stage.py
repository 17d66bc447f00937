"""The score job's write stage: a batch's result rows are committed only once all its pictures are stored.

A row that points at a missing object would be a lie the rerun never repairs (the image counts as
done), so the stage writes the artifacts first and the result file last.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from spade_ray.distributed.write_stage import WriteResults
from spade_ray.storage.results import RESULT_SCHEMA, read_results


def _batch(artifacts_at: str) -> dict[str, np.ndarray]:
    """Two scored images as the scorer hands them on: rows as JSON, each with its mask to store."""
    rows, urls, data = [], [], []
    for name in ("a", "b"):
        mask = f"{artifacts_at}/masks/{name}.png"
        rows.append({**{field: None for field in RESULT_SCHEMA.names}, "uri": f"s3://in/{name}.png", "relpath": f"{name}.png",
                     "image_id": name, "image_score": 1.0, "pixel_max": 2.0, "is_anomalous": False, "mask_uri": mask,
                     "bank_id": "v0001-x", "status": "ok", "seconds": 0.1})
        urls.append([mask])
        data.append([b"\x89PNG not really, but bytes"])
    column = np.empty(2, dtype=object)
    column[:] = urls
    payload = np.empty(2, dtype=object)
    payload[:] = data
    return {"image_id": np.array(["a", "b"], dtype=object), "row": np.array([json.dumps(r) for r in rows], dtype=object),
            "file_urls": column, "file_bytes": payload}


def test_no_row_is_committed_when_an_artifact_cannot_be_stored(tmp_path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the masks' folder should be: every mask write fails, even as root")
    writer = WriteResults(str(tmp_path / "out"), "run1")
    with pytest.raises(OSError, match=f"cannot write the output {tmp_path / 'out'}: "):  # it names the output
        writer(_batch(str(blocker)))
    assert read_results(str(tmp_path / "out")).num_rows == 0  # the rerun scores both images again


def test_rows_are_committed_after_their_artifacts(s3_server, s3_bucket) -> None:
    options = s3_server.storage_options
    fs = s3_server.filesystem()
    status = WriteResults(f"{s3_bucket}/out", "run1", options)(_batch(f"{s3_bucket}/out"))
    assert list(status["status"]) == ["ok", "ok"]
    rows = read_results(f"{s3_bucket}/out", storage_options=options).to_pylist()
    assert sorted(r["image_id"] for r in rows) == ["a", "b"]
    assert all(fs.exists(r["mask_uri"]) for r in rows)
