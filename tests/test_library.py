"""The photo library (apps/library, `aim-mlx index | search | duplicates`): round trips on real photos with a
tiny random-weight LiT checkpoint, scores against transformers, incremental runs, a second model, crash
safety under SIGKILL, and one line for each bad input."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from itertools import islice

import numpy as np
import pytest
import skimage.data
import torch
from aim_mlx.apps.library.db import SCHEMA_VERSION, Library
from aim_mlx.apps.library.scan import walk
from checkpoints import write_processor
from emulation import tolerance
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from PIL import Image
from transformers import CLIPTokenizer
from typer.testing import CliRunner

import aim_mlx
import aim_mlx.loading
from aim_mlx.cli import app
from aim_mlx.loading import default_dtype

runner = CliRunner()
PHOTOS = [
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
    "coins",
]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def lit(tmp_path_factory):
    reference = make_lit_reference(seed=11)
    folder = write_processor(write_lit_checkpoint(reference, tmp_path_factory.mktemp("lit")))
    return reference, folder


@pytest.fixture
def photos(tmp_path):
    """Eight real photos in a tree, with a hidden folder and a macOS bundle the walk must skip."""
    root = tmp_path / "Pictures"
    (root / "trip").mkdir(parents=True)
    for i, name in enumerate(PHOTOS):
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        (root / "trip" if i % 2 else root).joinpath(f"{name}.jpg").parent.mkdir(exist_ok=True)
        image.save((root / "trip" if i % 2 else root) / f"{name}.jpg", quality=92)
    for hidden in (root / ".thumbnails", root / "Old.photoslibrary"):
        hidden.mkdir()
        Image.fromarray(skimage.data.astronaut()).save(hidden / "skip.png")
    return root


def index(lit_folder, db, *paths, extra=()):
    result = cli("index", *paths, "--db", db, "-m", lit_folder, "--json", *extra)
    return result, (json.loads(result.stdout.splitlines()[-1]) if result.stdout.strip() else None)


def reference_embeddings(reference, lit_folder, paths):
    """Image embeddings of `paths` from transformers (the processor's pixels, torch's towers)."""
    _, processor = aim_mlx.load(str(lit_folder))
    pixels = torch.from_numpy(
        np.asarray(processor.image([str(p) for p in paths])).transpose(0, 3, 1, 2).copy()
    )
    with torch.no_grad():
        out = reference.get_image_features(pixel_values=pixels)
    out = getattr(out, "pooler_output", out)
    out = out.numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_walk_skips_hidden_folders_and_bundles_unless_named_and_ends_on_link_loops(photos):
    (photos / "trip" / "loop").symlink_to(photos)
    found = list(walk([photos]))
    assert sorted(p.name for p in found) == sorted(f"{n}.jpg" for n in PHOTOS)
    assert [p.name for p in walk([photos / "Old.photoslibrary"])] == ["skip.png"]  # named: walked


def test_index_then_search_by_image_text_and_photo_ranks_as_transformers(lit, photos, tmp_path):
    reference, folder = lit
    db = tmp_path / "library.sqlite"
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    result, summary = index(folder, db, photos)
    assert result.exit_code == 3, result.output  # one file failed, the rest were indexed
    assert (summary["new"], summary["embedded"], summary["reused"]) == (9, 8, 0)
    assert [f["path"] for f in summary["failed"]] == [str(photos / "broken.jpg")]
    assert "broken.jpg" in result.stderr
    with Library(db) as library:
        assert library.check() == "ok"
        assert [p for p, _ in library.failures()] == [str(photos / "broken.jpg")]

    paths = sorted((p for p in walk([photos]) if p.name != "broken.jpg"), key=str)
    expected = reference_embeddings(reference, folder, paths)
    tol = tolerance(default_dtype(), 1e-4)  # the dtype the commands load in

    # By image file: the query's own file first, and every score is transformers' cosine.
    query = photos / "trip" / "coffee.jpg"
    result = cli("search", "--image", query, "--db", db, "-k", "8", "--json")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert hits[0]["path"] == str(query) and hits[0]["score"] == pytest.approx(1.0, abs=tol)
    scores = expected @ expected[paths.index(query)]
    by_path = dict(zip(map(str, paths), scores, strict=True))
    assert [h["path"] for h in hits] == sorted(by_path, key=lambda p: -by_path[p])
    np.testing.assert_allclose([h["score"] for h in hits], [by_path[h["path"]] for h in hits], atol=tol)

    # By text: transformers' text tower gives the same order.
    result = cli("search", "a cat on a sofa", "--db", db, "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    enc = CLIPTokenizer.from_pretrained(str(folder))(
        ["a cat on a sofa"], padding="max_length", max_length=77, return_tensors="pt"
    )
    with torch.no_grad():  # the mask makes transformers' text attention causal, as the checkpoint's is
        text = reference.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    text = getattr(text, "pooler_output", text).numpy()[0]
    scores = expected @ (text / np.linalg.norm(text))
    best = np.argsort(-scores)[:3]
    assert [h["path"] for h in hits] == [str(paths[i]) for i in best]
    np.testing.assert_allclose([h["score"] for h in hits], scores[best], atol=tol)

    # More like an indexed photo (by id): itself excluded, the others in transformers' order.
    result = cli("search", "--like", hits[0]["id"], "--db", db, "-k", "2", "--json")
    like = json.loads(result.stdout)
    row = paths.index(next(p for p in paths if str(p) == hits[0]["path"]))
    order = [str(paths[i]) for i in np.argsort(-(expected @ expected[row])) if i != row][:2]
    assert [h["path"] for h in like] == order

    result = cli("search", "a cat", "--db", db, "-k", "2")  # the human form: score, path
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2


def test_a_ctrl_c_keeps_what_was_indexed_and_says_so(lit, photos, tmp_path, monkeypatch):
    """In process (tests/test_interrupt.py sends real signals to `embed`): the files finished are committed,
    the line says how many, and the next run embeds only the others."""
    from aim_mlx.apps.library import index as indexing

    _, folder = lit
    db = tmp_path / "library.sqlite"
    embeddings = indexing.iter_embeddings

    def interrupted(*args, **kwargs):  # a Ctrl-C once three photos are embedded
        yield from islice(embeddings(*args, **kwargs), 3)
        raise KeyboardInterrupt

    monkeypatch.setattr(indexing, "iter_embeddings", interrupted)
    result = cli("index", photos, "--db", db, "-m", folder, "--batch-size", 8)
    assert result.exit_code == 130 and result.stdout == ""
    assert result.stderr == (
        "interrupted after 3 files; what was indexed is kept, run the command again to finish\n"
    )
    monkeypatch.undo()
    result, summary = index(folder, db, photos)
    assert result.exit_code == 0, result.output
    assert (summary["unchanged"], summary["new"], summary["embedded"]) == (3, 5, 5)


def test_reruns_touch_only_what_changed(lit, photos, tmp_path, monkeypatch):
    from aim_mlx.apps.library import index as indexing

    _, folder = lit
    db = tmp_path / "library.sqlite"
    assert index(folder, db, photos)[1]["embedded"] == 8
    opened = []
    read_facts = indexing.facts
    monkeypatch.setattr(indexing, "facts", lambda path, stat: opened.append(path) or read_facts(path, stat))
    loads = []

    def no_loading(*args):
        loads.append(args)
        raise AssertionError("a re-run with nothing to do loaded the model")

    monkeypatch.setattr(aim_mlx.loading, "fill", no_loading)
    result, summary = index(folder, db, photos)
    assert (summary["unchanged"], summary["embedded"], summary["reused"]) == (8, 0, 0)
    assert opened == [] and loads == []  # unchanged files are not even hashed, and no model is loaded
    monkeypatch.undo()

    (photos / "coffee_renamed.jpg").write_bytes((photos / "trip" / "coffee.jpg").read_bytes())
    (photos / "trip" / "coffee.jpg").unlink()  # renamed
    shutil.copy(photos / "astronaut.jpg", photos / "trip" / "astronaut_copy.jpg")  # copied
    Image.fromarray(skimage.data.horse()).convert("RGB").save(
        photos / "trip" / "rocket.jpg"
    )  # edited in place
    (photos / "camera.jpg").unlink()  # deleted
    result, summary = index(folder, db, photos)
    assert result.exit_code == 0, result.output
    assert summary == {
        **summary,
        "new": 2,
        "changed": 1,
        "embedded": 1,
        "reused": 2,
        "removed": 2,
        "unchanged": 5,
    }
    with Library(db) as library:
        (model_id,) = [m["id"] for m in library.models()]
        _, paths, matrix = library.vectors(model_id)
        assert sorted(paths) == sorted(map(str, walk([photos])))
        # the copy reuses the original's vector; vectors nobody uses are gone
        assert len({library.hashes(model_id)[i] for i in library.hashes(model_id)}) == 7
        assert library.conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == 7
    hits = json.loads(cli("search", "--image", photos / "trip" / "rocket.jpg", "--db", db, "--json").stdout)
    assert str(photos / "camera.jpg") not in [h["path"] for h in hits]

    result = cli("index", photos, "--db", db, "-m", folder, "--dry-run")
    assert result.exit_code == 0 and "would embed or reuse 0 new files" in result.stdout
    fresh = tmp_path / "fresh.sqlite"
    result = cli("index", photos, "--db", fresh, "-m", folder, "--dry-run")
    count = len(list(walk([photos])))
    assert result.exit_code == 0 and f"would embed or reuse {count} new files" in result.stdout
    assert not fresh.exists()  # a dry run creates nothing


def test_a_second_model_adds_its_own_vectors_and_search_never_mixes_them(lit, photos, tmp_path):
    _, folder = lit
    other = write_processor(write_lit_checkpoint(make_lit_reference(seed=12), tmp_path / "other"))
    db = tmp_path / "library.sqlite"
    index(folder, db, photos)
    assert index(other, db, photos)[1]["embedded"] == 8
    with Library(db) as library:
        assert [m["files"] for m in library.models()] == [8, 8]
    result = cli("search", "a cat", "--db", db)
    assert result.exit_code == 1 and "several models" in result.stderr and "-m" in result.stderr
    hits = {}
    for model in (folder, other):
        result = cli("search", "--image", photos / "astronaut.jpg", "--db", db, "-m", model, "--json")
        hits[model] = json.loads(result.stdout)
        assert hits[model][0]["path"] == str(photos / "astronaut.jpg")
    assert [h["score"] for h in hits[folder]] != [h["score"] for h in hits[other]]


def test_duplicates_groups_exact_and_near_copies(lit, photos, tmp_path):
    """Groups are the connected components of "cosine >= threshold" over transformers' embeddings, with the
    threshold set just under a resized, re-encoded copy's cosine to its original."""
    reference, folder = lit
    db = tmp_path / "library.sqlite"
    shutil.copy(photos / "astronaut.jpg", photos / "trip" / "astronaut_copy.jpg")
    Image.open(photos / "chelsea.jpg").resize((200, 150)).save(photos / "chelsea_small.jpg", quality=70)
    index(folder, db, photos)
    paths = sorted(walk([photos]), key=str)
    emb = reference_embeddings(reference, folder, paths)
    near = (paths.index(photos / "chelsea.jpg"), paths.index(photos / "chelsea_small.jpg"))
    threshold = float(emb[near[0]] @ emb[near[1]]) - 1e-4
    linked = emb @ emb.T >= threshold
    expected, seen = set(), set()
    for start in range(len(paths)):  # components by breadth-first search
        if start in seen:
            continue
        component, frontier = {start}, [start]
        while frontier:
            i = frontier.pop()
            for j in np.nonzero(linked[i])[0]:
                if j not in component:
                    component.add(j)
                    frontier.append(j)
        seen |= component
        if len(component) > 1:
            expected.add(frozenset(str(paths[i]) for i in component))

    result = cli("duplicates", "--db", db, "--threshold", f"{threshold:.6f}", "--json")
    assert result.exit_code == 0, result.output
    groups = json.loads(result.stdout)
    assert {frozenset(g["paths"]) for g in groups} == expected
    assert [len(g["paths"]) for g in groups] == sorted((len(g["paths"]) for g in groups), reverse=True)
    copies = frozenset({str(photos / "astronaut.jpg"), str(photos / "trip" / "astronaut_copy.jpg")})
    assert any(copies <= frozenset(g["paths"]) for g in groups)
    exact = [g["exact"] for g in groups if frozenset(g["paths"]) == copies]
    assert exact in ([True], [])  # the copy pair is exact unless something else joined its group
    assert any({str(paths[near[0]]), str(paths[near[1]])} <= set(g["paths"]) for g in groups)


