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
    "camera": ("2019-12-31T23:00:00", NEW_YORK, "NIKON D750"),  # the make once: its first word leads
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
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").reduce(4)  # HEIC encodes slowly
        image.save(path, exif=exif_for(*tags))
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

    result = cli("index", root, "--db", db, "-m", lit, "--dry-run", "--json")  # a dry run changes nothing
    assert result.exit_code == 0 and json.loads(result.stdout)["refresh"] == len(TABLE), result.output
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("1",)
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


# Filters: each case is the CLI's flags and the same filter written over TABLE by hand.
def local(name):
    taken = EXPECTED[name][0]
    return taken[:19] if taken else None  # the camera's clock, offset left out


def case(flags, keep):
    return pytest.param(flags, keep, id=" ".join(flags))


CASES = [
    case(["--after", "2023-06"], lambda n, f: local(n) and local(n) >= "2023-06-01T00:00:00"),
    case(["--before", "2023-09"], lambda n, f: local(n) and local(n) < "2023-09-01T00:00:00"),
    case(["--after", "2023-06-14"], lambda n, f: local(n) and local(n) >= "2023-06-14T00:00:00"),
    case(["--before", "2023-06-14"], lambda n, f: local(n) and local(n) < "2023-06-14T00:00:00"),
    case(["--after", "2023", "--before", "2024"], lambda n, f: local(n) and local(n)[:4] == "2023"),
    case(["--before", "2020"], lambda n, f: local(n) and local(n) < "2020"),
    case(["--in", "2023"], lambda n, f: f in ("2023", "2023/trip")),  # not 2023b: a path, not a prefix
    case(["--in", "2023/trip", "--in", "old"], lambda n, f: f in ("2023/trip", "old")),
    case(["--camera", "canon"], lambda n, f: EXPECTED[n][2] and "canon" in EXPECTED[n][2].lower()),
    case(["--camera", "IPHONE"], lambda n, f: EXPECTED[n][2] and "iphone" in EXPECTED[n][2].lower()),
    case(["--near", "48.8566,2.3522", "--within", "20"], lambda n, f: near(n, PARIS, 20)),
    case(["--near", "48.8566,2.3522", "--within", "10"], lambda n, f: near(n, PARIS, 10)),
    case(["--near", "-33.8688,151.2093", "--within", "30"], lambda n, f: near(n, SYDNEY, 30)),
    case(
        ["--after", "2023", "--camera", "canon", "--near", "48.85,2.35", "--within", "5"],
        lambda n, f: (
            local(n)
            and local(n) >= "2023"
            and "canon" in (EXPECTED[n][2] or "").lower()
            and near(n, (48.85, 2.35), 5)
        ),
    ),
]


def near(name, place, km):
    return EXPECTED[name][1] is not None and haversine(EXPECTED[name][1], place) <= km


def stored(db):
    """path -> the library's vector for it."""
    with Library(db) as lib:
        _, paths, matrix = lib.vectors(lib.models()[0]["id"])
    return dict(zip(paths, matrix, strict=True))


def text_vector(lit, text):
    net, _ = aim_mlx.load(str(lit))
    vector = np.asarray(net.encode_text([text]))[0].astype(np.float64)
    return vector / np.linalg.norm(vector)


