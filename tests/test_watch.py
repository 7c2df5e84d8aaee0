"""`aim-mlx index --watch` (apps/library/watch.py) on real filesystem events in a tmp folder, with real photos
and the tiny random-weight LiT checkpoint of tests/test_library.py: a new photo, a file written slowly, a
burst, a move, a delete, then the command itself killed mid-burst and interrupted. Every wait has a deadline;
the watcher runs in a thread with a stop event, or in a subprocess that is killed at the end."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from aim_mlx.apps.library import watch as library_watch
from aim_mlx.apps.library.db import Library
from checkpoints import write_processor
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from PIL import Image
from typer.testing import CliRunner

import aim_mlx.loading
from aim_mlx.cli import app

PHOTOS = [
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
]
FAST = dict(debounce=0.3, settle=0.3)  # seconds: short, but longer than the gaps between a burst's events


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def lit(tmp_path_factory):
    return write_processor(write_lit_checkpoint(make_lit_reference(seed=11), tmp_path_factory.mktemp("lit")))


def photo(name: str, size: int | None = None) -> Image.Image:
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    if size:
        image.thumbnail((size, size))
    return image


@pytest.fixture
def root(tmp_path):
    """Three photos, and a library's folder kept apart from them."""
    folder = tmp_path / "Pictures"
    (folder / "trip").mkdir(parents=True)
    for name in PHOTOS[:3]:
        photo(name).save(folder / f"{name}.jpg", quality=92)
    return folder


def vectors(db: Path) -> dict[str, np.ndarray]:
    with Library.reader(db) as library:
        _, paths, matrix = library.vectors(library.models()[0]["id"])
    return dict(zip(paths, matrix, strict=True))


def indexed_alone(lit: Path, path: Path, tmp_path: Path) -> np.ndarray:
    """`path`'s vector as a plain `aim-mlx index` of it gives it, in a library of its own."""
    db = tmp_path / f"alone-{path.name}.sqlite"
    result = cli("index", path, "--db", db, "-m", lit)
    assert result.exit_code == 0, result.output
    return vectors(db)[str(path)]