SCRIPT = """
import sys
from aim_mlx.cli import main
sys.argv = ["aim-mlx", "index", sys.argv[1], "--db", sys.argv[2], "-m", sys.argv[3], "--batch-size", "2"]
main()
"""


def _files(db) -> int:
    """Rows in the library's files table, read as another process would (-1: no table yet)."""
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            return conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    except sqlite3.OperationalError:
        return -1


def test_a_run_killed_at_any_moment_leaves_a_valid_library_that_the_next_run_completes(lit, tmp_path):
    """SIGKILL as soon as the database appears, after 10 files, and mid-way through a re-run: each time the
    database passes SQLite's integrity check and holds no file without its vector; a last run completes it
    with every image exactly once."""
    _, folder = lit
    root = tmp_path / "many"
    root.mkdir()
    base = skimage.data.astronaut()
    total = 48
    for i in range(total):  # distinct contents, so that none is reused
        Image.fromarray(np.roll(base, 7 * i, axis=1)).save(root / f"{i:02d}.png")
    db = tmp_path / "library.sqlite"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for kill_at in (-1, 10, 30):
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(root), str(db), str(folder)], env=env)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if db.exists() and _files(db) >= kill_at:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = _files(db)
        assert done < total, f"the run finished before the kill (at {kill_at} files): nothing was tested"
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            if done >= 0:  # (killed before the schema was committed: an empty database, also valid)
                orphans = conn.execute(
                    "SELECT COUNT(*) FROM files f LEFT JOIN vectors v ON v.hash = f.hash WHERE v.hash IS NULL"
                ).fetchone()[0]
                assert orphans == 0  # no file without its vector
    result, summary = index(folder, db, root)
    assert result.exit_code == 0, result.output
    with Library(db) as library:
        assert library.check() == "ok"
        (model_id,) = [m["id"] for m in library.models()]
        _, paths, _ = library.vectors(model_id)
    assert sorted(paths) == sorted(str(root / f"{i:02d}.png") for i in range(total))  # each exactly once
    assert summary["unchanged"] == max(done, 0) and summary["embedded"] == total - max(done, 0)


