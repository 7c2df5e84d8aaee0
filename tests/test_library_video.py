"""Videos in the photo library (`aim-mlx index | search | serve`), on videos PyAV writes at test time from
scikit-image photos (tests/media.py: photo k fills seconds [k, k+1), so its scene's frame is at k seconds):
a search for a scene's photo finds the video once, at that scene's time, with the score transformers gives;
filters, re-runs, renames, deletion, the web page's poster and video, an older library brought forward, and
a run killed mid-way."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from io import BytesIO
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.data
from aim_mlx.apps.library import index as index_module
from aim_mlx.apps.library.db import Library
from aim_mlx.apps.library.web import create_app
from checkpoints import write_processor
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from media import write_video
from PIL import Image
from starlette.testclient import TestClient
from test_library import SCRIPT, cli, reference_embeddings

from aim_mlx.inputs.video import frame_name

SCENES = ["coffee", "chelsea", "coins"]  # the video's photos, one a second
STILLS = ["astronaut", "rocket", "camera"]  # photos beside it
SIZE = (320, 240)


def photo(name: str) -> np.ndarray:
    return np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))


def search(db, lit, *args, k=10):
    result = cli("search", *args, "--db", db, "-m", lit, "--json", "-k", k)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def lit(tmp_path_factory):
    reference = make_lit_reference(seed=11)
    return reference, write_processor(write_lit_checkpoint(reference, tmp_path_factory.mktemp("lit")))


@pytest.fixture
def library(lit, tmp_path):
    """Three photos and a three-scene video (created 2023-06-14) in two folders, indexed; and the scenes'
    photos at the video's size, outside the library, to search with."""
    root = tmp_path / "Pictures"
    (root / "clips").mkdir(parents=True)
    for name in STILLS:
        Image.fromarray(photo(name)).save(root / f"{name}.jpg", quality=92)
    video = write_video(root / "clips" / "walk.mp4", [photo(n) for n in SCENES], size=SIZE)
    queries = tmp_path / "queries"
    queries.mkdir()
    for name in SCENES:
        Image.fromarray(photo(name)).resize(SIZE).save(queries / f"{name}.png")
    db = tmp_path / "library.sqlite"
    result = cli("index", root, "--db", db, "-m", lit[1], "--json")
    assert result.exit_code == 0, result.output
    return SimpleNamespace(root=root, video=video, queries=queries, db=db, summary=json.loads(result.stdout))


def test_a_scenes_photo_finds_the_video_once_at_that_scene_with_transformers_score(lit, library):
    reference, folder = lit
    assert library.summary["new"] == 4 and library.summary["embedded"] == 4
    frames = [frame_name(library.video, t) for t in range(len(SCENES))]
    for k, name in enumerate(SCENES):
        query = library.queries / f"{name}.png"
        hits = search(library.db, folder, query)
        videos = [h for h in hits if h["kind"] == "video"]
        assert len(hits) == len(STILLS) + 1 and len(videos) == 1  # every file once: the video counts once
        (hit,) = videos
        assert hit["path"] == str(library.video) and hit["time"] == pytest.approx(k)
        assert hits[0] == hit  # its scene's photo finds it first
        expected = reference_embeddings(reference, folder, [query, *frames])
        scores = expected[1:] @ expected[0]
        assert int(np.argmax(scores)) == k
        assert hit["score"] == pytest.approx(float(scores[k]), abs=2e-3)
        assert all(h["kind"] == "photo" and h["time"] is None for h in hits if h is not hit)


def test_filters_apply_to_a_video_as_to_photos(lit, library):
    query = library.queries / "chelsea.png"
    (hit,) = search(library.db, lit[1], query, "--after", "2023-06", "--before", "2023-07")  # its creation
    assert hit["path"] == str(library.video) and hit["taken"].startswith("2023-06-14")
    assert search(library.db, lit[1], query, "--after", "2023-07") == []
    (hit,) = search(library.db, lit[1], query, "--in", library.root / "clips")
    assert hit["time"] == pytest.approx(1)
    assert len(search(library.db, lit[1], query, k=1)) == 1  # -k 1: one video, not its three frames
    like = search(library.db, lit[1], f"id:{hit['id']}")  # more like its frame: not the video again
    assert len(like) == len(STILLS) and all(h["kind"] == "photo" for h in like)
    assert search(library.db, lit[1], query, "--min-score", min(hit["score"] + 1e-3, 1)) == []