@pytest.mark.parametrize("flags, keep", CASES)
def test_each_filter_returns_what_a_brute_force_filter_of_the_table_does(lit, library, flags, keep):
    root, paths, db = library
    flags = [str(root / f) if flags[i - 1] == "--in" else f for i, f in enumerate(flags)]
    expected = {str(paths[name]) for name, folder, *_ in TABLE if keep(name, folder)}
    assert 0 < len(expected) < len(TABLE) or flags[:2] == ["--before", "2020"]  # each case picks some out
    result = cli("search", "a photo", *flags, "--db", db, "--json", "-k", "20")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert {h["path"] for h in hits} == expected
    # filtered before the top k: the best k of the rows that pass, in the order of numpy's cosine
    vectors, query = stored(db), text_vector(lit, "a photo")
    order = sorted(expected, key=lambda p: -(vectors[p] @ query) / np.linalg.norm(vectors[p]))
    k = max(1, len(expected) - 1)
    top = json.loads(cli("search", "a photo", *flags, "--db", db, "--json", "-k", k).stdout)
    assert [h["path"] for h in top] == order[:k]
    for hit in top:
        cosine = vectors[hit["path"]] @ query / np.linalg.norm(vectors[hit["path"]])
        assert hit["score"] == pytest.approx(cosine, abs=1e-4)
        name = hit["path"].rsplit("/", 1)[1][:-4]
        assert (hit["taken"], hit["camera"]) == (EXPECTED[name][0], EXPECTED[name][2])
        place = EXPECTED[name][1]
        assert (hit["lat"], hit["lon"]) == ((None, None) if place is None else pytest.approx(place, abs=1e-6))


def test_min_score_keeps_the_scores_at_or_above_it(lit, library):
    _, _, db = library
    vectors, query = stored(db), text_vector(lit, "a photo")
    scores = {p: v @ query / np.linalg.norm(v) for p, v in vectors.items()}
    threshold = float(np.median(list(scores.values())))
    result = cli("search", "a photo", "--min-score", f"{threshold:.6f}", "--db", db, "--json", "-k", "20")
    hits = json.loads(result.stdout)
    assert {h["path"] for h in hits} == {p for p, s in scores.items() if s >= round(threshold, 6)}
    assert len(hits) == len(TABLE) // 2
    result = cli("search", "a photo", "--min-score", "1", "--db", db)
    assert result.exit_code == 0 and result.stdout == "" and "no photos matched" in result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--after", "2023-13"],
            "Invalid value for '--after': expected a date as YYYY, YYYY-MM or YYYY-MM-DD",
        ),
        (
            ["--before", "June"],
            "Invalid value for '--before': expected a date as YYYY, YYYY-MM or YYYY-MM-DD",
        ),
        (["--after", "2023-02-30"], "Invalid value for '--after': expected a date"),
        (
            ["--after", "2023-06", "--before", "2023-06"],
            "Invalid value for '--before': '2023-06' is not later",
        ),
        (
            ["--near", "48.8", "--within", "5"],
            "Invalid value for '--near': expected LAT,LON in decimal degrees",
        ),
        (["--near", "91,0", "--within", "5"], "Invalid value for '--near': expected LAT,LON"),
        (["--near", "48.8,2.3"], "Invalid value for '--within': --near LAT,LON and --within KM go together"),
        (["--within", "5"], "Invalid value for '--near': --near LAT,LON and --within KM go together"),
        (["--near", "48.8,2.3", "--within", "0"], "Invalid value for '--within': expected a number above 0"),
        (["--min-score", "2"], "Invalid value for '--min-score': expected a number from -1 to 1, not 2.0"),
        (["--in", "/no/such/folder"], "Invalid value for '--in': /no/such/folder: no such folder"),
        (
            ["--camera", "leica"],
            "Invalid value for '--camera': no photo here was taken with a camera matching",
        ),
    ],
)
def test_bad_filter_values_are_one_line_naming_the_flag_and_exit_2(library, flags, message):
    _, _, db = library
    result = cli("search", "a photo", *flags, "--db", db)
    assert result.exit_code == 2, result.output
    first, pointer = result.stderr.splitlines()  # the error, then Click's pointer to -h
    assert first.startswith(f"error: {message}") and pointer == "Try 'aim-mlx search -h' for help."
    if "--camera" in flags:  # an unknown camera says which cameras there are
        assert "Apple iPhone 12" in first and "Canon EOS R5" in first