def test_bad_libraries_and_queries_get_one_line(lit, photos, tmp_path):
    _, folder = lit
    db = tmp_path / "library.sqlite"
    result = cli("search", "a cat", "--db", db)
    assert result.exit_code == 1 and "no library here yet" in result.stderr and not db.exists()

    (tmp_path / "junk.sqlite").write_bytes(b"this is not sqlite" * 100)
    result = cli("search", "a cat", "--db", tmp_path / "junk.sqlite")
    assert result.exit_code == 1 and "not a readable library database" in result.stderr

    index(folder, db, photos / "astronaut.jpg")
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    result = cli("search", "a cat", "--db", db)
    assert result.exit_code == 1 and "newer aim-mlx" in result.stderr

    empty = tmp_path / "empty.sqlite"
    Library(empty).close()
    result = cli("search", "a cat", "--db", empty)
    assert result.exit_code == 1 and "holds no photos yet" in result.stderr

    result = cli("search", "--db", empty)
    assert result.exit_code == 1 and "give one query" in result.stderr
    result = cli("index", tmp_path / "nowhere", "--db", empty)
    assert result.exit_code == 1 and "no such file or folder" in result.stderr
    for line in (result.stderr,):
        assert len(line.strip().splitlines()) == 1


def test_heic_photos_are_indexed_and_found_and_without_the_plugin_named_in_one_line(
    lit, tmp_path, monkeypatch
):
    """An iPhone-style HEIC file (written by pillow-heif) is indexed like any photo, and a search with it
    finds itself first; without pillow-heif the file is skipped with the extra to install."""
    from aim_mlx.errors import ImageError
    from aim_mlx.inputs import images

    _, folder = lit
    assert images.heif_available()
    root = tmp_path / "iphone"
    root.mkdir()
    Image.fromarray(skimage.data.coffee()).save(root / "IMG_0001.HEIC", quality=90)
    Image.fromarray(skimage.data.astronaut()).save(root / "IMG_0002.heic", quality=90)
    Image.fromarray(skimage.data.rocket()).save(root / "IMG_0003.avif", quality=90)
    db = tmp_path / "library.sqlite"
    result, summary = index(folder, db, root)
    assert result.exit_code == 0 and summary["embedded"] == 3, result.output
    hits = json.loads(cli("search", "--image", root / "IMG_0001.HEIC", "--db", db, "--json").stdout)
    assert hits[0]["path"] == str(root / "IMG_0001.HEIC") and hits[0]["score"] == pytest.approx(1, abs=1e-4)

    monkeypatch.setattr(images, "_plugins", [False])
    monkeypatch.setattr(Image, "ID", [name for name in Image.ID if name != "HEIF"])  # as if never registered
    with pytest.raises(
        ImageError, match=r"IMG_0002.heic: reading HEIC/HEIF photos needs pillow-heif; pip install"
    ):
        images.load_image(root / "IMG_0002.heic")


