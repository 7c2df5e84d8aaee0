"""Ctrl-C: `aim-mlx embed` as a real process, sent SIGINT at several moments of a run, must stop within
seconds with exit code 130, one line on stderr that says so, no traceback and no output file."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import skimage.data
from checkpoints import TINY, make_reference, write_checkpoint, write_processor
from emulation import APPLE
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket", "immunohistochemistry")
IMAGES = 64
# The photo folder is named this many times on the command line (embed takes a folder again each time it is
# named), so that a run lasts far beyond the last signal even on a fast machine: the moments below are
# fixed sleeps, and a run that ended first is a failed test, not a skipped one.
ROUNDS = 8
# `python -m aim_mlx` with the library's info lines on stderr, so that a test can wait for "loaded".
WITH_INFO_LOGS = (
    "import logging, sys; logging.basicConfig(level=logging.INFO, format='log: %(message)s'); "
    "from aim_mlx.cli import main; sys.argv[0] = 'aim-mlx'; main()"
)


# A signal lands between MLX evaluations, so a batch must also end well within the 5 s allowed. Under
# AIM_MLX_EMULATE=apple the blocks run in float16 on MLX's CPU backend, about 25x slower than the numpy
# backend (and than a Mac's GPU): a smaller model there keeps an image near the same 0.1-0.2 s.
SIZE, DEPTH = (112, 4) if APPLE else (224, 24)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A folder of small photos and a checkpoint slow enough that a run lasts well beyond the last signal
    (24 blocks at 224 px: 0.02-0.2 s an image on two cores, 64 images named ROUNDS times)."""
    root = tmp_path_factory.mktemp("interrupt")
    (root / "photos").mkdir()
    for i in range(IMAGES):
        photo = Image.fromarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])())
        photo.thumbnail((160 + i, 160 + i))
        photo.save(root / "photos" / f"{i:02d}.jpg")
    model = make_reference(seed=2, image_size=SIZE, num_hidden_layers=DEPTH, **TINY["large"])
    write_processor(write_checkpoint(model, root / "model", "hf"), size=SIZE)
    return root


def start(command: list[str], job: Path, out: Path, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    args = ["embed", *[str(job / "photos")] * ROUNDS, "-m", str(job / "model"), "-o", str(out), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*command, *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines


def wait_for(lines: list[str], text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert time.monotonic() < deadline, f"no {text!r} on stderr: {lines}"
        time.sleep(0.02)


def interrupt_and_check(proc: subprocess.Popen, lines: list[str], out: Path) -> str:
    """Sends SIGINT, checks the outcome, returns the one line that says so."""
    assert proc.poll() is None, f"the run ended before the signal: {lines}"
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running 5 s after SIGINT; stderr so far: {lines}")
    time.sleep(0.1)  # the reader thread drains the pipe
    stderr = "".join(lines)
    assert code == 130, stderr
    assert "Traceback" not in stderr
    said = [line.strip() for line in lines if not line.startswith("log: ")]  # see WITH_INFO_LOGS
    assert len(said) == 1 and said[0].startswith("interrupted") and said[0].endswith("; nothing written"), (
        stderr
    )
    assert not out.exists() and list(out.parent.iterdir()) == [], "a partial output was left"
    return said[0]


@pytest.mark.parametrize("after", [0.5, 1.5, 3.0])
def test_python_m_aim_mlx_stops_on_sigint(job, tmp_path, after):
    """In imports, loading or embedding, whichever the moment is; batches of 8 run in shares on the CPU
    backend's worker threads."""
    out = tmp_path / "out" / "e.npz"
    out.parent.mkdir()
    proc, lines = start([sys.executable, "-m", "aim_mlx"], job, out)
    time.sleep(after)
    interrupt_and_check(proc, lines, out)


@pytest.mark.parametrize("batch_size, into_run", [(1, 0.0), (1, 0.4), (8, 0.4)])
def test_sigint_once_the_model_is_loaded(job, tmp_path, batch_size, into_run):
    out = tmp_path / "out" / "e.npy"
    out.parent.mkdir()
    proc, lines = start([sys.executable, "-c", WITH_INFO_LOGS], job, out, "--batch-size", str(batch_size))
    wait_for(lines, "log: loaded")
    time.sleep(into_run)
    said = interrupt_and_check(proc, lines, out)
    assert re.fullmatch(rf"interrupted after \d+ of {IMAGES * ROUNDS} images; nothing written", said)


def test_sigint_swept_through_the_first_batch(job, tmp_path):
    """Ten runs, each interrupted a little later into its first batch, where the backend makes its threads."""
    for i in range(10):
        out = tmp_path / f"out{i}" / "e.npy"
        out.parent.mkdir()
        proc, lines = start([sys.executable, "-c", WITH_INFO_LOGS], job, out)
        wait_for(lines, "log: loaded")
        time.sleep(0.04 * i)
        interrupt_and_check(proc, lines, out)


def test_the_aim_mlx_script_stops_on_sigint(job, tmp_path):
    script = Path(sys.executable).parent / "aim-mlx"
    if not script.exists():
        pytest.skip("the aim-mlx script is not installed beside this Python")
    out = tmp_path / "out" / "e.jsonl"
    out.parent.mkdir()
    proc, lines = start([str(script)], job, out)
    time.sleep(2.0)
    interrupt_and_check(proc, lines, out)


def test_a_ctrl_c_while_the_command_line_loads_is_one_line(monkeypatch, capsys):
    """main() imports the app itself, so that an interrupt there (Typer, the commands) ends like any other."""
    import aim_mlx.cli as cli

    class Interrupt:  # an import finder that interrupts the app's import
        def find_spec(self, name, path=None, target=None):
            if name == "aim_mlx.cli.root":
                raise KeyboardInterrupt
            return None

    def exit_now(code):  # main() ends the process at once with os._exit; here that would end pytest
        raise SystemExit(code)

    monkeypatch.delitem(sys.modules, "aim_mlx.cli.root", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupt(), *sys.meta_path])
    monkeypatch.setattr(cli.os, "_exit", exit_now)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # leave pytest's own Ctrl-C alone
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 130 and capsys.readouterr().err == "interrupted; nothing written\n"


def test_a_ctrl_c_while_the_arguments_are_parsed_is_one_line(monkeypatch):
    """Typer turns an interrupt outside a command into a silent exit 130; the root group says it."""
    from typer.core import TyperGroup
    from typer.testing import CliRunner

    from aim_mlx.cli import app

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(TyperGroup, "make_context", interrupt)
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 130 and result.stderr == "interrupted; nothing written\n"
