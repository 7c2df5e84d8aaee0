"""Every `aim-mlx ...` line in README.md's ```bash blocks runs as written, in order, and exits 0.

The hub ids it names come from a fake offline Hugging Face cache holding tiny random checkpoints at the
pinned revisions; photo.jpg and ~/Pictures are scikit-image photos; outputs land in a scratch folder.
Two things are made small so that the file stays near a minute on two cores, the commands otherwise as
written: bench gets `--num-trials 1 --warmup 0` and one batch size (its first, or 1), and --imagenet stands
for ImageNet's first ten classes (the real 1000 x 80 prompts would take the tiny text tower minutes).
"""

import os
import re
import shlex
from pathlib import Path

import pytest
import skimage.data
from checkpoints import TINY, make_reference, write_checkpoint, write_processor
from fakehub import add_folder
from huggingface_hub import constants
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from PIL import Image
from typer.testing import CliRunner

from aim_mlx.checkpoints.variants import DEFAULT_MODEL, DEFAULT_TEXT_MODEL, find_variant
from aim_mlx.cli import app
from aim_mlx.tasks import zeroshot

README = Path(__file__).parents[1] / "README.md"
runner = CliRunner()


def readme_commands() -> list[str]:
    """The aim-mlx lines of the ```bash blocks, continuation lines joined, comments kept for the id."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.startswith("aim-mlx ") or line == "aim-mlx"]


def hub_ids(commands: list[str]) -> set[str]:
    found = {m for line in commands for m in re.findall(r"(?:apple/)?aimv2-[A-Za-z0-9-]+", line)}
    variants = {find_variant(model_id) for model_id in found} | {
        find_variant(DEFAULT_MODEL),
        find_variant(DEFAULT_TEXT_MODEL),
    }
    return {v.repo_id for v in variants if v is not None}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A scratch folder to run in, a fake hub cache with every id the README names, photos, and aim-mlx's
    own cache (label embeddings) inside it. Module-wide: the README's commands build on each other."""
    root = tmp_path_factory.mktemp("readme")
    hub = root / "hf" / "hub"
    hub.mkdir(parents=True)
    kinds = {}  # one tiny checkpoint per kind; huge's widths: 4-bit groups of 64 divide them (`convert -q`)
    kinds["vision"] = write_processor(
        write_checkpoint(make_reference(seed=1, image_size=56, **TINY["huge"]), root / "vision", "hf")
    )
    kinds["native"] = write_checkpoint(
        make_reference(seed=2, is_native=True, **TINY["huge"]), root / "native"
    )
    kinds["lit"] = write_processor(write_lit_checkpoint(make_lit_reference(seed=3), root / "lit"))
    for repo_id in sorted(hub_ids(readme_commands())):
        variant = find_variant(repo_id)
        kind = "lit" if variant.lit else "native" if variant.image_size is None else "vision"
        add_folder(hub, repo_id, variant.revision, kinds[kind])
    (root / "run" / "home" / "Pictures").mkdir(parents=True)
    Image.fromarray(skimage.data.coffee()).save(root / "run" / "photo.jpg")
    for name in ("astronaut", "chelsea", "camera"):
        Image.fromarray(getattr(skimage.data, name)()).save(
            root / "run" / "home" / "Pictures" / f"{name}.png"
        )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(hub.parent))
        patch.setenv("HF_HUB_CACHE", str(hub))  # bench's child processes read the cache too
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("AIM_MLX_CACHE", str(root / "aim-mlx-cache"))
        patch.setenv("AIM_MLX_DATA", str(root / "aim-mlx-data"))  # the photo library's default database
        patch.setattr(constants, "HF_HUB_CACHE", str(hub))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setattr(
            zeroshot, "imagenet_classes", lambda: list(zeroshot._data("imagenet_classes.json")[:10])
        )
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


COMMANDS = readme_commands()


def test_the_readme_has_commands_of_every_kind():
    assert {line.split()[1] for line in COMMANDS} >= {"embed", "classify", "convert", "export", "bench"}


def param(line: str):
    return pytest.param(line, id=line.split("#")[0].strip())


@pytest.mark.parametrize("command", [param(line) for line in COMMANDS])
def test_readme_command_runs_as_written(workspace, network_attempts, command):
    words = shlex.split(command, comments=True)[1:]
    home = str(workspace / "home")
    words = [home + word[1:] if word.startswith("~") else word for word in words]  # as the shell would
    redirect = None
    if ">" in words:  # `> results.json`: stdout into a file, as the shell would
        at = words.index(">")
        redirect, words = words[at + 1], words[:at] + words[at + 2 :]
    result = runner.invoke(app, small(words))
    assert result.exit_code == 0, f"{command}\n{result.output}"
    if redirect is not None:
        Path(redirect).write_text(result.stdout)
    for path in outputs(words):
        assert Path(path).exists(), f"{command}: wrote no {path}"
    assert os.listdir(workspace)  # the scratch folder, not the repository, received the outputs