@pytest.mark.parametrize("approx_from", [None, 0], ids=["exact", "int8-first-pass"])
def test_vector_search_matches_brute_force_numpy(approx_from):
    """Top-k (with a file left out, as "more like this" does) equals a float64 brute-force ranking; the int8
    first pass changes which rows are re-ranked, never their exact scores."""
    from aim_mlx.apps.library.search import Vectors

    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((5000, 64)).astype(np.float32)
    ids = np.arange(100, 5100)
    kwargs = {} if approx_from is None else {"approx_from": approx_from}
    vectors = Vectors(ids, [f"p{i}" for i in ids], matrix, **kwargs)
    assert (vectors.codes is not None) == (approx_from == 0)
    unit = matrix.astype(np.float64) / np.linalg.norm(matrix, axis=1, keepdims=True)
    for row in (0, 17, 4999):
        query = matrix[row] + 0.5 * rng.standard_normal(64).astype(np.float32)
        q = query / np.linalg.norm(query)
        scores = unit @ q
        scores[row] = -np.inf
        expected = np.argsort(-scores)[:10]
        hits = vectors.top_k(query, 10, exclude=int(ids[row]))
        assert [h.id for h in hits] == [int(ids[i]) for i in expected]
        np.testing.assert_allclose([h.score for h in hits], scores[expected], atol=1e-5)