def synthetic(n=6000, dim=32, seed=0):
    """n random vectors with facts: a capture day in 2020-2023 (none for a tenth), a position in a box
    around Paris (none for a fifth), a camera of four, a folder of ten."""
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((n, dim)).astype(np.float32)
    days = rng.integers(0, 4 * 365, n)
    taken = [
        None if i % 10 == 0 else f"{2020 + d // 365}-{d % 365 // 31 % 12 + 1:02d}-{d % 28 + 1:02d}T12:00:00"
        for i, d in enumerate(days)
    ]
    lat = np.where(np.arange(n) % 5 == 0, np.nan, 48 + rng.random(n) * 2)
    lon = np.where(np.arange(n) % 5 == 0, np.nan, 1 + rng.random(n) * 3)
    cameras = [("Canon EOS R5", "Apple iPhone 12", "NIKON D750", None)[i % 4] for i in range(n)]
    paths = [f"/photos/f{i % 10}/{i}.jpg" for i in range(n)]
    facts = {"taken": taken, "lat": lat, "lon": lon, "camera": cameras}
    return np.arange(1000, 1000 + n), paths, matrix, facts


@pytest.mark.parametrize("approx_from", [None, 0], ids=["exact", "int8-first-pass"])
@pytest.mark.parametrize(
    "filters, keep",
    [
        (dict(after="2021-03", before="2023"), lambda t, la, lo, c, p: t and "2021-03" <= t[:7] < "2023"),
        (dict(camera="iphone"), lambda t, la, lo, c, p: c == "Apple iPhone 12"),  # a quarter
        (dict(folders=("/photos/f3",)), lambda t, la, lo, c, p: p.startswith("/photos/f3/")),  # a tenth
        (
            dict(near=(49.0, 2.5), within_km=15.0, camera="canon"),  # about 2%: the rows alone are scanned
            lambda t, la, lo, c, p: (
                c == "Canon EOS R5" and not math.isnan(la) and haversine((la, lo), (49, 2.5)) <= 15
            ),
        ),
        (dict(min_score=0.1, after="2022"), lambda t, la, lo, c, p: t and t >= "2022"),
    ],
    ids=["dates", "camera", "folder", "near-and-camera", "min-score"],
)
def test_filtered_top_k_is_the_top_k_of_the_rows_that_pass(approx_from, filters, keep):
    """On both paths: k results whenever k rows pass, exactly the best k of them (float64 brute force)."""
    from aim_mlx.apps.library.search import Filters, Vectors

    ids, paths, matrix, facts = synthetic()
    # exact_upto=0: the int8 pass even for the few rows that pass, so that both of its ways are tested
    vectors = Vectors(ids, paths, matrix, facts, approx_from=approx_from, exact_upto=0)
    assert (vectors.codes is not None) == (approx_from == 0)
    f = Filters(**filters)
    passed = np.array(
        [
            bool(keep(facts["taken"][i], facts["lat"][i], facts["lon"][i], facts["camera"][i], paths[i]))
            for i in range(len(ids))
        ]
    )
    unit = matrix.astype(np.float64) / np.linalg.norm(matrix, axis=1, keepdims=True)
    rng = np.random.default_rng(1)
    for row in rng.integers(0, len(ids), 3):
        query = matrix[row] + 0.5 * rng.standard_normal(matrix.shape[1]).astype(np.float32)
        scores = unit @ (query / np.linalg.norm(query))
        ok = passed & (scores >= (f.min_score if f.min_score is not None else -2))
        expected = [i for i in np.argsort(-scores) if ok[i]][:10]
        assert len(expected) == 10
        hits = vectors.top_k(query, 10, filters=f)
        assert [h.id for h in hits] == [int(ids[i]) for i in expected]
        np.testing.assert_allclose([h.score for h in hits], scores[expected], atol=1e-5)


