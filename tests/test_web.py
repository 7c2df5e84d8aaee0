"""The web app (`aim-mlx serve`, apps/library/web.py): its JSON API through Starlette's TestClient, compared
with `aim-mlx search` (itself compared with transformers in test_library.py); what it refuses to serve; and
the page end to end in a headless Chromium against a real `aim-mlx serve` process."""

import http.client
import json
import os
import queue
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from io import BytesIO
from types import SimpleNamespace

import pytest
import skimage.data
from aim_mlx.apps.library import web
from aim_mlx.apps.library.db import SCHEMA_VERSION, Library
from aim_mlx.apps.library.web import MAX_UPLOAD, THUMB_SIZE, create_app
from checkpoints import TINY, make_reference, write_checkpoint, write_processor
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from PIL import Image
from starlette.testclient import TestClient
from typer.testing import CliRunner

from aim_mlx.cli import app

runner = CliRunner()
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "coins"]
BASE = "http://127.0.0.1"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def save_photos(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(folder / f"{name}.jpg", quality=90)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Seven real photos, an identical copy of one and a TIFF (a format browsers cannot show), indexed with
    a tiny random-weight LiT checkpoint."""
    root = tmp_path_factory.mktemp("web")
    lit = write_processor(write_lit_checkpoint(make_lit_reference(seed=11), root / "lit"))
    photos = root / "Pictures"
    save_photos(photos, PHOTOS)
    (photos / "trip").mkdir()
    shutil.copy(photos / "coffee.jpg", photos / "trip" / "coffee copy.jpg")
    Image.fromarray(skimage.data.camera()).save(photos / "camera.tif")
    db = root / "library.sqlite"
    result = cli("index", photos, "--db", db, "-m", lit)
    assert result.exit_code == 0, result.output
    return SimpleNamespace(root=root, lit=lit, photos=photos, db=db)


@pytest.fixture
def client(library, tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    with TestClient(create_app(library.db), base_url=BASE) as client:
        yield client


def ids_by_name(client, library):
    """Each indexed photo's id by its path under the photos folder."""
    with Library(library.db) as db:
        rows = db.conn.execute("SELECT id, path FROM files").fetchall()
    return {os.path.relpath(path, library.photos): file_id for file_id, path in rows}


def search_cli(library, *args):
    result = cli("search", *args, "--db", library.db, "--json", "-k", "9")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def same_hits(api_hits, cli_hits):
    assert [(h["id"], h["path"]) for h in api_hits] == [(h["id"], h["path"]) for h in cli_hits]
    assert [h["score"] for h in api_hits] == pytest.approx([h["score"] for h in cli_hits], abs=1e-5)


def test_search_by_text_image_and_photo_answers_as_the_cli(client, library):
    response = client.get("/api/search", params={"q": "a cat on a sofa", "k": 9})
    assert response.status_code == 200, response.text
    hits = response.json()["results"]
    assert len(hits) == 9 and all(h["name"] == os.path.basename(h["path"]) for h in hits)
    same_hits(hits, search_cli(library, "a cat on a sofa"))

    query = library.photos / "chelsea.jpg"
    response = client.post("/api/search/image?k=9", content=query.read_bytes())
    hits = response.json()["results"]
    assert hits[0]["path"] == str(query) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    same_hits(hits, search_cli(library, "--image", query))

    like = ids_by_name(client, library)["rocket.jpg"]
    hits = client.get(f"/api/similar/{like}", params={"k": 9}).json()["results"]
    assert like not in [h["id"] for h in hits] and len(hits) == 8
    same_hits(hits, search_cli(library, "--like", like))


def test_status_photo_facts_and_duplicates(client, library):
    assert client.get("/api/status").json() == {"photos": 9, "model": str(library.lit), "text": True}
    ids = ids_by_name(client, library)
    facts = client.get(f"/api/photo/{ids['astronaut.jpg']}").json()
    assert facts["path"] == str(library.photos / "astronaut.jpg") and facts["name"] == "astronaut.jpg"
    assert (facts["width"], facts["height"]) == (512, 512) and facts["size"] > 0 and "taken" in facts
    groups = client.get("/api/duplicates").json()["groups"]
    exact = [g for g in groups if g["exact"]]
    assert [sorted(g["ids"]) for g in exact] == [sorted([ids["coffee.jpg"], ids["trip/coffee copy.jpg"]])]
    everything = client.get("/api/duplicates?threshold=-1").json()["groups"]  # every photo near every other
    assert [len(g["ids"]) for g in everything] == [9] and everything[0]["exact"] is False


def test_the_page_and_its_files_are_served_with_a_policy_against_other_origins(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/app.css"):
        assert client.get(asset).status_code == 200
    text = page.text + client.get("/static/app.js").text + client.get("/static/app.css").text
    assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_thumbnails_are_made_once_and_kept_by_content_hash(client, library, tmp_path, monkeypatch):
    decoded = []
    load = web.load_image
    monkeypatch.setattr(web, "load_image", lambda path: decoded.append(path) or load(path))
    ids = ids_by_name(client, library)
    first = client.get(f"/thumb/{ids['astronaut.jpg']}")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert max(Image.open(BytesIO(first.content)).size) == THUMB_SIZE
    second = client.get(f"/thumb/{ids['astronaut.jpg']}")
    copy = client.get(f"/thumb/{ids['trip/coffee copy.jpg']}")  # the same bytes as coffee.jpg...
    original = client.get(f"/thumb/{ids['coffee.jpg']}")  # ...share one thumbnail
    assert second.content == first.content and copy.content == original.content
    assert decoded == [
        str(library.photos / "astronaut.jpg"),
        str(library.photos / "trip" / "coffee copy.jpg"),
    ]
    cached = sorted(p.name for p in (tmp_path / "cache" / "thumbnails").iterdir())
    assert len(cached) == 2 and all(name.endswith(f"-{THUMB_SIZE}.jpg") for name in cached)


def test_photos_are_served_as_indexed_and_other_formats_as_jpeg(client, library):
    ids = ids_by_name(client, library)
    response = client.get(f"/photo/{ids['coins.jpg']}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == (library.photos / "coins.jpg").read_bytes()
    response = client.get(f"/photo/{ids['camera.tif']}")
    assert response.headers["content-type"] == "image/jpeg"
    assert Image.open(BytesIO(response.content)).size == Image.open(library.photos / "camera.tif").size


@pytest.mark.parametrize(
    "url",
    [
        "/photo/999999",
        "/thumb/0",
        "/api/photo/99999999999999999999999",
        "/api/similar/424242",
        "/photo/-1",
        "/photo/1.0",
        "/photo/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/thumb/%2e%2e",
        "/static/%2e%2e/web.py",
        "/static/..%2fweb.py",
        "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    ],
)
def test_unknown_ids_and_paths_are_404(client, url):
    response = client.get(url)
    assert response.status_code == 404
    assert b"root:" not in response.content and b"import" not in response.content


@pytest.mark.parametrize(
    "url, error",
    [
        ("/api/search", "no query; pass ?q=TEXT"),
        ("/api/search?q=%20", "no query; pass ?q=TEXT"),
        ("/api/search?q=cat&k=0", "k must be a whole number from 1 to 200, not '0'"),
        ("/api/search?q=cat&k=ten", "k must be a whole number from 1 to 200, not 'ten'"),
        ("/api/duplicates?threshold=2", "threshold must be a number from -1 to 1, not '2'"),
    ],
)
def test_bad_parameters_are_one_line_400s(client, url, error):
    response = client.get(url)
    assert response.status_code == 400 and response.json() == {"error": error}


def test_uploads_are_size_limited_and_decoded_safely(client, library):
    too_big = b"\xff" * (MAX_UPLOAD + 1)
    response = client.post("/api/search/image", content=too_big)
    assert response.status_code == 413 and response.json() == {
        "error": "the upload is over 20 MB; send a smaller image"
    }
    chunked = client.post("/api/search/image", content=iter([too_big[:MAX_UPLOAD], b"x"]))  # no length given
    assert chunked.status_code == 413

    response = client.post("/api/search/image", content=b"")
    assert response.status_code == 400 and "no image in the request" in response.json()["error"]
    response = client.post("/api/search/image", content=b"not an image")
    assert response.json() == {"error": "the upload: not an image file Pillow can read"}
    truncated = (library.photos / "coffee.jpg").read_bytes()[:3000]
    response = client.post("/api/search/image", content=truncated)
    assert response.status_code == 400 and response.json()["error"].startswith(
        "the upload: truncated or corrupt"
    )

    bomb = BytesIO()
    Image.new("1", (15000, 15000)).save(bomb, "PNG")  # 225 Mpx in a few hundred KB
    response = client.post("/api/search/image", content=bomb.getvalue())
    assert response.status_code == 400 and "decompression-bomb limit" in response.json()["error"]


def test_other_host_names_are_refused(client):
    """A page on another site that rebinds its name to 127.0.0.1 must not read the library (DNS rebinding)."""
    assert client.get("/api/status", headers={"host": "evil.example"}).status_code == 400
    for name in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert client.get("/api/status", headers={"host": name}).status_code == 200


def test_a_photo_gone_or_changed_on_disk_is_not_served(lit_library, tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    photos, db = lit_library
    with TestClient(create_app(db), base_url=BASE) as client:
        ids = {os.path.basename(h["path"]): h["id"] for h in client.get("/api/search?q=x").json()["results"]}
        assert client.get(f"/thumb/{ids['coffee.jpg']}").status_code == 200  # cached now
        (photos / "coffee.jpg").unlink()
        with (photos / "rocket.jpg").open("ab") as edited:
            edited.write(b"\0")
        for url in (f"/photo/{ids['coffee.jpg']}", f"/thumb/{ids['coffee.jpg']}"):
            response = client.get(url)
            assert response.status_code == 410
            assert (
                response.json()["error"]
                == f"photo {ids['coffee.jpg']} is no longer on disk; run `aim-mlx index`"
            )
        response = client.get(f"/photo/{ids['rocket.jpg']}")
        assert (
            response.status_code == 410 and "changed on disk since it was indexed" in response.json()["error"]
        )


@pytest.fixture
def lit_library(library, tmp_path):
    """A library of two photos of its own, for tests that change it."""
    photos = tmp_path / "Pictures"
    save_photos(photos, ["coffee", "rocket"])
    db = tmp_path / "library.sqlite"
    result = cli("index", photos, "--db", db, "-m", library.lit)
    assert result.exit_code == 0, result.output
    return photos, db


def test_searches_answer_during_an_index_run_and_see_what_it_committed(library, lit_library, monkeypatch):
    photos, db = lit_library
    loads = []
    load = web.load_model
    monkeypatch.setattr(web, "load_model", lambda entry: loads.append(entry) or load(entry))
    with TestClient(create_app(db), base_url=BASE) as client:
        assert client.get("/api/status").json()["photos"] == 2
        with Library(db) as writer:  # an index run's batch, not committed: readers neither wait nor see it
            writer.conn.execute("BEGIN IMMEDIATE")
            writer.conn.execute("DELETE FROM files")
            start = time.monotonic()
            response = client.get("/api/search?q=a+rocket")
            assert response.status_code == 200 and len(response.json()["results"]) == 2
            assert time.monotonic() - start < 5  # the write lock's timeout is 10 s
            writer.conn.execute("ROLLBACK")
        save_photos(photos / "more", ["astronaut", "chelsea"])
        assert cli("index", photos, "--db", db, "-m", library.lit).exit_code == 0
        assert client.get("/api/status").json()["photos"] == 4  # ...then the vectors are loaded again
        hits = client.get("/api/search?q=a+cat").json()["results"]
        assert {h["name"] for h in hits} == {"coffee.jpg", "rocket.jpg", "astronaut.jpg", "chelsea.jpg"}
    assert len(loads) == 1  # the model stays loaded across queries and reloads of the vectors


def test_a_vision_only_library_searches_by_image_and_says_why_not_by_text(tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    vision = write_processor(write_checkpoint(make_reference(seed=3, **TINY["large"]), tmp_path / "aimv2"))
    save_photos(tmp_path / "Pictures", ["coffee", "rocket"])
    db = tmp_path / "library.sqlite"
    assert cli("index", tmp_path / "Pictures", "--db", db, "-m", vision).exit_code == 0
    with TestClient(create_app(db), base_url=BASE) as client:
        assert client.get("/api/status").json()["text"] is False
        response = client.get("/api/search?q=a+cat")
        assert response.status_code == 400 and "\n" not in response.json()["error"]
        assert "search by text" in response.json()["error"] and "lit" in response.json()["error"]
        query = tmp_path / "Pictures" / "rocket.jpg"
        hits = client.post("/api/search/image", content=query.read_bytes()).json()["results"]
        assert [h["path"] for h in hits] == [str(query), str(tmp_path / "Pictures" / "coffee.jpg")]


def test_a_database_the_server_cannot_read_is_one_line(tmp_path):
    not_ours = tmp_path / "other.sqlite"
    with sqlite3.connect(not_ours) as conn:
        conn.execute("CREATE TABLE t (x)")
    newer = tmp_path / "newer.sqlite"
    Library(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    (tmp_path / "junk.sqlite").write_bytes(b"x" * 4096)
    for name, message in [
        ("other.sqlite", "is an SQLite database but not an aim-mlx library"),
        (
            "newer.sqlite",
            f"newer aim-mlx (schema 99, this one reads up to {SCHEMA_VERSION}); upgrade aim-mlx",
        ),
        ("junk.sqlite", "is not a readable library database"),
    ]:
        result = cli("serve", "--db", tmp_path / name, "--port", "0")
        assert result.exit_code == 1 and result.stderr.startswith(f"error: {tmp_path / name}")
        assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_serve_says_what_is_wrong_in_one_line(tmp_path, monkeypatch):
    Library(tmp_path / "empty.sqlite").close()
    result = cli("serve", "--db", tmp_path / "empty.sqlite", "--port", "0")
    assert result.exit_code == 1
    assert (
        result.stderr
        == f"error: {tmp_path / 'empty.sqlite'} holds no photos yet; run `aim-mlx index FOLDER` first\n"
    )

    result = cli("serve", "--db", tmp_path / "none.sqlite", "--port", "0")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'none.sqlite'}: no library here yet; run `aim-mlx index FOLDER` first"
    ]

    result = cli("serve", "--db", tmp_path / "none.sqlite", "--port", "0", "--host", "0.0.0.0")
    warning, error = result.stderr.splitlines()
    assert warning.startswith("warning: listening on 0.0.0.0: anyone who can reach this machine on port 0")
    assert error.startswith("error: ")

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "--db", tmp_path / "none.sqlite", "--port", port)
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1 port {port}: Address already in use")

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    result = cli("serve", "--db", tmp_path / "none.sqlite")
    assert result.exit_code == 1
    assert result.stderr == "error: uvicorn is not installed; pip install 'aim-mlx[library]'\n"


# End to end: a real `aim-mlx serve` and a real browser.


@contextmanager
def serving(db, cache, photos):
    """`aim-mlx serve --port 0` on `db` in a subprocess: its URL once it says it serves `photos` photos."""
    env = {**os.environ, "AIM_MLX_CACHE": str(cache)}
    command = [sys.executable, "-m", "aim_mlx", "serve", "--db", str(db), "--port", "0"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        line = lines.get(timeout=120)
        assert line.startswith(f"serving {photos} photos at http://127.0.0.1:"), line
        yield line.split(" at ")[1].split()[0].rstrip("/")
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(library, tmp_path_factory):
    """The module's library served; stopped after the module's tests."""
    with serving(library.db, tmp_path_factory.mktemp("cache"), 9) as url:
        yield url


@pytest.mark.parametrize(
    "raw",
    [
        "/photo/../../etc/passwd",
        "/thumb/..",
        "/static/../web.py",
        "/static/../../../../../../etc/passwd",
        "/../db.py",
    ],
)
def test_path_traversal_sent_as_it_is_is_refused(server, raw):
    """http.client sends the path unnormalised, as an attacker would (a browser or httpx removes the dots)."""
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", raw)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == 404 and b"root:" not in body and b"import" not in body


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(driver))
    browser.set_page_load_timeout(60)
    yield browser
    browser.quit()


def wait(browser, script, timeout=60):
    """Poll a JavaScript expression until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = browser.execute_script(f"return {script}")
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(
        f"timed out waiting for {script}; status: {browser.find_element('id', 'status').text}"
    )


def test_the_page_in_chromium_search_view_more_like_this_duplicates(browser, server, library, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    wait(browser, "document.getElementById('status').textContent.includes('photos, indexed with')")
    searches = "window.aimTimings.length"

    browser.find_element(By.ID, "q").send_keys("a cat on a sofa")
    timing = wait(browser, "window.aimTimings[0]")
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    assert len(cards) == 9
    assert wait(browser, "[...document.querySelectorAll('#results img')].every(i => i.naturalWidth > 0)")
    print(
        f"\nquery -> results painted: {timing['paintMs']:.0f} ms (answer {timing['fetchMs']:.0f} ms, "
        f"every thumbnail decoded {timing['imagesMs']:.0f} ms)"
    )
    browser.save_screenshot(str(tmp_path / "results.png"))
    if os.environ.get("AIM_MLX_SCREENSHOT"):  # the README's picture
        bottom = browser.execute_script(
            "return document.getElementById('results').getBoundingClientRect().bottom"
        )
        save_small(browser.get_screenshot_as_png(), os.environ["AIM_MLX_SCREENSHOT"], int(bottom) + 16)

    # Keys: Down from the box into the grid, arrows across and down a row, Enter opens, Esc closes, Esc again
    # leaves the grid. A row holds as many 10rem (150 px) cells, .5rem gaps between, as the grid's width fits.
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    def press(*keys):
        ActionChains(browser).send_keys(*keys).perform()

    def focused():
        return browser.execute_script(
            "return [...document.querySelectorAll('#results .card')].indexOf(document.activeElement)"
        )

    width = browser.execute_script("return document.getElementById('results').getBoundingClientRect().width")
    columns = int((width + 7.5) // 157.5)
    assert 2 <= columns < 9
    press(Keys.ARROW_DOWN)
    assert focused() == 0
    press(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_LEFT)
    assert focused() == 1
    press(Keys.ARROW_DOWN)
    assert focused() == 1 + columns
    assert browser.execute_script("return document.activeElement.matches(':focus-visible')")
    press(Keys.ARROW_DOWN)  # no row below: the focus stays
    assert focused() == (1 + columns if 1 + 2 * columns >= 9 else 1 + 2 * columns)
    at = focused()
    press(Keys.ENTER)
    wait(browser, "document.getElementById('viewer').open")
    assert browser.find_element(By.ID, "full-path").text == cards[at].get_attribute("title")
    press(Keys.ESCAPE)
    wait(browser, "!document.getElementById('viewer').open")
    assert focused() == at  # the dialog gives the focus back to the card it opened from
    press(Keys.ESCAPE)
    assert focused() == -1 and browser.execute_script("return document.activeElement === document.body")
    assert searches and browser.execute_script(f"return {searches}") == 1  # no key searched again

    first = cards[0].get_attribute("title")
    cards[0].click()
    wait(
        browser, "document.getElementById('viewer').open && document.getElementById('full').naturalWidth > 0"
    )
    assert browser.find_element(By.ID, "full-path").text == first
    assert browser.find_element(By.ID, "full-facts").text.startswith("No capture date · ")
    browser.save_screenshot(str(tmp_path / "photo.png"))
    browser.find_element(By.ID, "more").click()
    wait(browser, f"{searches} === 2")
    titles = [c.get_attribute("title") for c in browser.find_elements(By.CSS_SELECTOR, "#results .card")]
    assert len(titles) == 8 and first not in titles
    # "More like this" keeps the text: the photo's id term and the text's, as the API answers them.
    status = browser.find_element(By.ID, "status").text
    assert status.startswith(f"8 photos like {os.path.basename(first)} and “a cat on a sofa”")
    assert browser.find_element(By.ID, "image-name").text == f"photo {os.path.basename(first)}"
    like = int(browser.execute_script("return new URLSearchParams(location.hash.slice(1)).get('like')"))
    both = api_get(server, f"/api/similar/{like}?q=a+cat+on+a+sofa")
    alone = api_get(server, f"/api/similar/{like}")
    assert titles == [h["path"] for h in both] != [h["path"] for h in alone]
    browser.find_element(By.ID, "q").send_keys(" -coins")  # more text: the photo stays a term
    wait(browser, f"{searches} === 3")
    titles = [c.get_attribute("title") for c in browser.find_elements(By.CSS_SELECTOR, "#results .card")]
    assert titles == [h["path"] for h in api_get(server, f"/api/similar/{like}?q=a+cat+on+a+sofa+-coins")]

    browser.find_element(By.ID, "file").send_keys(str(library.photos / "rocket.jpg"))  # pick an image
    wait(browser, f"{searches} === 4")
    assert browser.find_element(By.CSS_SELECTOR, "#results .card").get_attribute("title") == str(
        library.photos / "rocket.jpg"
    )

    browser.find_element(By.ID, "show-duplicates").click()
    wait(browser, "document.querySelector('#duplicates h2')")
    assert browser.find_element(By.CSS_SELECTOR, "#duplicates h2").text == "2 photos, identical"

    origin = browser.execute_script("return location.origin")
    requested = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert requested and all(url.startswith(origin + "/") for url in requested)

    browser.set_window_size(390, 844)  # a phone
    browser.find_element(By.ID, "q").clear()
    browser.find_element(By.ID, "q").send_keys("coins")
    wait(browser, f"{searches} === 5")
    assert browser.execute_script("return document.documentElement.scrollWidth <= innerWidth")
    browser.save_screenshot(str(tmp_path / "phone.png"))
    browser.set_window_size(1280, 860)

    # The image picked stays a term beside the text until its x clears it.
    assert browser.find_element(By.ID, "status").text.startswith("9 photos like rocket.jpg and “coins”")
    browser.find_element(By.ID, "image-clear").click()
    wait(browser, f"{searches} === 6")
    assert browser.find_element(By.ID, "status").text.startswith("9 photos for “coins”")
    assert not browser.find_element(By.ID, "image-term").is_displayed()

    # A folder filter searches again, among that folder's photos only; Clear lifts it.
    browser.find_element(By.ID, "in").send_keys(str(library.photos / "trip"))
    wait(browser, f"{searches} === 7")
    titles = [c.get_attribute("title") for c in browser.find_elements(By.CSS_SELECTOR, "#results .card")]
    assert titles == [str(library.photos / "trip" / "coffee copy.jpg")]
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=reset]").click()
    wait(browser, f"{searches} === 8")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results .card")) == 9


def test_the_page_in_chromium_sorts_by_date_under_day_headings(browser, library, tmp_path):
    """Sorted by date: newest first, a heading per capture day, photos with no date last under "no date"; the
    arrow keys follow the short rows."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    photos = tmp_path / "Pictures"
    save_photos(photos, ["chelsea"])  # no EXIF date
    for name, taken in [
        ("coffee", "2023:06:14 08:00:00"),
        ("rocket", "2023:06:14 19:30:00"),
        ("astronaut", "2021:01:02 10:00:00"),
    ]:
        exif = Image.Exif()
        exif.get_ifd(0x8769)[36867] = taken  # DateTimeOriginal
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(photos / f"{name}.jpg", exif=exif)
    db = tmp_path / "library.sqlite"
    assert cli("index", photos, "--db", db, "-m", library.lit).exit_code == 0
    with serving(db, tmp_path / "cache", 4) as url:
        browser.get(url + "/")
        wait(browser, "document.getElementById('status').textContent.includes('photos, indexed with')")
        browser.find_element(By.ID, "q").send_keys("a photo")
        wait(browser, "window.aimTimings.length === 1")
        by_score = [
            c.get_attribute("title") for c in browser.find_elements(By.CSS_SELECTOR, "#results .card")
        ]
        assert by_score == [h["path"] for h in api_get(url, "/api/search?q=a+photo")]
        Select(browser.find_element(By.ID, "sort")).select_by_value("date")
        shown = browser.execute_script(
            "return [...document.getElementById('results').children].map(e => e.title || e.textContent)"
        )
        assert shown == [
            "2023-06-14",
            str(photos / "rocket.jpg"),
            str(photos / "coffee.jpg"),
            "2021-01-02",
            str(photos / "astronaut.jpg"),
            "no date",
            str(photos / "chelsea.jpg"),
        ]
        focused = "document.activeElement.title"
        browser.find_element(By.ID, "q").click()
        ActionChains(browser).send_keys(Keys.ARROW_DOWN, Keys.ARROW_RIGHT).perform()
        assert browser.execute_script(f"return {focused}") == str(photos / "coffee.jpg")
        ActionChains(browser).send_keys(Keys.ARROW_DOWN).perform()  # the next row holds one photo
        assert browser.execute_script(f"return {focused}") == str(photos / "astronaut.jpg")
        Select(browser.find_element(By.ID, "sort")).select_by_value("score")
        titles = [c.get_attribute("title") for c in browser.find_elements(By.CSS_SELECTOR, "#results .card")]
        assert titles == by_score and not browser.find_elements(By.CSS_SELECTOR, "#results h2")


def api_get(server, path):
    with urllib.request.urlopen(server + path, timeout=30) as response:
        return json.load(response)["results"]


def save_small(png: bytes, path: str, bottom: int) -> None:
    """A screenshot small enough for a README: cut below the results, in 128 colours."""
    image = Image.open(BytesIO(png)).convert("RGB")
    image.crop((0, 0, image.width, min(bottom, image.height))).quantize(128).save(path, optimize=True)
