"""What a job reads: every way of naming inputs gives the same images with stable ids and safe relative paths."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spade_ray.storage.datasets import list_images
from spade_ray.storage.featurestore import image_id_for
from spade_ray.storage.outputs import output_folder_key, unique_output_stems
from spade_ray.storage.sources import list_chunks, resolve_inputs


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


@pytest.fixture()
def camera_folders(tmp_path):
    """Folders whose output keys collide ignoring case or odd characters, a folder with a subfolder, and a hidden one."""
    root = tmp_path / "night"
    rels = ["cam/A/001.png", "cam/a/001.jpg", "cam/a/002.png", "cam/a b/x.png", "cam/a_b/x.png", "cam/a_b/y.png",
            "cam/b.png", "cam/b/c.png", "cam-c/d.png", "cam/z/1.png", "cam/z/2.png", "cam/z/3.png", ".cache/e.png"]
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4)).save(root / rel)
    return root


def _folder_keys(chunk) -> set[str]:
    return {output_folder_key(item.relpath) for item in chunk}


def test_chunks_end_at_folder_boundaries_and_give_the_keys_of_the_whole_listing(camera_folders) -> None:
    whole = resolve_inputs(str(camera_folders))
    assert len(whole) == 12 and ".cache/e.png" not in {i.relpath for i in whole}  # hidden folders are not data
    assert [i.uri for i in sorted(whole, key=lambda i: i.uri)] == list_images(str(camera_folders))  # one find
    assert all(i.uri == str(camera_folders / i.relpath) for i in whole)
    chunks = list(list_chunks(str(camera_folders), chunk=2))
    assert [i for c in chunks for i in c] == whole  # same inputs, same order, same relpaths
    assert len(chunks) > 3 and all(len(c) >= 2 for c in chunks[:-1])
    for i, chunk in enumerate(chunks):  # no folder group is split across chunks
        assert not _folder_keys(chunk) & set().union(*(_folder_keys(c) for c in chunks[i + 1:]))
    groups = {output_folder_key(i.relpath) for i in whole}
    assert {"cam\0a", "cam\0a_b"} <= groups  # A and a, "a b" and a_b: one group each
    per_chunk = {k: v for c in chunks for k, v in unique_output_stems((i.image_id, i.relpath) for i in c).items()}
    assert per_chunk == unique_output_stems((i.image_id, i.relpath) for i in whole)
    assert per_chunk[image_id_for(str(camera_folders / "cam/a/002.png"))] == "cam/a/002"  # no clash: plain key
    assert per_chunk[image_id_for(str(camera_folders / "cam/a b/x.png"))].startswith("cam/a_b/x-")


def test_a_shuffled_list_with_repeats_gives_the_folder_walk_order_and_relpaths(camera_folders, tmp_path) -> None:
    walked = resolve_inputs(str(camera_folders))
    uris = [i.uri for i in walked]
    shuffled = uris[5:] + uris[:5] + uris[2:4]
    listing = tmp_path / "night.txt"
    listing.write_text("\n".join(shuffled) + "\n")
    table = tmp_path / "night.parquet"
    pq.write_table(pa.table({"uri": shuffled + [None, ""]}), table)
    for source in (listing, table):
        chunks = list(list_chunks(str(source), chunk=3))
        assert [i for c in chunks for i in c] == walked
        for i, chunk in enumerate(chunks):
            assert not _folder_keys(chunk) & set().union(*(_folder_keys(c) for c in chunks[i + 1:]))
