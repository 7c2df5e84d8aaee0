"""Every `aim-mlx ...` line in the ```bash blocks of README.md and docs/*.md runs as written, in order, and
then every ```python block (one that talks to a server at 127.0.0.1:8000 is test_service_docs.py's).

A line exits 0, or the code its trailing `# exit N` comment names. Lines repeated across pages run once.
`aim-mlx serve ...` is started as a process on 127.0.0.1 with a free port, must answer /api/status, and is
stopped with SIGINT. The hub ids the pages name come from a fake offline Hugging Face cache of tiny random
checkpoints at the pinned revisions (AIMv1's as the published pickles); photo.jpg, ~/Pictures and
~/imagenet/val are scikit-image photos, photo.dng and clip.mp4 are written from them (tests/media.py), and so
are the class folders ~/data/birds (also ./birds) and ~/data/birds-test (docs/train.md: each class one photo
under random crops and flips); outputs land in a scratch folder.
Two things are made small so that the file stays near a minute on two cores, the commands otherwise as
written: bench gets `--num-trials 1 --warmup 0` and one batch size (its first, or 1), and --imagenet stands
for ImageNet's first ten classes in LiT's prompts (the real 1000 x 80 would take the tiny text tower
minutes); AIMv1's head keeps its 1000 labels.
"""

import hashlib
import http.client
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from aimv1_checkpoints import TINY as AIMV1_TINY
from aimv1_checkpoints import make_reference as make_aimv1_reference
from aimv1_checkpoints import write_checkpoint as write_aimv1_checkpoint
from aimv1_checkpoints import write_pth_pair
from checkpoints import TINY, make_reference, write_checkpoint, write_processor
from fakehub import add_folder, add_snapshot
from huggingface_hub import constants
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from media import jpeg_bytes, write_dng, write_video
from PIL import Image
from typer.testing import CliRunner

from aim_mlx.checkpoints import variants
from aim_mlx.checkpoints.variants import DEFAULT_MODEL, DEFAULT_TEXT_MODEL, find_variant
from aim_mlx.cli import app
from aim_mlx.tasks import evaluate, heads, zeroshot

ROOT = Path(__file__).parents[1]
# Pages whose commands another test runs (their own fixtures, e.g. a service's requests): page -> that test.
TESTED_ELSEWHERE: dict[str, str] = {"service.md": "tests/test_service_docs.py"}
PAGES = [ROOT / "README.md"] + [
    page for page in sorted((ROOT / "docs").glob("*.md")) if page.name not in TESTED_ELSEWHERE
]
EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"  # the fake hub's commit for repos pinned at `main`
runner = CliRunner()


SERVER = "http://127.0.0.1:8000"


def python_blocks() -> list[tuple[str, str]]:
    """(page, code) of every ```python block that needs no server."""
    found = []
    for page in PAGES:
        for code in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S):
            if SERVER not in code:
                found.append((page.name, code))
    return found


