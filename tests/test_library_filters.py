"""The photo library's metadata, filters and combined queries (issue 29, part A): EXIF written into real
photos with Pillow, read back at index time; every filter against a brute-force filter of the same table
written here (dates compared by hand, a haversine of our own); combined queries against numpy arithmetic on
the model's own encode_text / encode_image; an old library brought forward without re-embedding."""

import json
import math
import sqlite3

import numpy as np
import pytest
import skimage.data
from aim_mlx.apps.library.db import SCHEMA_VERSION, FileFacts, Library
from aim_mlx.apps.library.scan import header
from checkpoints import write_processor
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from PIL import Image, TiffImagePlugin
from typer.testing import CliRunner

import aim_mlx
from aim_mlx.cli import app

runner = CliRunner()
PARIS, VERSAILLES, SYDNEY, NEW_YORK = (
    (48.8566, 2.3522),
    (48.8049, 2.1204),
    (-33.8688, 151.2093),
    (40.7128, -74.006),
)
# name, folder, DateTimeOriginal, OffsetTimeOriginal, DateTimeDigitized, (lat, lon), Make, Model
TABLE = [
    ("astronaut", "2023", "2023:06:14 10:00:00", "+02:00", None, PARIS, "Canon", "Canon EOS R5"),
    ("coffee", "2023", "2023:06:01 00:00:00", None, None, None, "Apple", "iPhone 12"),
    ("chelsea", "2023/trip", "2023:08:31 23:59:59", "-04:00", None, VERSAILLES, "Apple", "iPhone 12"),
    ("rocket", "2023b", "2023:09:01 00:00:00", None, None, SYDNEY, "Canon", "EOS 5D"),
    ("camera", "old", "2019:12:31 23:00:00", None, None, NEW_YORK, "NIKON CORPORATION", "NIKON D750"),
    ("coins", "old", None, None, None, None, None, None),
    ("hubble_deep_field", ".", None, None, "2022:02:02 02:02:02", (-33.80, 151.28), None, None),
    ("immunohistochemistry", ".", None, None, None, None, "Canon", None),  # and IFD0 DateTime, see below
]
# What each photo's row must say, written out by hand from TABLE.
EXPECTED = {
    "astronaut": ("2023-06-14T10:00:00+02:00", PARIS, "Canon EOS R5"),
    "coffee": ("2023-06-01T00:00:00", None, "Apple iPhone 12"),
    "chelsea": ("2023-08-31T23:59:59-04:00", VERSAILLES, "Apple iPhone 12"),
    "rocket": ("2023-09-01T00:00:00", SYDNEY, "Canon EOS 5D"),
    "camera": ("2019-12-31T23:00:00", NEW_YORK, "NIKON CORPORATION NIKON D750"),
    "coins": (None, None, None),
    "hubble_deep_field": ("2022-02-02T02:02:02", (-33.80, 151.28), None),
    "immunohistochemistry": (None, None, "Canon"),  # IFD0's DateTime is when the file changed: not used
}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def dms(value: float) -> tuple:
    """Degrees as EXIF's three rationals (seconds to 1/10000)."""
    value = abs(value)
    degrees, minutes = int(value), int(value * 60 % 60)
    seconds = round((value * 3600 - degrees * 3600 - minutes * 60) * 10000)
    rational = TiffImagePlugin.IFDRational
    return rational(degrees, 1), rational(minutes, 1), rational(seconds, 10000)


def exif_for(original, offset, digitized, gps, make, model) -> Image.Exif:
    exif = Image.Exif()
    if make:
        exif[0x010F] = make
    if model:
        exif[0x0110] = model
    tags = {}
    if original:
        tags[0x9003] = original
    if offset:
        tags[0x9011] = offset
    if digitized:
        tags[0x9004] = digitized
    if tags:
        exif[0x8769] = tags
    if gps:
        lat, lon = gps
        exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
    return exif


def write_table(root):
    """TABLE's photos as JPEGs with their EXIF; name -> path."""
    paths = {}
    for name, folder, *tags in TABLE:
        (root / folder).mkdir(parents=True, exist_ok=True)
        exif = exif_for(*tags)
        if name == "immunohistochemistry":
            exif[0x0132] = "2024:01:01 00:00:00"  # IFD0 DateTime
        paths[name] = (root / folder / f"{name}.jpg").resolve()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(paths[name], exif=exif, quality=90)
    return paths


def haversine(a, b) -> float:
    """Kilometres between two (lat, lon) points on a sphere of the mean Earth radius."""
    (p1, l1), (p2, l2) = (tuple(map(math.radians, x)) for x in (a, b))
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin((l2 - l1) / 2) ** 2
    return 2 * 6371.0088 * math.asin(math.sqrt(h))


@pytest.fixture(scope="module")
def lit(tmp_path_factory):
    return write_processor(write_lit_checkpoint(make_lit_reference(seed=11), tmp_path_factory.mktemp("lit")))


@pytest.fixture(scope="module")
def library(lit, tmp_path_factory):
    """TABLE's photos indexed once; (root, paths by name, db)."""
    root = tmp_path_factory.mktemp("filters") / "Pictures"
    paths = write_table(root)
    db = root.parent / "library.sqlite"
    result = cli("index", root, "--db", db, "-m", lit, "--json")
    assert result.exit_code == 0, result.output
    return root, paths, db