# Combined queries.
def test_query_words_become_weighted_terms(tmp_path):
    from aim_mlx.apps.library.search import Term, parse_query, parse_text

    photo = tmp_path / "beach.png"
    Image.fromarray(skimage.data.coffee()).save(photo)
    words = ["2:a", "dog", "+", str(photo), "-", "people", "+", "0.5:id:12", "-", "missing.jpg"]
    assert parse_query(words) == [
        Term("text", "a dog", 2.0),
        Term("image", str(photo), 1.0),
        Term("text", "people", -1.0),
        Term("photo", 12, 0.5),
        Term(
            "image", "missing.jpg", -1.0
        ),  # named like an image: read as one (and said missing if not there)
    ]
    assert parse_query(["-", "people"]) == [Term("text", "people", -1.0)]
    assert parse_query(["", "  "]) == []  # (find says to give a query)
    assert parse_text("a sunny beach -people +.5:id:3 - 3:a crowd") == [
        Term("text", "a sunny beach", 1.0),
        Term("text", "people", -1.0),
        Term("photo", 3, 0.5),
        Term("text", "a crowd", -3.0),
    ]
    assert parse_text("well-lit beach.jpg") == [
        Term("text", "well-lit beach.jpg", 1.0)
    ]  # no files from the web


def test_a_combined_query_is_the_normalised_weighted_sum_of_normalised_term_vectors(lit, library):
    """Against numpy on the model's own encode_text and encode_image, and the library's stored vector for
    the id: term, which is left out of the results."""
    import mlx.core as mx

    _, paths, db = library
    with Library(db) as lib:
        ids = {path: i for i, path in lib.conn.execute("SELECT id, path FROM files")}
    chelsea = ids[str(paths["chelsea"])]
    net, processor = aim_mlx.load(str(lit))

    def unit(vector):
        vector = np.asarray(vector, np.float64).reshape(-1)
        return vector / np.linalg.norm(vector)

    vectors = stored(db)
    query = (
        2 * unit(net.encode_text(["a dog"]))
        + unit(net.encode_image(mx.array(processor.preprocess_one(paths["rocket"])[None])))
        - unit(net.encode_text(["people"]))
        + 0.5 * unit(vectors[str(paths["chelsea"])])
    )
    query /= np.linalg.norm(query)
    scores = {p: unit(v) @ query for p, v in vectors.items() if p != str(paths["chelsea"])}
    expected = sorted(scores, key=lambda p: -scores[p])

    words = ["2:a dog", "+", paths["rocket"], "-", "people", "+", f"0.5:id:{chelsea}"]
    result = cli("search", *words, "--db", db, "--json", "-k", "20")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert [h["path"] for h in hits] == expected  # the id: photo left out
    np.testing.assert_allclose([h["score"] for h in hits], [scores[p] for p in expected], atol=1e-4)

    # --image and --like are terms too, and a combined query takes the filters
    result = cli(
        "search", "a dog", "--image", paths["rocket"], "--in", paths["rocket"].parent, "--db", db, "--json"
    )
    query = unit(net.encode_text(["a dog"])) + unit(
        net.encode_image(mx.array(processor.preprocess_one(paths["rocket"])[None]))
    )
    hits = json.loads(result.stdout)
    assert [h["path"] for h in hits] == [str(paths["rocket"])]
    assert hits[0]["score"] == pytest.approx(unit(vectors[str(paths["rocket"])]) @ unit(query), abs=1e-4)


@pytest.mark.parametrize(
    "words, message",
    [
        (["a dog", "+", "nowhere.jpg"], "error: nowhere.jpg: no such file"),
        (["a dog", "+", "id:99999"], "error: id:99999: no indexed photo has id 99999"),
        (["id:dog"], "error: id:dog: expected id:N, N an indexed photo's id"),
        (["a dog", "+"], "error: nothing after '+' in the query; put a text, an image file or id:N there"),
        (["a dog", "-", "+", "cat"], "error: nothing after '-' in the query"),
        (["a dog", "-", "a dog"], "error: the query's terms cancel out"),
        (["{notes}"], "error: {notes}: not an image file Pillow can read"),
    ],
)
def test_a_term_that_cannot_be_read_is_one_line_naming_it(library, tmp_path, words, message):
    _, _, db = library
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    words = [w.format(notes=notes) for w in words]
    result = cli("search", *words, "--db", db)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(message.format(notes=notes)) and len(result.stderr.splitlines()) == 1


