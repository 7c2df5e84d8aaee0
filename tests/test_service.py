"""The embeddings service (apps/service, `aim-mlx serve`) through the clients people point at it: the official
`openai` client, LangChain's OpenAIEmbeddings and chromadb's OpenAI embedding function, against a real uvicorn
server on 127.0.0.1. Answers are compared with the Python API's encode_text / encode_image (themselves
compared with transformers in test_lit.py) on scikit-image photos, with tiny random-weight checkpoints.
"""

import base64
import http.client
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from io import BytesIO
from types import SimpleNamespace

import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest
import skimage.data
import uvicorn
from aim_mlx.apps.service.app import create_app
from aim_mlx.apps.service.models import Models
from aim_mlx.apps.service.server import build
from checkpoints import TINY, make_reference, write_checkpoint, write_processor
from fakehub import add_folder
from huggingface_hub import constants
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from PIL import Image
from starlette.testclient import TestClient
from typer.testing import CliRunner

import aim_mlx
from aim_mlx.checkpoints.variants import DEFAULT_TEXT_MODEL, PINNED_REVISIONS
from aim_mlx.cli import app as cli_app

LIT = DEFAULT_TEXT_MODEL
SHORT = LIT.split("/")[1]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "coins"]
TEXTS = ["a photo of a cat", "a rocket on its launch pad", "un café très noir", "coins"]
MAX_ITEMS, MAX_BODY = 16, 2 * 2**20