def page_commands(page: Path) -> list[str]:
    """The aim-mlx lines of a page's ```bash blocks, continuation lines joined, comments kept."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.startswith("aim-mlx ") or line == "aim-mlx"]


def all_commands() -> list[tuple[str, str]]:
    """(page, line) in page order, README first; a line whose words another page already ran is left out."""
    seen, found = set(), []
    for page in PAGES:
        for line in page_commands(page):
            words = tuple(shlex.split(line, comments=True))
            if words not in seen:
                seen.add(words)
                found.append((page.name, line))
    return found


COMMANDS = all_commands()


def hub_ids(commands: list[str]) -> set[str]:
    found = {m for line in commands for m in re.findall(r"(?:apple/)?aimv2-[A-Za-z0-9-]+", line)}
    chosen = {find_variant(model_id) for model_id in found} | {
        find_variant(DEFAULT_MODEL),
        find_variant(DEFAULT_TEXT_MODEL),
    }
    return {v.repo_id for v in chosen if v is not None}


def add_aimv1(hub: Path, root: Path, patch: pytest.MonkeyPatch) -> None:
    """apple/aim-600M as its repo publishes it (config.json + pytorch_model.bin, the best-layers head), and
    apple/AIM's 1B backbone and last-layers head as .pth files, whose own SHA-256 prefixes stand in for the
    published ones. The 600M reads its last six of 24 blocks, as many as the published model has, for
    docs/aimv1.md's block indices (the checkpoint's own probe: no --probe asks for another); the 1B's 18
    blocks make its probed 12-17 both ml-aim's best layers and the last six, so that `--probe last` is
    right for it."""
    v600 = make_aimv1_reference(seed=11, num_blocks=24, probe_layers=range(18, 24), **AIMV1_TINY["600M"])
    published = write_aimv1_checkpoint(v600, root / "aim-600M-published", weights="pickle")
    add_folder(hub, "apple/aim-600M", COMMIT, published)
    v1b = make_aimv1_reference(seed=12, num_blocks=18, probe_layers=range(12, 18), **AIMV1_TINY["1B"])
    paths = write_pth_pair(v1b, root / "aim-pth", "1B", "last")
    for path in paths:
        patch.setitem(variants.AIMV1_SHA256, path.name, hashlib.sha256(path.read_bytes()).hexdigest()[:8])
    add_snapshot(hub, "apple/AIM", COMMIT, {p.name: p.read_bytes() for p in paths}, ref="main")


def add_photos(run: Path) -> None:
    home = run / "home"
    (home / "Pictures").mkdir(parents=True)
    Image.fromarray(skimage.data.coffee()).save(run / "photo.jpg")
    Image.fromarray(skimage.data.chelsea()).save(run / "cat.jpg")  # the Python blocks' photos
    Image.fromarray(skimage.data.astronaut()).save(run / "dog.png")
    write_dng(run / "photo.dng", skimage.data.coffee(), preview=jpeg_bytes(skimage.data.coffee()))  # media.md
    write_video(run / "clip.mp4", [skimage.data.astronaut(), skimage.data.chelsea()])
    for name in ("astronaut", "chelsea", "camera"):
        Image.fromarray(getattr(skimage.data, name)()).save(home / "Pictures" / f"{name}.png")
    # An ImageNet-layout validation set: class folders by WordNet id (tench, goldfish: classes 0 and 1).
    for wnid, name in (("n01440764", "coffee"), ("n01443537", "rocket")):
        (home / "imagenet" / "val" / wnid).mkdir(parents=True)
        Image.fromarray(getattr(skimage.data, name)()).save(home / "imagenet" / "val" / wnid / f"{name}.jpg")
    # Class folders for `aim-mlx train` (docs/train.md): each class one photo under random crops and flips.
    rng = np.random.default_rng(0)
    for name in ("astronaut", "chelsea", "coffee"):
        photo = Image.fromarray(getattr(skimage.data, name)())
        for folder, count in (("birds", 6), ("birds-test", 2)):
            (home / "data" / folder / name).mkdir(parents=True)
            for i in range(count):
                w, h = photo.size
                cw, ch = int(w * rng.uniform(0.5, 0.9)), int(h * rng.uniform(0.5, 0.9))
                left, top = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
                crop = photo.crop((left, top, left + cw, top + ch)).resize((64, 64))
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                crop.save(home / "data" / folder / name / f"{i}.jpg")
    (run / "birds").symlink_to(home / "data" / "birds")  # docs/train.md's Python trains on ./birds


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A scratch folder to run in, a fake hub cache with every id the pages name, photos, and aim-mlx's
    own cache (label embeddings) inside it. Module-wide: the pages' commands build on each other."""
    root = tmp_path_factory.mktemp("docs")
    hub = root / "hf" / "hub"
    hub.mkdir(parents=True)
    kinds = {}  # one tiny checkpoint per kind; huge's widths: 4-bit groups of 64 divide them (`convert -q`)
    kinds["vision"] = write_processor(
        # 24 blocks, as AIMv2-L has: the Python blocks ask for blocks 11 and 23
        write_checkpoint(
            make_reference(seed=1, image_size=56, num_hidden_layers=24, **TINY["huge"]), root / "vision", "hf"
        )
    )
    kinds["native"] = write_checkpoint(
        make_reference(seed=2, is_native=True, **TINY["huge"]), root / "native"
    )
    kinds["lit"] = write_processor(write_lit_checkpoint(make_lit_reference(seed=3), root / "lit"))
    for repo_id in sorted(hub_ids([line for _, line in COMMANDS])):
        variant = find_variant(repo_id)
        kind = "lit" if variant.lit else "native" if variant.image_size is None else "vision"
        add_folder(hub, repo_id, variant.revision, kinds[kind])
    add_photos(root / "run")
    with pytest.MonkeyPatch.context() as patch:
        add_aimv1(hub, root, patch)
        patch.setenv("HF_HOME", str(hub.parent))
        patch.setenv("HF_HUB_CACHE", str(hub))  # bench's and serve's child processes read the cache too
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("AIM_MLX_CACHE", str(root / "aim-mlx-cache"))
        patch.setenv("AIM_MLX_DATA", str(root / "aim-mlx-data"))  # the photo library's default database
        patch.setattr(constants, "HF_HUB_CACHE", str(hub))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        # LiT's prompts only: AIMv1's head keeps its 1000 labels (heads.LABEL_SETS, bound at import)
        ten = list(zeroshot.imagenet_classes()[:10])
        assert len(heads.LABEL_SETS["imagenet-1k"]()) == 1000
        patch.setattr(zeroshot, "imagenet_classes", lambda: ten)
        patch.setattr(evaluate, "imagenet_classes", lambda: ten)
        patch.chdir(root / "run")
        yield root / "run"


