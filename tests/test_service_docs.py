"""docs/service.md runs as written, and so do the README's requests to a server. The page's `aim-mlx serve`
line starts a real server (a tiny random-weight LiT checkpoint cached as the hub's, a free port in place of
8000), then each bash and python block runs against it from a folder holding photo.jpg. The Swift block is
not compiled here, as the page says."""

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import skimage.data
from checkpoints import write_processor
from fakehub import add_folder
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from PIL import Image

from aim_mlx.checkpoints.variants import DEFAULT_TEXT_MODEL, PINNED_REVISIONS

ROOT = Path(__file__).parents[1]
PAGE = ROOT / "docs" / "service.md"
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
ADDRESS = "http://127.0.0.1:8000"
# and the README's Python blocks that talk to a server (test_docs.py runs its others)
README = re.findall(r"```(python)\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)
RUN = [(kind, code) for kind, code in BLOCKS if kind in ("bash", "python")]
RUN += [(kind, code) for kind, code in README if ADDRESS in code]
NEEDS = {"llama_index": "llama-index-embeddings-openai-like"}  # a block importing it needs it installed


def serve_line() -> list[str]:
    lines = [line for kind, code in BLOCKS if kind == "text" for line in code.splitlines()]
    line = next(line for line in lines if line.startswith("aim-mlx serve"))
    return shlex.split(line.split("#")[0])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The page's serve line, on a free port, with the page's folder (photo.jpg) and no library."""
    root = tmp_path_factory.mktemp("service-docs")
    cache = root / "hf" / "hub"
    cache.mkdir(parents=True)
    lit = write_processor(write_lit_checkpoint(make_lit_reference(seed=4), root / "lit"))
    add_folder(cache, DEFAULT_TEXT_MODEL, PINNED_REVISIONS[DEFAULT_TEXT_MODEL.split("/")[1]], lit)
    work = root / "work"
    work.mkdir()
    Image.fromarray(skimage.data.chelsea()).save(work / "photo.jpg", quality=90)
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "AIM_MLX_DATA": str(root / "data"),
        "AIM_MLX_CACHE": str(root / "cache"),
    }
    command = [sys.executable, "-m", "aim_mlx", *serve_line()[1:], "--port", "0"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        line = lines.get(timeout=120)
        assert line.startswith("serving the embeddings API at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split("/v1")[0]
        yield url, work, env
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            # uvicorn finishes what is in flight, then ends by the signal it caught
            assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        finally:
            if process.poll() is None:
                process.kill()
        said = "".join(lines.get(timeout=5) for _ in range(lines.qsize()))
        assert "Traceback" not in said, said


@pytest.mark.parametrize(("kind", "code"), RUN, ids=[f"{kind}-{i}" for i, (kind, _) in enumerate(RUN)])
def test_the_pages_commands_run_against_a_server(server, kind, code):
    url, work, env = server
    for module, package in NEEDS.items():
        if f"import {module}" in code or f"from {module}" in code:
            pytest.importorskip(module, reason=f"the block needs {package}")
    assert ADDRESS in code
    code = code.replace(ADDRESS, url)
    command = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and '"error"' not in result.stdout
    if kind == "bash":  # curl's answers: JSON objects, one after another
        decoder, text, answers = json.JSONDecoder(), result.stdout.strip(), []
        while text:
            answer, end = decoder.raw_decode(text)
            answers.append(answer)
            text = text[end:].strip()
        for answer in answers:
            assert answer.get("object") == "list" or answer.get("status") == "ok", answer
            for row in answer.get("data", []):
                assert row.get("object") in ("embedding", "model", "classification")