# The web API: the same filters and combined queries as the CLI.
@pytest.fixture
def client(library, tmp_path, monkeypatch):
    from aim_mlx.apps.library.web import create_app
    from starlette.testclient import TestClient

    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    with TestClient(create_app(library[2]), base_url="http://127.0.0.1") as client:
        yield client


def cli_hits(db, *args):
    result = cli("search", *args, "--db", db, "--json", "-k", "20")
    assert result.exit_code == 0, result.output
    return [
        (h["id"], h["path"], h["taken"], h["lat"], h["lon"], h["camera"]) for h in json.loads(result.stdout)
    ]


def api_hits(response):
    assert response.status_code == 200, response.text
    return [
        (h["id"], h["path"], h["taken"], h["lat"], h["lon"], h["camera"]) for h in response.json()["results"]
    ]


def test_the_api_filters_and_combines_as_the_cli_does(client, library):
    root, paths, db = library
    params = {"q": "a photo", "k": 20, "after": "2023-06", "before": "2023-09"}
    assert api_hits(client.get("/api/search", params=params)) == cli_hits(
        db, "a photo", "--after", "2023-06", "--before", "2023-09"
    )
    params = [("q", "a photo"), ("k", 20), ("in", str(root / "2023/trip")), ("in", str(root / "old"))]
    found = api_hits(client.get("/api/search", params=params))
    assert {h[1] for h in found} == {str(paths[n]) for n in ("chelsea", "camera", "coins")}
    params = {"q": "a photo", "k": 20, "near": "48.8566,2.3522", "within": 20, "camera": "iphone"}
    assert [h[1] for h in api_hits(client.get("/api/search", params=params))] == [str(paths["chelsea"])]
    assert api_hits(client.get("/api/search", params={"q": "a dog -people +2:a cat", "k": 20})) == cli_hits(
        db, "a dog", "-", "people", "+", "2:a cat"
    )
    # an uploaded image with text terms, and "more like this" with a filter
    query = paths["rocket"].read_bytes()
    response = client.post("/api/search/image?q=a+dog+-people&k=20&before=2023", content=query)
    assert api_hits(response) == cli_hits(
        db, "a dog", "-", "people", "+", paths["rocket"], "--before", "2023"
    )
    like = api_hits(client.get("/api/search", params={"q": "a photo"}))[0][0]
    response = client.get(f"/api/similar/{like}", params={"k": 20, "camera": "canon"})
    assert api_hits(response) == cli_hits(db, "--like", like, "--camera", "canon")
    facts = client.get(f"/api/photo/{like}").json()
    name = facts["name"][:-4]
    place = EXPECTED[name][1]
    assert (facts["taken"], facts["camera"]) == (EXPECTED[name][0], EXPECTED[name][2])
    assert (facts["lat"], facts["lon"]) == ((None, None) if place is None else pytest.approx(place))


@pytest.mark.parametrize(
    "params, status, error",
    [
        ({"after": "2023-13"}, 400, "after: expected a date as YYYY, YYYY-MM or YYYY-MM-DD, not '2023-13'"),
        ({"in": "/no/such/folder"}, 400, "in: /no/such/folder: no such folder"),
        ({"near": "1,2"}, 400, "within: --near LAT,LON and --within KM go together; give both"),
        ({"min_score": "x"}, 400, "min_score: expected a number from -1 to 1, not 'x'"),
        ({"camera": "leica"}, 400, "camera: no photo here was taken with a camera matching 'leica'"),
        ({"q": "a dog +"}, 400, "nothing after '+' in the query"),
        ({"q": "id:99999"}, 404, "no indexed photo has id 99999"),
    ],
)
def test_bad_api_parameters_are_one_line(client, params, status, error):
    response = client.get("/api/search", params={"q": "a photo", **params})
    assert response.status_code == status and response.json()["error"].startswith(error)
