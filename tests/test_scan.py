"""The library's walk over RAW photos and videos (apps/library/scan.py): RAW+JPEG pairs and Live Photos as one
item, videos apart, files whose extra is missing passed over with one warning naming it, a RAW's facts, and
`aim-mlx index` on a folder with a pair (the pair indexed once)."""

import json
import logging
import sqlite3
from datetime import datetime, timezone

import pytest
import skimage.data
from aim_mlx.apps.library import scan
from aim_mlx.apps.library.scan import Item, facts, items, walk
from checkpoints import write_processor
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from media import jpeg_bytes, write_dng, write_video
from PIL import Image
from typer.testing import CliRunner

from aim_mlx.cli import app


@pytest.fixture
def tree(tmp_path):
    """Names only: nothing here is decoded by the walk."""
    root = tmp_path / "Pictures"
    for name in (
        "a/IMG_0001.JPG",  # with its RAW: one photo
        "a/IMG_0001.DNG",
        "a/IMG_0002.HEIC",  # a Live Photo: the still and its motion
        "a/IMG_0002.MOV",
        "a/IMG_0003.dng",  # a RAW alone
        "a/IMG_0004.MOV",  # a video, no still beside it
        "a/img_0005.nef",  # the stem's case differs from its JPEG's
        "a/IMG_0005.jpg",
        "a/clip.mp4",
        "b/IMG_0001.DNG",  # same stem as a/IMG_0001.JPG, another folder: not its pair
        "b/notes.txt",
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    return root


def test_pairs_and_live_photos_are_one_item_and_videos_stand_apart(tree):
    a, b = tree / "a", tree / "b"
    assert list(items([tree])) == [
        Item(a / "IMG_0001.JPG", "photo", (a / "IMG_0001.DNG",)),
        Item(a / "IMG_0002.HEIC", "photo", (a / "IMG_0002.MOV",)),
        Item(a / "IMG_0003.dng", "photo"),
        Item(a / "IMG_0004.MOV", "video"),
        Item(a / "IMG_0005.jpg", "photo", (a / "img_0005.nef",)),
        Item(a / "clip.mp4", "video"),
        Item(b / "IMG_0001.DNG", "photo"),
    ]
    assert [p.name for p in walk([tree])] == [
        "IMG_0001.JPG",
        "IMG_0002.HEIC",
        "IMG_0003.dng",
        "IMG_0005.jpg",
        "IMG_0001.DNG",
    ]
    assert list(items([a / "IMG_0004.MOV"])) == [Item(a / "IMG_0004.MOV", "video")]  # named: as it is


KEPT = {
    "rawpy": ["IMG_0001.JPG", "IMG_0002.HEIC", "IMG_0004.MOV", "IMG_0005.jpg", "clip.mp4"],
    "av": ["IMG_0001.JPG", "IMG_0002.HEIC", "IMG_0003.dng", "IMG_0005.jpg", "IMG_0001.DNG"],
}


@pytest.mark.parametrize(("module", "extra"), [("rawpy", "raw"), ("av", "video")])
def test_without_an_extra_its_files_are_passed_over_with_a_warning(tree, monkeypatch, caplog, module, extra):
    real = scan.optional
    monkeypatch.setattr(scan, "optional", lambda name: None if name == module else real(name))
    with caplog.at_level(logging.WARNING, logger="aim_mlx"):
        found = list(items([tree]))
    assert [item.path.name for item in found] == KEPT[module]
    # companions are never decoded, so they need no extra: a pair's RAW, a Live Photo's motion
    assert found[0].companions == (tree / "a" / "IMG_0001.DNG",)
    assert found[1].companions == (tree / "a" / "IMG_0002.MOV",)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("passed over 2 "), warnings
    assert warnings[0].endswith(f"pip install 'aim-mlx[{extra}]'")


def test_the_facts_of_a_raw_file(tmp_path):
    photo = skimage.data.chelsea()[:300, :450]  # even sides: whole Bayer cells
    path = write_dng(tmp_path / "cat.dng", photo, preview=jpeg_bytes(photo), orientation=6)
    found = facts(path, path.stat())
    assert (found.width, found.height) == (300, 450)  # turned upright: the 450 x 300 sensor stood on end
    assert found.taken == "2021-07-04T09:30:15"
    broken = tmp_path / "broken.arw"
    broken.write_bytes(b"not a raw file")
    found = facts(broken, broken.stat())
    assert (found.width, found.height, found.taken) == (None, None, None)


def test_the_facts_of_a_video(tmp_path):
    path = write_video(tmp_path / "IMG_0004.mp4", [skimage.data.chelsea()], rotation=-90)  # 320x240 sideways
    found = facts(path, path.stat())
    assert (found.width, found.height) == (240, 320)
    utc = datetime(2023, 6, 14, 16, 30, tzinfo=timezone.utc)  # write_video's creation time
    assert found.taken == utc.astimezone().replace(tzinfo=None).isoformat()


def test_index_shows_a_raw_and_jpeg_pair_once(tmp_path):
    folder = write_processor(write_lit_checkpoint(make_lit_reference(seed=11), tmp_path / "lit"))
    photos = tmp_path / "photos"
    photos.mkdir()
    astronaut, coffee = skimage.data.astronaut(), skimage.data.coffee()[:400, :600]
    Image.fromarray(astronaut).save(photos / "DSC_0001.JPG", quality=92)
    write_dng(photos / "DSC_0001.dng", astronaut)  # its RAW
    write_dng(photos / "DSC_0002.dng", coffee)  # a RAW alone
    db = tmp_path / "library.sqlite"
    result = CliRunner().invoke(app, ["index", str(photos), "--db", str(db), "-m", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert (summary["new"], summary["embedded"], summary["failed"]) == (2, 2, []), summary
    with sqlite3.connect(db) as con:
        paths = sorted(row[0] for row in con.execute("SELECT path FROM files"))
    assert [p.split("/")[-1] for p in paths] == ["DSC_0001.JPG", "DSC_0002.dng"]
