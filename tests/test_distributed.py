"""`embed` and `index` across the ranks of an mx.distributed job: two ranks started by `mlx.launch` with the
ring backend on loopback give what one process gives (rows, order and values to the bit; the same library), a
rank killed mid-run leaves a valid library that a re-run completes, and the assignment rule."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from checkpoints import make_reference, write_checkpoint, write_processor
from PIL import Image

from aim_mlx.tasks import distributed
from aim_mlx.tasks.embed import Embedded

LAUNCH = Path(sys.executable).with_name("mlx.launch")
BATCH = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = write_checkpoint(make_reference(seed=5), tmp_path_factory.mktemp("aimv2"))
    return write_processor(folder)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """40 real photos of different sizes and contents, with an unreadable file in the middle."""
    root = tmp_path_factory.mktemp("photos")
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "moon"]
    for i in range(40):
        image = Image.fromarray(getattr(skimage.data, names[i % len(names)])()).convert("RGB")
        scale = 0.2 + 0.03 * i
        image = image.resize((int(image.width * scale), int(image.height * scale)))
        image.save(root / f"{i:02d}.jpg", quality=90)
    (root / "17b.jpg").write_bytes(b"not an image at all")
    return root


def aim(*args, timeout=300):
    """`aim-mlx ARGS` in one process."""
    cmd = [sys.executable, "-m", "aim_mlx", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def launch(*args, ranks=2, wait=True):
    """`mlx.launch -n RANKS --backend ring -- aim-mlx ARGS` on loopback, on ports found free."""
    cmd = [LAUNCH, "-n", ranks, "--backend", "ring", "--starting-port", _free_ports(ranks), "--"]
    cmd += [sys.executable, "-m", "aim_mlx", *args]
    cmd = [str(c) for c in cmd]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _free_ports(count: int) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + count < 65536 and all(_free(first + k) for k in range(count)):
            return first
    raise RuntimeError("no free ports on loopback")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_embed_on_two_ranks_equals_one_process(model, photos, tmp_path):
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    single = aim("embed", photos, "-m", model, "-o", one, "--batch-size", BATCH)
    assert single.returncode == 3, single.stderr  # the bad file: skipped, the rest written
    both = launch("embed", photos, "-m", model, "-o", two, "--batch-size", BATCH)
    assert "wrote 40 embeddings" in both.stderr and "17b.jpg: not an image" in both.stderr, both.stderr
    assert both.stderr.count("17b.jpg") == 1  # rank 0 alone reports
    a, b = np.load(one), np.load(two)
    assert list(a["paths"]) == list(b["paths"])  # rows and order
    assert np.array_equal(a["embeddings"], b["embeddings"])  # values, to the bit: the same batches
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "two.npz"]  # no per-rank files


def test_token_grids_on_two_ranks_equal_one_process(model, photos, tmp_path):
    one, two = tmp_path / "one.npy", tmp_path / "two.npy"
    aim("embed", photos, "-m", model, "--pool", "none", "-o", one, "--batch-size", BATCH)
    both = launch("embed", photos, "-m", model, "--pool", "none", "-o", two, "--batch-size", BATCH)
    assert "wrote 40 embeddings" in both.stderr, both.stderr
    a, b = np.load(one), np.load(two)
    assert a.shape[:2] == (40, 16) and a.shape == b.shape  # (images, (56 / 14) ** 2 tokens, width)
    assert np.array_equal(a, b)


def test_index_on_two_ranks_equals_one_process(model, photos, tmp_path):
    one, two = tmp_path / "one.sqlite", tmp_path / "two.sqlite"
    single = aim("index", photos, "--db", one, "-m", model, "--batch-size", BATCH)
    assert single.returncode == 3, single.stderr
    both = launch("index", photos, "--db", two, "-m", model, "--batch-size", BATCH)
    assert "41 new files" in both.stdout and "40 embedded" in both.stdout, both.stdout + both.stderr
    assert _content(one) == _content(two)
    again = launch("index", photos, "--db", two, "-m", model)  # nothing new: no rank loads a model
    assert "40 unchanged" in again.stdout, again.stdout + again.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if "sqlite" not in p.name) == []


def test_ranks_that_would_compute_differently_stop_with_one_line(model, photos, tmp_path):
    """Rank 1 in float16 (what a Mac's GPU picks) beside rank 0 in float32: refused before any work."""
    per_rank = '[ "$MLX_RANK" = 1 ] && export AIM_MLX_DTYPE=float16; exec "$@"'
    out = tmp_path / "e.npz"
    cmd = [LAUNCH, "-n", 2, "--backend", "ring", "--starting-port", _free_ports(2), "--", "sh", "-c"]
    cmd += [per_rank, "sh", sys.executable, "-m", "aim_mlx", "embed", photos, "-m", model, "-o", out]
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert "error: rank 1 loaded a different model from rank 0" in done.stderr, done.stderr
    assert "the same --dtype" in done.stderr and not out.exists()


def _content(db: Path) -> dict:
    with sqlite3.connect(db) as conn:
        return {
            "models": conn.execute("SELECT key, info, dim FROM models").fetchall(),
            "files": conn.execute(  # all but the time of indexing
                "SELECT id, path, model_id, size, mtime_ns, hash, width, height, taken FROM files "
                "ORDER BY path"
            ).fetchall(),
            "vectors": conn.execute("SELECT * FROM vectors ORDER BY hash").fetchall(),
            "failures": conn.execute("SELECT path, size, mtime_ns, reason FROM failures").fetchall(),
        }


def test_a_rank_killed_mid_run_leaves_a_library_that_a_rerun_completes(model, photos, tmp_path):
    """Rank 1 is stopped (SIGSTOP) once some batches are committed, which holds the job mid-run for certain,
    then killed: rank 0 says so, keeps what it finished, and the library passes SQLite's integrity check; a
    re-run on two ranks embeds the rest, every image exactly once."""
    db = tmp_path / "library.sqlite"
    job = launch("index", photos, "--db", db, "-m", model, "--batch-size", 1, wait=False)
    rank1 = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None:
        rank1 = rank1 or _rank_process(1, str(db))
        if rank1 and _count(db) >= 4:
            os.kill(rank1, signal.SIGSTOP)
            break
        time.sleep(0.01)
    assert rank1 and job.poll() is None, "the job ended before rank 1 could be stopped"
    time.sleep(1)
    held = _count(db)
    assert 4 <= held < 40, f"{held} files: not mid-run"
    os.kill(rank1, signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines and "rank 0 on" in lines[0] and "the library keeps the" in lines[0], err
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        kept = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    assert kept >= held
    rerun = launch("index", photos, "--db", db, "-m", model, "--batch-size", BATCH)
    assert f"{kept} unchanged" in rerun.stdout, rerun.stdout + rerun.stderr
    with sqlite3.connect(db) as conn:
        paths = [p for (p,) in conn.execute("SELECT path FROM files")]
        vectors = conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
    assert sorted(paths) == sorted(str(photos / f"{i:02d}.jpg") for i in range(40))  # each exactly once
    assert vectors == 40


def _rank_process(rank: int, marker: str) -> int | None:
    """The pid of the process of `rank` whose command line holds `marker`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker not in (entry / "cmdline").read_bytes().decode(errors="replace"):
                continue
            if f"MLX_RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except OSError:
            continue
    return None


def _count(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            return conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_assignment_deals_whole_batches_by_size_and_is_stable():
    sizes = [5, 1, 1, 1, 9, 9, 2, 2, 3, 3]
    shares = distributed.assign(sizes, 2, unit=2)
    assert shares == distributed.assign(sizes, 2, unit=2)  # the same work, the same shares
    assert sorted(i for share in shares for i in share) == list(range(10))  # each once
    for share in shares:
        assert share == sorted(share)
        assert all(i + 1 in share for i in share if i % 2 == 0)  # whole batches: (0, 1), (2, 3), ...
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert loads == [18, 18]  # the batches weigh 6, 2, 18, 4, 6
    assert distributed.assign([1] * 7, 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert distributed.assign([], 2) == [[], []]


def test_one_process_is_not_a_job(monkeypatch):
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_JACCL_COORDINATOR"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world() is None


class _Rank:
    def __init__(self, rank):
        self._rank = rank

    def rank(self):
        return self._rank


def test_a_file_another_rank_cannot_see_is_named_with_the_rank_and_what_to_do(tmp_path):
    missing = Embedded(tmp_path / "on-rank-0-only.jpg", None, "on-rank-0-only.jpg: no such file")
    line = distributed._located(_Rank(1), missing)
    assert line.startswith("on-rank-0-only.jpg: no such file (rank 1 on ")
    assert "each host must see them at the same path" in line
    assert distributed._located(_Rank(0), missing) == missing.error
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    broken = Embedded(tmp_path / "bad.jpg", None, "bad.jpg: not an image")
    assert distributed._located(_Rank(1), broken) == broken.error  # as one process says it
