"""What a job reads: every way of naming inputs gives the same images with stable ids and safe relative paths."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spade_ray.storage.featurestore import image_id_for
from spade_ray.storage.sources import resolve_inputs


@pytest.fixture()
def archive(tmp_path):
    root = tmp_path / "archive"
    for rel in ("line1/cam1/a.png", "line1/cam2/a.png", "line2/b.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16)).save(root / rel)
    (root / "notes.txt").write_text("not an image")
    return root


def test_a_folder_gives_paths_relative_to_it(archive) -> None:
    items = resolve_inputs(str(archive))
    assert [i.relpath for i in items] == ["line1/cam1/a.png", "line1/cam2/a.png", "line2/b.jpg"]
    assert items[0].image_id == image_id_for(items[0].uri) and len({i.image_id for i in items}) == 3


def test_a_glob_is_relative_to_its_static_part(archive) -> None:
    items = resolve_inputs(str(archive) + "/line1/*/a.png")
    assert [i.relpath for i in items] == ["cam1/a.png", "cam2/a.png"]


def test_text_and_parquet_lists_use_their_common_folder(archive, tmp_path) -> None:
    uris = [str(archive / "line1/cam1/a.png"), str(archive / "line2/b.jpg")]
    listing = tmp_path / "todo.txt"
    listing.write_text("# tonight\n" + "\n".join(uris) + "\n\n")
    from_text = resolve_inputs(str(listing))
    assert [i.relpath for i in from_text] == ["line1/cam1/a.png", "line2/b.jpg"]
    table = tmp_path / "todo.parquet"
    pq.write_table(pa.table({"uri": uris}), table)
    assert resolve_inputs(str(table)) == from_text


def test_a_single_file(archive) -> None:
    [item] = resolve_inputs(str(archive / "line2" / "b.jpg"))
    assert item.relpath == "b.jpg"


def test_no_images_is_an_error_naming_the_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="empty-dir"):
        resolve_inputs(str(tmp_path / "empty-dir"))