def test_reruns_skip_an_unchanged_video_reuse_a_renamed_one_and_forget_a_deleted_one(
    lit, library, monkeypatch
):
    def no_decoding(*args, **kwargs):
        raise AssertionError("a video was read again")

    monkeypatch.setattr(index_module, "frame_times", no_decoding)
    result = cli("index", library.root, "--db", library.db, "-m", lit[1], "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["unchanged"] == 4 and summary["embedded"] == summary["reused"] == summary["removed"] == 0

    monkeypatch.undo()
    write_video(library.video, [photo(n) for n in reversed(SCENES)], size=SIZE)  # edited: coins first
    result = cli("index", library.root, "--db", library.db, "-m", lit[1], "--json")
    summary = json.loads(result.stdout)
    assert (summary["changed"], summary["embedded"], summary["unchanged"]) == (1, 1, 3)
    with Library(library.db) as db:  # the old frames and their vectors are gone
        assert db.conn.execute("SELECT COUNT(*) FROM files WHERE video IS NOT NULL").fetchone()[0] == 3
        assert db.conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == len(STILLS) + 3
    monkeypatch.setattr(index_module, "frame_times", no_decoding)
    moved = library.video.rename(library.root / "walk.mp4")
    result = cli("index", library.root, "--db", library.db, "-m", lit[1], "--json")
    summary = json.loads(result.stdout)
    assert (summary["new"], summary["reused"], summary["removed"], summary["embedded"]) == (1, 1, 1, 0)
    (hit,) = search(library.db, lit[1], library.queries / "coins.png", "--after", "2023")
    assert hit["path"] == str(moved) and hit["time"] == pytest.approx(0)

    moved.unlink()
    result = cli("index", library.root, "--db", library.db, "-m", lit[1], "--json")
    assert json.loads(result.stdout)["removed"] == 1
    with Library(library.db) as db:
        assert db.conn.execute("SELECT COUNT(*) FROM files WHERE path LIKE '%.mp4%'").fetchone()[0] == 0
        assert db.conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == len(STILLS)  # frames pruned
        assert db.check() == "ok"


def test_duplicates_count_a_video_once_and_find_its_copy(lit, library):
    copy = library.root / "copy.mp4"
    shutil.copy(library.video, copy)
    result = cli("index", library.root, "--db", library.db, "-m", lit[1], "--json")
    assert json.loads(result.stdout)["reused"] == 1  # the copy's frames are the video's
    result = cli("duplicates", "--db", library.db, "-m", lit[1], "--json")
    (group,) = json.loads(result.stdout)  # its frames are not duplicates of each other
    assert sorted(group["paths"]) == sorted([str(library.video), str(copy)]) and group["exact"]
    result = cli("duplicates", "--db", library.db, "-m", lit[1], "--json", "--threshold", -1)
    (group,) = json.loads(result.stdout)  # everything linked: each file once, a video as itself
    expected = [str(library.root / f"{n}.jpg") for n in STILLS] + [str(library.video), str(copy)]
    assert sorted(group["paths"]) == sorted(expected) and not group["exact"]


def test_the_web_page_shows_the_frame_as_poster_and_serves_the_video_with_ranges(
    lit, library, tmp_path, monkeypatch
):
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    with TestClient(create_app(library.db), base_url="http://127.0.0.1") as client:
        assert client.get("/api/status").json()["photos"] == len(STILLS) + 1  # the video once, not 3 frames
        with open(library.queries / "chelsea.png", "rb") as f:
            found = client.post("/api/search/image", content=f.read()).json()["results"]
        (hit,) = [h for h in found if h["kind"] == "video"]
        assert hit["time"] == pytest.approx(1) and hit["name"] == "walk.mp4"
        thumb = client.get(f"/thumb/{hit['id']}")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        poster = Image.open(BytesIO(thumb.content))
        shown = np.asarray(poster.convert("RGB").resize(SIZE), np.float64)
        scores = [
            np.corrcoef(shown.ravel(), np.asarray(Image.fromarray(photo(n)).resize(SIZE)).ravel())[0, 1]
            for n in SCENES
        ]
        assert int(np.argmax(scores)) == 1 and scores[1] > 0.9, scores
        info = client.get(f"/api/photo/{hit['id']}").json()
        assert (info["kind"], info["path"], info["time"]) == ("video", str(library.video), pytest.approx(1))
        whole = client.get(f"/photo/{hit['id']}")
        assert whole.headers["content-type"] == "video/mp4" and whole.content == library.video.read_bytes()
        part = client.get(f"/photo/{hit['id']}", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == library.video.read_bytes()[100:200]


def test_a_library_of_the_schema_before_videos_is_brought_forward(lit, library):
    with sqlite3.connect(library.db) as conn:  # back to schema 2: no frames, no video columns
        conn.execute("DELETE FROM files WHERE path LIKE '%.mp4%'")
        conn.execute("DROP INDEX files_video")
        conn.execute("ALTER TABLE files DROP COLUMN video")
        conn.execute("ALTER TABLE files DROP COLUMN time")
        conn.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    result = cli("index", library.root, "--db", library.db, "-m", lit[1], "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["new"], summary["unchanged"], summary["embedded"]) == (1, 3, 1)
    (hit,) = search(library.db, lit[1], library.queries / "coins.png", "--in", library.root / "clips")
    assert hit["time"] == pytest.approx(2)


def _rows(db) -> int:
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            return conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    except sqlite3.OperationalError:
        return -1


def test_a_run_killed_mid_way_leaves_a_valid_library_with_whole_videos(lit, tmp_path):
    """SIGKILL once the first videos are committed: SQLite's integrity check passes, every video recorded
    has all its frames (with vectors); the next run indexes the rest, each video once."""
    folder = lit[1]
    root = tmp_path / "clips"
    root.mkdir()
    total = 10
    for i in range(total):  # distinct scenes, so that no video is a copy of another
        write_video(root / f"{i:02d}.mp4", [np.roll(photo(n), 11 * i, axis=1) for n in SCENES], fps=5)
    db = tmp_path / "library.sqlite"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(root), str(db), str(folder)], env=env)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and _rows(db) < 1:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        videos = conn.execute("SELECT id FROM files WHERE video IS NULL").fetchall()
        assert 0 < len(videos) < total, "the kill came before the first commit or after the last"
        for (video,) in videos:
            frames = conn.execute(
                "SELECT COUNT(*) FROM files f JOIN vectors v ON v.hash = f.hash WHERE f.video=?", (video,)
            ).fetchone()[0]
            assert frames == len(SCENES)
    done = len(videos)
    result = cli("index", root, "--db", db, "-m", folder, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["unchanged"], summary["embedded"]) == (done, total - done)
    with Library(db) as library:
        paths = [p for (p,) in library.conn.execute("SELECT path FROM files WHERE video IS NULL")]
        assert sorted(paths) == [str(root / f"{i:02d}.mp4") for i in range(total)]
        assert library.check() == "ok"


def test_the_page_plays_a_video_from_its_best_frame_in_chromium(lit, tmp_path):
    """A real `aim-mlx serve` and headless Chromium: an image search shows the video's card with its best
    frame's time; opened, the <video> has that frame as poster and starts at that time. (VP9 in WebM: what
    any Chromium build plays.)"""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    root = tmp_path / "Pictures"
    root.mkdir()
    Image.fromarray(photo("astronaut")).save(root / "astronaut.jpg")
    write_video(root / "walk.webm", [photo(n) for n in SCENES], size=SIZE, codec="libvpx-vp9")
    query = tmp_path / "chelsea.png"
    Image.fromarray(photo("chelsea")).resize(SIZE).save(query)
    db = tmp_path / "library.sqlite"
    assert cli("index", root, "--db", db, "-m", lit[1]).exit_code == 0
    env = {**os.environ, "AIM_MLX_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "aim_mlx", "serve", "--db", str(db), "--port", "0"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)
    browser = None
    try:
        line = next(line for line in process.stderr if line.startswith("serving "))
        url = line.split(" at ")[1].split()[0].rstrip("/")
        threading.Thread(target=process.stderr.read, daemon=True).start()  # its log never fills the pipe
        browser = webdriver.Chrome(options=options, service=Service(driver))
        browser.get(url + "/")
        until(browser, "document.getElementById('status').textContent.includes('indexed with')")
        browser.find_element(By.ID, "file").send_keys(str(query))
        until(browser, "window.aimTimings.length === 1")
        cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
        assert [c.get_attribute("title") for c in cards] == [
            str(root / "walk.webm"),
            str(root / "astronaut.jpg"),
        ]
        assert cards[0].text == f"{cards[0].text.split()[0]} · ▶ 0:01.0"
        cards[0].click()
        until(
            browser,
            "document.getElementById('viewer').open && document.getElementById('full-video').readyState >= 1",
        )
        video = browser.execute_script(
            "const v = document.getElementById('full-video'); "
            "return {hidden: v.hidden, img: document.getElementById('full').hidden, poster: v.poster, "
            "src: v.currentSrc, at: v.currentTime, duration: v.duration}"
        )
        assert video["hidden"] is False and video["img"] is True
        source, at = video["src"].split("#t=")
        assert source.startswith(url + "/photo/") and float(at) == pytest.approx(1)
        assert video["poster"] == source.replace("/photo/", "/thumb/")  # the best frame
        assert video["at"] == pytest.approx(1, abs=0.05) and video["duration"] == pytest.approx(3, abs=0.2)
        assert "video, best at 0:01.0" in browser.find_element(By.ID, "full-facts").text
    finally:
        if browser is not None:
            browser.quit()
        process.terminate()
        process.wait(timeout=15)


def until(browser, script, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if browser.execute_script(f"return {script}"):
            return
        time.sleep(0.05)
    raise AssertionError(
        f"timed out waiting for {script}; status: {browser.find_element('id', 'status').text}"
    )