def test_export_writes_the_vectors_with_their_paths(lit, photos, tmp_path):
    _, folder = lit
    db = tmp_path / "library.sqlite"
    index(folder, db, photos)
    out = tmp_path / "photos.npz"
    result = cli("export", "library", "-o", out, "--db", db)
    assert result.exit_code == 0 and "wrote 8 vectors" in result.stderr, result.output
    data = np.load(out)
    with Library(db) as library:
        ids, paths, matrix = library.vectors(library.models()[0]["id"])
    assert data["paths"].tolist() == paths and data["ids"].tolist() == ids.tolist()
    np.testing.assert_array_equal(data["embeddings"], matrix)
    assert str(data["model"]) == str(folder.resolve())
    # the library's vectors are what the model gives for the photos
    net, processor = aim_mlx.load(str(folder))
    expected = np.asarray(net.encode_image(processor(paths)))
    np.testing.assert_allclose(data["embeddings"], expected, atol=tolerance(net, 1e-5))  # other batch sizes

    assert cli("export", "library", "-o", out, "--db", db).exit_code == 1  # exists: --force
    result = cli("export", "library", "-o", tmp_path / "x.csv", "--db", db)
    assert result.exit_code == 1 and "name the file *.npz" in result.stderr


def test_a_library_locked_by_another_writer_is_one_line(tmp_path):
    from aim_mlx.apps.library.db import LibraryError

    db = tmp_path / "library.sqlite"
    Library(db).close()
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's index run, mid-transaction
    try:
        library = Library(db, timeout=0.1)  # opening an up-to-date library takes no lock
        locked = "is locked by another aim-mlx process; wait for it to finish"
        with pytest.raises(LibraryError, match=locked), library.transaction():
            pass
        assert library.check() == "ok"  # and reading goes on (WAL)
        library.close()
        result = cli("search", "a cat", "--db", db)  # searches read: the lock is no obstacle
        assert result.exit_code == 1 and "holds no photos yet" in result.stderr
    finally:
        other.execute("ROLLBACK")
        other.close()