def small(args: list[str]) -> list[str]:
    """bench with one trial, no warmup and one batch size, its first (see the module docstring)."""
    if args[0] != "bench":
        return args
    if "--batch-sizes" not in args:
        args = [*args, "--batch-sizes", "1"]
    at = args.index("--batch-sizes") + 1
    return [*args[:at], args[at].split(",")[0], *args[at + 1 :], "--num-trials", "1", "--warmup", "0"]


def outputs(args: list[str]) -> list[str]:
    """What the command says it writes: -o, --mlx-path, --plot."""
    return [
        args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-o", "--output", "--mlx-path", "--plot")
    ]


def as_the_shell_would(command: str, workspace: Path) -> tuple[list[str], str | None, int]:
    """The words after `aim-mlx`, with ~ expanded; a `> FILE` redirect; the expected exit code."""
    words = shlex.split(command, comments=True)[1:]
    home = str(workspace / "home")
    words = [home + word[1:] if word.startswith("~") else word for word in words]
    redirect = None
    if ">" in words:
        at = words.index(">")
        redirect, words = words[at + 1], words[:at] + words[at + 2 :]
    expected = EXIT.search(command)
    return words, redirect, int(expected.group(1)) if expected else 0


def param(page: str, line: str):
    return pytest.param(line, id=f"{page}: {line.split('#')[0].strip()}")


def test_the_pages_have_commands_of_every_kind():
    kinds = {line.split()[1] for _, line in COMMANDS}
    assert kinds >= {"embed", "classify", "convert", "export", "bench", "index", "search", "serve", "eval"}
    for page, test in TESTED_ELSEWHERE.items():  # a page left to another test is one that test runs
        assert (ROOT / "docs" / page).exists() and (ROOT / test).exists(), (page, test)


def test_the_pages_links_lead_to_files_that_exist():
    pages = [*PAGES, *(ROOT / "docs" / page for page in TESTED_ELSEWHERE), ROOT / "ARCHITECTURE.md"]
    pages += [ROOT / "benchmarks" / "RESULTS.md", ROOT / "apps" / "README.md"]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if (
                "://" not in target
                and not target.startswith("mailto:")
                and not (page.parent / target).exists()
            ):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


@pytest.mark.parametrize("command", [param(p, line) for p, line in COMMANDS if line.split()[1] != "serve"])
def test_command_runs_as_written(workspace, network_attempts, command):
    words, redirect, expected = as_the_shell_would(command, workspace)
    result = runner.invoke(app, small(words))
    assert result.exit_code == expected, f"{command}\n{result.output}"
    if redirect is not None:
        Path(redirect).write_text(result.stdout)
    if expected == 0:
        for path in outputs(words):
            assert Path(path).exists(), f"{command}: wrote no {path}"
    assert os.listdir(workspace)  # the scratch folder, not the repository, received the outputs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def on_loopback(words: list[str], port: int) -> list[str]:
    """The command with --host 127.0.0.1 and --port `port`, whatever it said."""
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("--host", "--port"):
            skip = True
        elif not word.startswith(("--host=", "--port=")):
            kept.append(word)
    return [*kept, "--host", "127.0.0.1", "--port", str(port)]


def status(port: int) -> int | None:
    """/api/status's HTTP status, or None while nothing answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/api/status")
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


# After the other commands (pytest runs a file's tests in order), so the libraries they index exist.
@pytest.mark.parametrize("command", [param(p, line) for p, line in COMMANDS if line.split()[1] == "serve"])
def test_server_command_answers_and_stops_on_ctrl_c(workspace, command):
    words, _, expected = as_the_shell_would(command, workspace)
    assert expected == 0, f"{command}: a server command is expected to start"
    port = free_port()
    env = {**os.environ, "BROWSER": "true"}  # --open runs `true URL` instead of a browser
    server = subprocess.Popen(
        [sys.executable, "-m", "aim_mlx", *on_loopback(words, port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        answer, deadline = None, time.monotonic() + 120
        while answer is None and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            answer = status(port)
        assert answer == 200, f"{command}: /api/status answered {answer}"
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode in (0, 130), f"{command}: exit {server.returncode}\n{output}"
    assert "serving" in output, output


# Last: ./aim-600M is what docs/aimv1.md's convert line wrote.
@pytest.mark.parametrize(("page", "code"), python_blocks(), ids=lambda v: v if v.endswith(".md") else "")
def test_python_block_runs_as_written(workspace, page, code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{page}:\n{code}\n{result.stderr}"