class Watcher:
    """watch() on a thread: its batches as they come and its model loads counted; stopped at the end."""

    def __init__(self, lit: Path, root: Path, db: Path, **options):
        self.batches: list[tuple] = []
        self.loads = 0
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

        def load(*args, **kwargs):
            self.loads += 1
            return aim_mlx.loading.load(*args, **kwargs)

        def run():
            try:
                self.totals = library_watch.watch(
                    [root],
                    db,
                    str(lit),
                    batch_size=4,
                    on_batch=lambda s, f: self.batches.append((s, f)),
                    stop_event=self.stop_event,
                    load=load,
                    **{**FAST, **options},
                )
            except BaseException as exc:  # noqa: BLE001  (re-raised on the test's thread)
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        self.wait(1)  # the first batch, the whole folder's run: the watcher is started before it

    def wait(self, count: int, timeout: float = 30) -> list:
        """The summaries once there are `count` batches in all (failing after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while len(self.batches) < count:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"{len(self.batches)} batches, not {count}: {self.batches}"
            time.sleep(0.02)
        return [s for s, _ in self.batches]

    def quiet(self, seconds: float) -> None:
        """No further batch comes in `seconds`."""
        before = len(self.batches)
        time.sleep(seconds)
        assert len(self.batches) == before, self.batches[before:]

    def stop(self) -> library_watch.Totals:
        self.stop_event.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the watcher did not stop within 10 s of its stop event"
        assert self.error is None, self.error
        return self.totals


@pytest.fixture
def watcher(lit, root, tmp_path):
    started = []

    def start(db: Path | None = None, **options) -> Watcher:
        started.append(Watcher(lit, root, db or tmp_path / "library.sqlite", **options))
        return started[-1]

    yield start
    for w in started:
        w.stop_event.set()
        w.thread.join(timeout=10)


def test_a_new_photo_and_one_written_slowly_are_each_embedded_once_whole(lit, root, tmp_path, watcher):
    w = watcher(debounce=0.1, settle=0.6)  # the settle wait alone must hold the slow file back
    first = w.wait(1)[0]
    assert (first.new, first.embedded) == (3, 3)

    new = root / "trip" / "rocket.jpg"
    photo("rocket").save(new, quality=92)
    summary = w.wait(2)[1]
    assert (summary.new, summary.embedded, summary.failed) == (1, 1, [])
    np.testing.assert_allclose(
        vectors(tmp_path / "library.sqlite")[str(new)], indexed_alone(lit, new, tmp_path), atol=1e-5
    )

    # Written in eight chunks 0.25 s apart, longer than `debounce` but not `settle`: read once, whole.
    full = tmp_path / "camera.jpg"
    photo("camera").save(full, quality=92)
    data = full.read_bytes()
    slow = root / "camera.jpg"
    with open(slow, "wb") as f:
        for i in range(8):
            f.write(data[i * len(data) // 8 : (i + 1) * len(data) // 8])
            f.flush()
            time.sleep(0.25)
    summaries = w.wait(3)[2:]
    w.quiet(1.0)  # and no second batch for it
    summaries = [s for s, _ in w.batches[2:]]
    assert sum(s.embedded for s in summaries) == 1 and not any(s.failed for s in summaries), summaries
    np.testing.assert_allclose(
        vectors(tmp_path / "library.sqlite")[str(slow)], indexed_alone(lit, full, tmp_path), atol=1e-5
    )
    assert w.stop().batches == 3 and w.loads == 1  # one model for every batch


def test_a_burst_of_30_copies_is_one_or_two_batches(root, tmp_path, watcher):
    w = watcher()
    source = tmp_path / "coins.jpg"
    photo("coins").save(source, quality=92)
    (root / "import").mkdir()
    for i in range(30):  # a camera import: a file every 10 ms
        shutil.copy(source, root / "import" / f"IMG_{i:04d}.jpg")
        time.sleep(0.01)
    deadline = time.monotonic() + 30
    while len([p for p in vectors(tmp_path / "library.sqlite") if "/import/" in p]) < 30:
        assert time.monotonic() < deadline, w.batches
        time.sleep(0.05)
    w.quiet(1.0)
    burst = [s for s, _ in w.batches[1:]]
    assert 1 <= len(burst) <= 2, burst
    assert (
        sum(s.new for s in burst) == 30 and sum(s.embedded for s in burst) == 1
    )  # one content: reused 29 times
    assert sum(s.reused for s in burst) == 29
    w.stop()


def test_a_move_reuses_its_vector_and_a_delete_leaves_search(lit, root, tmp_path, watcher, monkeypatch):
    from aim_mlx.apps.library.web import create_app
    from starlette.testclient import TestClient

    db = root / "library.sqlite"  # in the folder watched: its writes must start no batch
    w = watcher(db)
    before = vectors(db)
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    with TestClient(create_app(db), base_url="http://127.0.0.1") as server:  # serving all along
        assert server.get("/api/status").json()["photos"] == 3
        moved = root / "trip" / "my coffee.jpg"
        (root / "coffee.jpg").rename(moved)
        summary = w.wait(2)[1]
        assert (summary.new, summary.embedded, summary.reused, summary.removed) == (1, 0, 1, 1)
        after = vectors(db)
        assert str(root / "coffee.jpg") not in after
        np.testing.assert_array_equal(after[str(moved)], before[str(root / "coffee.jpg")])

        (root / "chelsea.jpg").unlink()
        summary = w.wait(3)[2]
        assert (summary.removed, summary.embedded) == (1, 0)
        result = cli("search", "a cat", "--db", db, "-m", lit, "-k", "10", "--json")
        assert result.exit_code == 0, result.output
        left = sorted([str(root / "astronaut.jpg"), str(moved)])
        assert sorted(h["path"] for h in json.loads(result.stdout)) == left
        hits = server.get("/api/search?q=a+cat").json()["results"]  # the web page sees it without a restart
        assert sorted(h["name"] for h in hits) == ["astronaut.jpg", "my coffee.jpg"]

    # Nor do hidden files and other kinds of file.
    (root / ".cache").mkdir()
    photo("rocket").save(root / ".cache" / "thumb.jpg")
    (root / "notes.txt").write_text("not a photo")
    w.quiet(1.0)
    assert w.stop().batches == 3


def start_watching(lit: Path, root: Path, db: Path) -> tuple[subprocess.Popen, list[str], list[str]]:
    """`python -m aim_mlx index ROOT --watch --json`, its stdout and stderr lines gathered as they come."""
    command = [sys.executable, "-m", "aim_mlx", "index", str(root), "--watch", "--json", "--db", str(db)]
    command += ["-m", str(lit), "--batch-size", "1", "--debounce-ms", "300", "--settle-ms", "300"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out: list[str] = []
    err: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    return proc, out, err


def wait_for_lines(proc, out: list[str], err: list[str], count: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(out) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{len(out)} batch lines, not {count}; stderr: {''.join(err)}")
        time.sleep(0.02)
    return [json.loads(line) for line in out]


def test_killed_mid_burst_the_library_is_valid_and_a_plain_run_completes_it(lit, root, tmp_path):
    db = tmp_path / "library.sqlite"
    staging = tmp_path / "card"
    staging.mkdir()
    for i in range(30):  # 30 different photos, so that each one runs through the model
        photo(PHOTOS[i % len(PHOTOS)], 96 + 4 * i).save(staging / f"DSC_{i:04d}.jpg")
    proc, out, err = start_watching(lit, root, db)
    try:
        assert wait_for_lines(proc, out, err, 1)[0]["new"] == 3
        for path in sorted(staging.iterdir()):
            shutil.copy(path, root / "trip" / path.name)
        deadline = time.monotonic() + 60
        count = 3
        while count < 5:  # some of the burst committed (a batch of one file at a time), not all
            assert proc.poll() is None and time.monotonic() < deadline, "".join(err)
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
                count = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        kept = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    assert kept < 33, "the burst was finished before the kill: kill it sooner"

    result = cli("index", root, "--db", db, "-m", lit, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["new"] + summary["changed"] == 33 - kept and summary["unchanged"] == kept
    with sqlite3.connect(db) as conn:
        paths = [p for (p,) in conn.execute("SELECT path FROM files")]
    assert sorted(paths) == sorted({*map(str, root.glob("*.jpg")), *map(str, (root / "trip").glob("*.jpg"))})


def test_ctrl_c_exits_130_saying_what_the_watcher_did(lit, root, tmp_path):
    proc, out, err = start_watching(lit, root, tmp_path / "library.sqlite")
    try:
        wait_for_lines(proc, out, err, 1)
        photo("rocket").save(root / "trip" / "rocket.jpg")
        line = wait_for_lines(proc, out, err, 2)[1]
        assert (line["new"], line["embedded"], line["folders"]) == (1, 1, [str(root / "trip")])
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    time.sleep(0.1)  # the reader threads drain the pipes
    assert code == 130, "".join(err)
    said = [line for line in err if line.strip()]
    assert said == [
        "interrupted after 2 batches (4 new files, 0 changed (4 embedded, 0 reused), 0 removed, 0 failed); "
        f"library {tmp_path / 'library.sqlite'}\n"
    ], said


def test_watch_refuses_a_file_and_a_missing_folder_in_one_line(lit, root, tmp_path):
    db = tmp_path / "library.sqlite"
    result = cli("index", root / "coffee.jpg", "--watch", "--db", db, "-m", lit)
    assert result.exit_code == 1 and result.stderr.strip().endswith(
        "--watch follows folders; name the folder that holds it"
    ), result.output
    result = cli("index", tmp_path / "nowhere", "--watch", "--db", db, "-m", lit)
    assert (
        result.exit_code == 1
        and result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such file or folder"
    )
    result = cli("index", root, "--watch", "--dry-run", "--db", db, "-m", lit)
    assert result.exit_code == 1, result.output
    assert result.stderr == "error: --watch and --dry-run: choose one\n"
    assert not db.exists()