def rows(db) -> dict[str, tuple]:
    """name -> (taken, (lat, lon) or None, camera), as the library holds them."""
    with Library(db) as library:
        found = library.conn.execute("SELECT path, taken, lat, lon, camera FROM files").fetchall()
    return {
        path.rsplit("/", 1)[1][:-4]: (taken, None if lat is None else (lat, lon), camera)
        for path, taken, lat, lon, camera in found
    }


def same_facts(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for name, (taken, place, camera) in expected.items():
        assert found[name][0] == taken and found[name][2] == camera, name
        assert (found[name][1] is None) == (place is None), name
        if place is not None:
            np.testing.assert_allclose(found[name][1], place, atol=1e-6, err_msg=name)


def test_index_records_capture_time_place_and_camera_from_exif(library):
    _, _, db = library
    same_facts(rows(db), EXPECTED)


def test_heic_headers_read_the_same(tmp_path):
    """pillow-heif carries the same EXIF block: the same facts come back."""
    for name, _, *tags in TABLE[:5]:
        path = tmp_path / f"{name}.heic"
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path, exif=exif_for(*tags))
        found = header(FileFacts(str(path), 0, 0, ""))
        taken, place, camera = EXPECTED[name]
        assert (found.taken, found.camera) == (taken, camera)
        assert (found.lat is None) == (place is None)
        if place:
            np.testing.assert_allclose((found.lat, found.lon), place, atol=1e-6)


# The schema of a library written by aim-mlx before metadata (schema 1, commit 776ee58), as it was.
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE models (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, info TEXT NOT NULL, dim INTEGER NOT NULL
);
CREATE TABLE files (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, model_id INTEGER NOT NULL REFERENCES models(id),
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, hash TEXT NOT NULL, width INTEGER, height INTEGER,
    taken TEXT, indexed_at REAL NOT NULL, UNIQUE (model_id, path)
);
CREATE INDEX files_hash ON files (hash);
CREATE TABLE vectors (
    model_id INTEGER NOT NULL REFERENCES models(id), hash TEXT NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (model_id, hash)
);
CREATE TABLE failures (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, reason TEXT NOT NULL, at REAL NOT NULL
);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def old_library(library, path):
    """A schema-1 library holding the same files and vectors as `library`'s, without the new facts."""
    _, _, db = library
    old = sqlite3.connect(path)
    old.executescript(V1_SCHEMA)
    new = sqlite3.connect(db)
    old.executemany(
        "INSERT INTO models VALUES (?, ?, ?, ?)", new.execute("SELECT id, key, info, dim FROM models")
    )
    old.executemany(
        "INSERT INTO vectors VALUES (?, ?, ?)", new.execute("SELECT model_id, hash, vector FROM vectors")
    )
    old.executemany(
        "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
        new.execute("SELECT id, path, model_id, size, mtime_ns, hash, width, height, indexed_at FROM files"),
    )
    old.commit()
    old.close()
    new.close()


def test_an_old_library_gains_the_columns_and_its_facts_on_the_next_run_without_re_embedding(
    lit, library, tmp_path, monkeypatch
):
    from aim_mlx.apps.library import index as indexing

    root, _, _ = library
    db = tmp_path / "old.sqlite"
    old_library(library, db)
    with sqlite3.connect(db) as conn:
        before = dict(conn.execute("SELECT hash, vector FROM vectors"))

    with Library.reader(db) as reader:  # a search's connection brings it forward...
        facts = reader.conn.execute("SELECT taken, lat, lon, camera, facts FROM files").fetchall()
    assert facts == [(None, None, None, None, 0)] * len(TABLE)  # ...its facts not read yet

    def no_model(*args, **kwargs):
        raise AssertionError("a photo was embedded again")

    monkeypatch.setattr(indexing, "iter_embeddings", no_model)
    monkeypatch.setattr(aim_mlx.loading, "fill", no_model)  # nor is the model even loaded

    # Interrupted part-way: the batches read are kept, the database is valid, the next run does the rest.
    read = indexing.header
    calls = []

    def interrupted(found):
        calls.append(found.path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return read(found)

    monkeypatch.setattr(indexing, "header", interrupted)
    with Library(db) as writer, pytest.raises(KeyboardInterrupt):
        (model_id,) = [m["id"] for m in writer.models()]
        stale = indexing.plan(writer, model_id, [root]).stale
        assert len(stale) == len(TABLE)
        indexing.refresh(writer, model_id, stale, batch=2)
    monkeypatch.setattr(indexing, "header", read)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM files WHERE facts = 1").fetchone()[0] == 4  # two batches

    result = cli("index", root, "--db", db, "-m", lit, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == {**summary, "unchanged": len(TABLE), "embedded": 0, "reused": 0, "refreshed": 4}
    same_facts(rows(db), EXPECTED)
    with sqlite3.connect(db) as conn:
        assert dict(conn.execute("SELECT hash, vector FROM vectors")) == before  # the same vectors, reused
        version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        assert int(version) == SCHEMA_VERSION
    assert json.loads(cli("index", root, "--db", db, "-m", lit, "--json").stdout)["refreshed"] == 0