@pytest.fixture(scope="module")
def offline():
    """Connections only to loopback addresses; any other is refused and recorded (the test then fails)."""
    elsewhere = []
    connect = socket.socket.connect

    def loopback_only(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            elsewhere.append(address)
            raise OSError("a connection off this machine in a test")
        return connect(sock, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", loopback_only)
        yield elsewhere
    assert not elsewhere, f"connected off the machine: {elsewhere}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory, offline):
    """A tiny LiT checkpoint cached as the hub's LiT repo, a tiny vision-only AIMv2 folder, and photos."""
    root = tmp_path_factory.mktemp("service")
    lit = write_processor(write_lit_checkpoint(make_lit_reference(seed=5), root / "lit"))
    vision = write_processor(write_checkpoint(make_reference(seed=6, **TINY["large"]), root / "aimv2"))
    cache = root / "hf" / "hub"
    cache.mkdir(parents=True)
    add_folder(cache, LIT, PINNED_REVISIONS[SHORT], lit)
    photos = {}
    for name in PHOTOS:
        out = BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(out, "JPEG", quality=90)
        photos[name] = root / f"{name}.jpg"
        photos[name].write_bytes(out.getvalue())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield SimpleNamespace(root=root, lit=lit, vision=vision, photos=photos)


@pytest.fixture(scope="module")
def reference(hub):
    """What the Python API gives: each text's and each photo's embedding."""
    model, processor = aim_mlx.load(str(hub.lit))
    texts = np.asarray(model.encode_text(TEXTS).astype(mx.float32))
    images = {
        name: np.asarray(model.encode_image(processor([path])).astype(mx.float32))[0]
        for name, path in hub.photos.items()
    }
    vision, vision_processor = aim_mlx.load(str(hub.vision))
    pooled = np.asarray(vision.encode_image(vision_processor([hub.photos["rocket"]])).astype(mx.float32))[0]
    return SimpleNamespace(text=dict(zip(TEXTS, texts, strict=True)), image=images, vision=pooled)


@contextmanager
def running(app):
    """`app` on a real uvicorn server on 127.0.0.1 (a free port) in a thread: its base URL."""
    with started(app) as (url, _):
        yield url


@contextmanager
def started(app):
    """As `running`: the base URL and the uvicorn server."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(30)
        listener.close()


class Gate:
    """A loader whose models' forward passes wait while the gate is shut: tests hold a batch in the model."""

    def __init__(self):
        self.open, self.entered = threading.Event(), threading.Event()
        self.open.set()

    def load(self, spec):
        model, processor = aim_mlx.load(spec)
        for name in ("encode_image", "encode_text"):
            forward = getattr(model, name)

            def gated(x, forward=forward):
                self.entered.set()
                assert self.open.wait(30), "the gate stayed shut"
                return forward(x)

            setattr(model, name, gated)
        return model, processor


@pytest.fixture(scope="module")
def server(hub):
    """The hub's LiT and the vision-only folder; batches of 4, at most 16 inputs and 2 MB a request."""
    models = Models([LIT, str(hub.vision)], batch_size=4, wait=0.01, capacity=64)
    with running(create_app(models, max_items=MAX_ITEMS, max_body=MAX_BODY)) as url:
        yield url


@pytest.fixture(scope="module")
def gated(hub):
    """The LiT alone behind a Gate; room for 6 inputs in all, batches of 4."""
    gate = Gate()
    models = Models([str(hub.lit)], load=gate.load, batch_size=4, wait=0.01, capacity=6)
    with running(create_app(models, max_items=6)) as url:
        yield SimpleNamespace(url=url, gate=gate, model=hub.lit.name)


def client(url, **kwargs):
    return openai.OpenAI(base_url=url + "/v1", api_key=kwargs.pop("api_key", "unused"), **kwargs)


def data_uri(path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def rows(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], np.float32)


def close(got, expected, atol=1e-6):
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def test_the_openai_client_gets_the_python_apis_embeddings_in_both_encodings(server, hub, reference):
    from transformers import CLIPTokenizer

    api = client(server)
    for encoding in ({}, {"encoding_format": "float"}):  # the SDK's default is base64 (numpy is installed)
        texts = api.embeddings.create(model=LIT, input=TEXTS, **encoding)
        close(rows(texts), [reference.text[t] for t in TEXTS])
        assert texts.model == LIT and [d.index for d in texts.data] == [0, 1, 2, 3]
        tokenizer = CLIPTokenizer(str(hub.lit / "vocab.json"), str(hub.lit / "merges.txt"))
        assert texts.usage.prompt_tokens == sum(len(tokenizer(t).input_ids) for t in TEXTS)
        assert texts.usage.total_tokens == texts.usage.prompt_tokens

        mixed = [
            {"image": data_uri(hub.photos["astronaut"])},  # Jina's shape, a data URI
            {"image": base64.b64encode(hub.photos["coffee"].read_bytes()).decode()},  # bare base64
            {"type": "image_url", "image_url": {"url": data_uri(hub.photos["chelsea"])}},  # chat content
            {"type": "text", "text": TEXTS[0]},
            {"text": TEXTS[1]},
            TEXTS[2],
            {"image": data_uri(hub.photos["coins"])},
        ]
        got = rows(api.embeddings.create(model=SHORT, input=mixed, **encoding))  # the short name answers too
        expected = [reference.image[n] for n in ("astronaut", "coffee", "chelsea")]
        expected += [reference.text[t] for t in TEXTS[:3]] + [reference.image["coins"]]
        close(got, expected)
        close(np.linalg.norm(got, axis=1), 1, atol=1e-5)  # L2-normalised, in LiT's shared space

    one = api.embeddings.create(model=LIT, input=TEXTS[3])  # a bare string
    close(rows(one), [reference.text[TEXTS[3]]])
    pooled = api.embeddings.create(model="aimv2", input=[{"image": data_uri(hub.photos["rocket"])}])
    close(rows(pooled), [reference.vision], atol=1e-5)  # a vision-only model: its pooled embedding


def test_models_are_listed_and_found_by_hub_id_and_short_name(server, hub):
    api = client(server)
    listed = api.models.list().data
    assert [m.id for m in listed] == [LIT, str(hub.vision)]
    assert listed[0].owned_by == "apple" and listed[1].owned_by == "local"
    assert api.models.retrieve(LIT).id == LIT and api.models.retrieve(SHORT).id == LIT
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("apple/aimv2-huge-patch14-448")
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and [m["id"] for m in health["models"]] == [LIT, str(hub.vision)]


def bomb() -> str:
    out = BytesIO()
    Image.new("1", (15000, 15000)).save(out, "PNG")  # 225 Mpx in a few hundred KB
    return base64.b64encode(out.getvalue()).decode()


LONG = " ".join(["photo"] * 100)


def bad_requests(hub):
    """(body, status, param, words the message holds): every request the server must refuse."""
    truncated = base64.b64encode(hub.photos["coffee"].read_bytes()[:3000]).decode()
    text = base64.b64encode(b"just some text").decode()
    ok = {"model": LIT}
    return [
        (b"{not json", 400, None, "not valid JSON"),
        (b"[1, 2]", 400, None, "JSON object"),
        ({"input": "a cat"}, 400, "model", '"model" is missing'),
        ({"model": 7, "input": "a cat"}, 400, "model", '"model" is missing'),
        ({**ok}, 400, "input", '"input" is missing'),
        ({**ok, "input": []}, 400, "input", "empty list"),
        ({**ok, "input": 3}, 400, "input", "a int"),
        ({**ok, "input": ["a cat", ""]}, 400, "input", "input[1] is an empty text"),
        ({**ok, "input": ["a cat", 4.5]}, 400, "input", "input[1] is a float"),
        ({**ok, "input": [[1, 2, 3]]}, 400, "input", "input[0] is a list of token ids"),
        ({**ok, "input": [{"audio": "x"}]}, 400, "input", "input[0] is an object"),
        ({**ok, "input": ["a"] * (MAX_ITEMS + 1)}, 400, "input", "at most 16"),
        ({**ok, "input": "a", "encoding_format": "int8"}, 400, "encoding_format", "float or base64"),
        ({**ok, "input": "a", "dimensions": "48"}, 400, "dimensions", "positive whole number"),
        ({**ok, "input": "a", "dimensions": 32}, 400, "dimensions", "gives 48-dimensional"),
        ({**ok, "input": "a", "truncate": "no"}, 400, "truncate", "true or false"),
        ({**ok, "input": [{"image": "%%%"}]}, 400, "input", "input[0]: the image is not valid base64"),
        ({**ok, "input": [{"image": "data:image/png,abc"}]}, 400, "input", "not base64"),
        ({**ok, "input": ["a", {"image": text}]}, 400, "input", "input[1]: not an image file"),
        ({**ok, "input": [{"image": truncated}]}, 400, "input", "input[0]: truncated or corrupt"),
        ({**ok, "input": [{"image": bomb()}]}, 400, "input", "decompression-bomb limit"),
        ({**ok, "input": [LONG], "truncate": False}, 400, "input", "input[0] is 102 tokens"),
        ({"model": "aimv2", "input": ["x", "a cat"]}, 400, "input", f"input[0] is a text, but {hub.vision}"),
        ({"model": "apple/aimv2-1B-patch14-224", "input": "a"}, 404, "model", "this server has"),
        ({**ok, "input": [{"image": "x" * MAX_BODY}]}, 413, None, "over 2 MB"),
    ]


def test_every_bad_request_is_a_4xx_in_openais_shape_and_the_next_is_answered(server, hub, reference):
    good = {"model": LIT, "input": TEXTS[0], "encoding_format": "float"}
    for body, status, param, words in bad_requests(hub):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(server + "/v1/embeddings", content=content, timeout=30)
        assert response.status_code == status, (body if isinstance(body, bytes) else words, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
        assert words in error["message"] and "\n" not in error["message"], error["message"]
        answer = httpx.post(server + "/v1/embeddings", json=good, timeout=30)
        close([answer.json()["data"][0]["embedding"]], [reference.text[TEXTS[0]]])

    cut = client(server).embeddings.create(model=LIT, input=[LONG])  # cut as the CLI cuts it
    assert cut.usage.prompt_tokens == 77
    with pytest.raises(openai.BadRequestError) as refused:  # the SDK reads the error's fields
        client(server).embeddings.create(model=LIT, input=[LONG], extra_body={"truncate": False})
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "input"
    for model in httpx.get(server + "/health").json()["models"]:  # nothing left counted as on its way
        assert model["in_progress"] == 0 and model["decoding"] == 0 and model["queued"] == 0
    assert httpx.get(server + "/v1/embeddings").status_code == 405
    assert httpx.get(server + "/v1/nothing").json()["error"]["message"].startswith("no route /v1/nothing")


def test_urls_are_never_fetched(server, hub):
    """A listener on this machine counts the connections: image URLs pointing at it get none."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    urls = [
        f"http://127.0.0.1:{port}/cat.jpg",
        f"https://127.0.0.1:{port}/cat.jpg",
        f"HTTP://localhost:{port}/x",
        f"file://{hub.photos['coffee']}",
        f"ftp://127.0.0.1:{port}/cat.jpg",
    ]
    shapes = [lambda u: {"image": u}, lambda u: {"type": "image_url", "image_url": {"url": u}}]
    for url in urls:
        for shape in shapes:
            response = httpx.post(server + "/v1/embeddings", json={"model": LIT, "input": [shape(url)]})
            error = response.json()["error"]
            assert response.status_code == 400 and error["code"] == "url_not_allowed"
            assert "URLs are not fetched" in error["message"] and "data URI" in error["message"]
    connections = 0
    try:
        while True:
            listener.accept()[0].close()
            connections += 1
    except TimeoutError:
        pass
    finally:
        listener.close()
    assert connections == 0


def test_an_api_key_is_required_when_set(hub, reference, monkeypatch):
    key = "s3cret-key"
    with running(create_app(Models([str(hub.lit)]), api_key=key)) as url:
        body = {"model": "lit", "input": "a photo of a cat"}
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": key},
            {"authorization": f"Basic {key}"},
        ):
            response = httpx.post(url + "/v1/embeddings", json=body, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").embeddings.create(**body)
        got = client(url, api_key=key).embeddings.create(**body)
        close(rows(got), [reference.text["a photo of a cat"]])
        assert httpx.get(url + "/health").status_code == 200  # for a supervisor's probe


def test_serve_binds_loopback_by_default_and_without_a_library_says_how_to_index(hub, tmp_path, monkeypatch):
    """`aim-mlx serve` in this process, uvicorn's run replaced: the socket it would serve, and the app."""
    monkeypatch.setenv("AIM_MLX_DATA", str(tmp_path / "data"))  # no library there
    ran = {}

    def run(self, sockets):
        ran["address"] = sockets[0].getsockname()[0]
        ran["app"] = self.config.app
        sockets[0].close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(hub.lit), "--port", "0"])
    assert result.exit_code == 0, result.output
    assert ran["address"] == "127.0.0.1"
    first, second = result.stderr.splitlines()
    assert first.startswith("serving the embeddings API at http://127.0.0.1:") and str(hub.lit) in first
    assert second.endswith(f"says how to index your photos into {tmp_path / 'data' / 'library.sqlite'}")
    with TestClient(ran["app"], base_url="http://127.0.0.1") as page:
        html = page.get("/").text
        assert "aim-mlx index ~/Pictures" in html and "no library" not in html.lower()
        assert page.get("/v1/models").json()["data"][0]["id"] == str(hub.lit)
        assert page.get("/", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding


def test_many_clients_at_once_share_batches_and_each_gets_its_own_answer(gated, hub, reference):
    gate, api = gated.gate, client(gated.url)
    health = lambda: httpx.get(gated.url + "/health").json()["models"][0]  # noqa: E731
    before = health()
    jobs = [("text", t) for t in TEXTS] + [("image", n) for n in PHOTOS]
    jobs = jobs * 2  # 18 clients; 6 inputs fit at once, so they come in turns
    gate.open.clear()
    gate.entered.clear()

    def one(job):
        kind, value = job
        item = value if kind == "text" else {"image": data_uri(hub.photos[value])}
        for _ in range(200):  # a full queue answers 429; this client retries as the SDK would
            try:
                return rows(
                    api.with_options(max_retries=0).embeddings.create(model=gated.model, input=[item])
                )
            except openai.RateLimitError:
                time.sleep(0.02)
        raise AssertionError("no room in the queue for 4 s")

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = pool.map(one, jobs)
        assert gate.entered.wait(30)
        time.sleep(0.3)  # the other clients queue behind the batch held in the model
        gate.open.set()
        answers = list(answers)
    for (kind, value), got in zip(jobs, answers, strict=True):
        expected = reference.text[value] if kind == "text" else reference.image[value]
        close(got[0], expected, atol=1e-5)
    after = health()
    embedded, batches = after["embedded"] - before["embedded"], after["batches"] - before["batches"]
    assert embedded == len(jobs) and batches < len(jobs)  # requests were merged into batches
    assert after["in_progress"] == 0 and after["queued"] == 0 and after["decoding"] == 0


def test_a_request_larger_than_a_batch_is_split_and_rejoined_in_order(gated, hub, reference):
    names = ["rocket", "coffee", "astronaut", "coins", "chelsea", "rocket"]  # 6 images, batches of 4
    before = httpx.get(gated.url + "/health").json()["models"][0]["batches"]
    got = client(gated.url).embeddings.create(
        model=gated.model, input=[{"image": data_uri(hub.photos[n])} for n in names]
    )
    close(rows(got), [reference.image[n] for n in names], atol=1e-5)
    assert httpx.get(gated.url + "/health").json()["models"][0]["batches"] - before >= 2


def test_a_full_queue_is_429_with_retry_after_and_a_gone_client_costs_nothing(gated, hub, reference):
    gate = gated.gate
    health = lambda: httpx.get(gated.url + "/health").json()["models"][0]  # noqa: E731
    before = health()["embedded"]
    gate.open.clear()
    gate.entered.clear()
    host, port = gated.url.removeprefix("http://").split(":")
    body = json.dumps({"model": gated.model, "input": [f"text number {i}" for i in range(6)]})
    leaving = http.client.HTTPConnection(host, int(port), timeout=30)
    leaving.request("POST", "/v1/embeddings", body, {"content-type": "application/json"})
    assert gate.entered.wait(30)  # its first batch of 4 is in the model; 2 inputs wait

    full = httpx.post(gated.url + "/v1/embeddings", json={"model": gated.model, "input": "one more"})
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        client(gated.url, max_retries=0).embeddings.create(model=gated.model, input="one more")

    leaving.sock.shutdown(socket.SHUT_RDWR)  # the client goes away while its request waits
    leaving.close()
    deadline = time.monotonic() + 10
    while health()["in_progress"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert health()["in_progress"] == 0  # its room is free again...
    gate.open.set()
    deadline = time.monotonic() + 10
    while health()["queued"] and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    computed = health()["embedded"] - before
    assert health()["decoding"] == 0
    assert 1 <= computed <= 4  # ...and what waited behind the batch in the model was never computed
    answer = client(gated.url).embeddings.create(model=gated.model, input=TEXTS[0])
    close(rows(answer), [reference.text[TEXTS[0]]], atol=1e-5)


def test_bodies_held_at_once_are_bounded_so_memory_does_not_grow_with_clients(hub, reference):
    """Room for 1500 bytes of bodies in all: a client still uploading 1000 leaves room for a 300-byte request,
    not a 700-byte one (429 before its body is read); once it goes away, its room is free again."""
    models = Models([LIT], batch_size=4, wait=0.01, capacity=16)
    with running(create_app(models, max_body=1000, max_bodies=1500)) as url:
        health = lambda: httpx.get(url + "/health").json()["body_bytes_held"]  # noqa: E731

        def request(size: int) -> httpx.Response:
            body = {"model": LIT, "input": TEXTS[0], "user": ""}
            body["user"] = "x" * (size - len(json.dumps(body)))
            payload = json.dumps(body)
            assert len(payload) == size
            return httpx.post(
                url + "/v1/embeddings", content=payload, headers={"content-type": "application/json"}
            )

        host, port = url.removeprefix("http://").split(":")
        uploading = socket.create_connection((host, int(port)), timeout=30)
        uploading.sendall(
            f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            'Content-Length: 1000\r\n\r\n{"model": '.encode()
        )
        deadline = time.monotonic() + 10
        while health() != 1000 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert health() == 1000

        refused = request(700)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        answered = request(300)
        assert answered.status_code == 200
        close(np.asarray([answered.json()["data"][0]["embedding"]]), [reference.text[TEXTS[0]]], atol=1e-5)
        assert request(1001).status_code == 413

        uploading.close()  # the slow client goes away mid-body
        deadline = time.monotonic() + 10
        while health() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert health() == 0
        assert request(700).status_code == 200


def test_sigterm_finishes_the_request_in_flight_and_refuses_new_ones(hub, reference):
    """uvicorn's SIGTERM handler (handle_exit, what `aim-mlx serve` gets from the signal) while a batch is in
    the model: that request is answered in full, a new connection is refused, and the server stops."""
    gate = Gate()
    models = Models([str(hub.lit)], load=gate.load, batch_size=4, wait=0.01, capacity=8)
    with started(create_app(models, max_items=8)) as (url, server):
        gate.open.clear()
        gate.entered.clear()
        with ThreadPoolExecutor(1) as pool:
            body = {"model": hub.lit.name, "input": TEXTS}
            answer = pool.submit(httpx.post, url + "/v1/embeddings", json=body, timeout=30)
            assert gate.entered.wait(30)
            server.handle_exit(signal.SIGTERM, None)
            deadline = time.monotonic() + 10
            while not server.should_exit and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # the server stops listening, then waits for what is in flight
            with pytest.raises(httpx.ConnectError):
                httpx.get(url + "/health", timeout=5)
            gate.open.set()
            response = answer.result(timeout=30)
        assert response.status_code == 200
        got = np.asarray([row["embedding"] for row in response.json()["data"]])
        close(got, [reference.text[t] for t in TEXTS], atol=1e-5)


def test_langchains_openai_embeddings_unchanged_but_for_the_url(server, reference):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model=LIT, base_url=server + "/v1", api_key="unused", check_embedding_ctx_length=False
    )
    close(embeddings.embed_documents(TEXTS), [reference.text[t] for t in TEXTS], atol=1e-5)
    close(embeddings.embed_query(TEXTS[1]), reference.text[TEXTS[1]], atol=1e-5)


def test_chromadb_with_its_openai_embedding_function_pointed_here(server, reference, monkeypatch):
    import chromadb
    from chromadb.config import Settings
    from chromadb.utils.embedding_functions import OpenAIEmbeddingFunction

    monkeypatch.setenv("CHROMA_OPENAI_API_KEY", "unused")
    function = OpenAIEmbeddingFunction(model_name=LIT, api_base=server + "/v1")
    store = chromadb.EphemeralClient(Settings(anonymized_telemetry=False))
    docs = store.create_collection("docs", embedding_function=function)
    docs.add(ids=[str(i) for i in range(len(TEXTS))], documents=TEXTS)
    stored = docs.get(include=["embeddings"])
    by_id = dict(zip(stored["ids"], stored["embeddings"], strict=True))
    close([by_id[str(i)] for i in range(len(TEXTS))], [reference.text[t] for t in TEXTS], atol=1e-5)
    hits = docs.query(query_texts=[TEXTS[2]], n_results=2)
    assert hits["documents"][0][0] == TEXTS[2]


def test_cors_is_off_unless_an_origin_is_named(hub):
    preflight = {"origin": "http://app.example", "access-control-request-method": "POST"}
    with TestClient(create_app(Models([str(hub.lit)])), base_url="http://127.0.0.1") as plain:
        response = plain.options("/v1/embeddings", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    named = create_app(Models([str(hub.lit)]), api_key="k", cors_origins=["http://app.example"])
    with TestClient(named, base_url="http://127.0.0.1") as page:
        response = page.options("/v1/embeddings", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://app.example"
        other = page.options("/v1/embeddings", headers={**preflight, "origin": "http://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "http://evil.example"
        refused = page.get("/v1/models", headers={"origin": "http://app.example"})  # no key: 401, readable
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"]


def test_with_a_library_one_server_answers_the_photo_page_and_the_api(hub, reference, tmp_path, monkeypatch):
    """Without --model the API serves the library's model, loaded on its first request."""
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    photos = tmp_path / "Pictures"
    photos.mkdir()
    for name in ("coffee", "rocket"):
        (photos / f"{name}.jpg").write_bytes(hub.photos[name].read_bytes())
    db = tmp_path / "library.sqlite"
    result = CliRunner().invoke(cli_app, ["index", str(photos), "--db", str(db), "-m", str(hub.lit)])
    assert result.exit_code == 0, result.output
    served = build(db, explicit_db=False)
    assert served.photos == 2 and served.models == [str(hub.lit)] and served.lazy
    with TestClient(served.app, base_url="http://127.0.0.1") as both:
        assert both.get("/api/status").json()["photos"] == 2
        assert both.get("/v1/models").json()["data"][0]["loaded"] is False
        hits = both.get("/api/search", params={"q": "a rocket"}).json()["results"]
        assert {h["name"] for h in hits} == {"coffee.jpg", "rocket.jpg"}
        answer = both.post("/v1/embeddings", json={"model": "lit", "input": [TEXTS[1]]}).json()
        close([answer["data"][0]["embedding"]], [reference.text[TEXTS[1]]], atol=1e-5)
        assert both.get("/photo/999").json() == {"error": "no indexed photo has id 999"}  # its own rules


def test_zero_shot_scores_images_against_labels_as_the_cli_does(server, hub, tmp_path, monkeypatch):
    from aim_mlx.tasks.zeroshot import imagenet_templates, zero_shot

    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    labels = ["a cat", "a rocket", "a cup of coffee", "an astronaut"]
    names = ["chelsea", "rocket", "coffee"]
    model, processor = aim_mlx.load(str(hub.lit))
    for templates in (None, ["a photo of {}.", "a picture of {}"], "imagenet"):
        expected = zero_shot(
            model,
            processor,
            [hub.photos[n] for n in names],
            labels,
            imagenet_templates() if templates == "imagenet" else templates or ["a photo of a {}."],
            top_k=3,
            cache=False,
        )
        body = {
            "model": SHORT,
            "input": [{"image": data_uri(hub.photos[n])} for n in names],
            "labels": labels,
        }
        body.update({"top_k": 3, **({"templates": templates} if templates else {})})
        answer = httpx.post(server + "/v1/classify", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        data = answer.json()["data"]
        assert [d["index"] for d in data] == [0, 1, 2]
        for got, want in zip(data, expected, strict=True):
            assert [t["label"] for t in got["top"]] == want.labels
            close([t["prob"] for t in got["top"]], want.probs, atol=1e-5)
    assert list((tmp_path / "cache" / "text-embeddings").iterdir())  # label sets cached as the CLI caches

    image = {"image": data_uri(hub.photos["coffee"])}
    for body, param, words in [
        ({"model": LIT, "input": [image], "labels": []}, "labels", "no labels given"),
        ({"model": LIT, "input": [image], "labels": "cat,dog"}, "labels", "list of strings"),
        ({"model": LIT, "input": [image], "labels": ["cat", "Cat"]}, "labels", "given twice"),
        ({"model": LIT, "input": ["a cat"], "labels": ["cat"]}, "input", "input[0] is a text"),
        ({"model": LIT, "input": [image], "labels": ["cat"], "templates": ["no slot"]}, "templates", "{}"),
        ({"model": LIT, "input": [image], "labels": ["cat"], "top_k": 0}, "top_k", "positive"),
        ({"model": "aimv2", "input": [image], "labels": ["cat"]}, "model", "vision-only"),
    ]:
        response = httpx.post(server + "/v1/classify", json=body, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        assert words in response.json()["error"]["message"]


def test_classify_without_labels_gives_a_trained_heads_classes_as_the_python_api_does(
    hub, tmp_path, monkeypatch
):
    """A head `aim-mlx train` made (on the tiny vision model): /v1/classify with no labels scores its classes
    as tasks.heads.classify does; zero-shot labels sent to it are a 400 saying which to use."""
    from aim_mlx.tasks import heads
    from aim_mlx.tasks.train import train

    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "kinds"
    for name in ("coffee", "rocket"):
        (data / name).mkdir(parents=True)
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for i in range(4):
            photo.rotate(5 * i).save(data / name / f"{i}.jpg")
    head = tmp_path / "kinds-head"
    train(*aim_mlx.load(str(hub.vision)), data, head, val_split=0.25, epochs=5, batch_size=8, seed=0)
    model, processor = aim_mlx.load(str(head))
    names = ["coffee", "rocket", "chelsea"]
    expected = heads.classify(model, processor([hub.photos[n] for n in names]), top_k=2)
    with TestClient(create_app(Models([str(head)])), base_url="http://127.0.0.1") as api:
        body = {"model": str(head), "input": [{"image": data_uri(hub.photos[n])} for n in names], "top_k": 2}
        answer = api.post("/v1/classify", json=body)
        assert answer.status_code == 200, answer.text
        for row, prediction in zip(answer.json()["data"], expected, strict=True):
            assert [t["label"] for t in row["top"]] == prediction.labels
            np.testing.assert_allclose([t["prob"] for t in row["top"]], prediction.probs, atol=1e-5)
        refused = api.post("/v1/classify", json={**body, "labels": ["cat", "dog"]})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "labels"
        assert "trained head" in refused.json()["error"]["message"]
    with TestClient(create_app(Models([str(hub.vision)])), base_url="http://127.0.0.1") as api:
        body = {"model": str(hub.vision), "input": [{"image": data_uri(hub.photos["coffee"])}]}
        refused = api.post("/v1/classify", json=body)
        assert refused.status_code == 400 and "no classification head" in refused.json()["error"]["message"]


def test_serve_says_what_is_wrong_in_one_line(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_MLX_DATA", str(tmp_path / "data"))
    runner = CliRunner()
    for args, words in [
        (["--model", str(tmp_path / "nothing-here")], "nothing-here"),
        (["--model", str(hub.lit), "--max-batch-items", "64", "--queue-size", "32"], "--queue-size (32)"),
        (["--model", str(hub.lit), "--model", str(hub.lit)], "share the name"),
    ]:
        result = runner.invoke(cli_app, ["serve", *args, "--port", "0"])
        assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.output
        assert result.stderr.startswith("error: ") and words in result.stderr, result.stderr


def test_a_lazy_model_loads_on_first_use_and_a_failed_load_is_a_500_tried_again(hub, tmp_path, reference):
    later = tmp_path / "later"
    models = Models([str(hub.lit), str(later)], lazy=True)
    with TestClient(create_app(models), base_url="http://127.0.0.1") as api:
        assert [m["loaded"] for m in api.get("/v1/models").json()["data"]] == [False, False]
        for _ in range(2):
            response = api.post("/v1/embeddings", json={"model": "later", "input": "a cat"})
            assert response.status_code == 500 and response.json()["error"]["code"] == "model_load_failed"
        answer = api.post("/v1/embeddings", json={"model": "lit", "input": [TEXTS[0]]}).json()
        close([answer["data"][0]["embedding"]], [reference.text[TEXTS[0]]], atol=1e-5)
        assert [m["loaded"] for m in api.get("/v1/models").json()["data"]] == [True, False]
