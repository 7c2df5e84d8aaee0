"""aim_mlx/files.py: the cache directory; writes that land whole with normal permissions, or not at all."""

import os
import stat

import pytest

from aim_mlx import files


def test_cache_dir_reads_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "mine"))
    assert files.cache_dir("blas") == tmp_path / "mine" / "blas"
    monkeypatch.setenv("AIM_MLX_CACHE", "")  # empty counts as unset, never the working directory
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert files.cache_dir("text-embeddings") == tmp_path / "xdg" / "aim-mlx" / "text-embeddings"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert files.cache_dir() == files.Path(os.path.expanduser("~")) / ".cache" / "aim-mlx"


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_file_lands_whole_with_normal_permissions(tmp_path, umask_022):
    target = tmp_path / "sub" / "out.npy"
    with files.atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".npy" and tmp != target
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))  # a private temporary file
        assert not target.exists()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    with pytest.raises(KeyboardInterrupt), files.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"" and sorted(p.name for p in target.parent.iterdir()) == ["out.npy"]


def test_atomic_folder_is_not_private_and_leaves_nothing_on_failure(tmp_path, umask_022):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError), files.atomic_folder(out) as staging:
        (staging / "a.txt").write_text("partial")
        raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []
    with files.atomic_folder(out) as staging:
        (staging / "a.txt").write_text("one")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and (out / "a.txt").read_text() == "one"
    with pytest.raises(FileExistsError), files.atomic_folder(out) as staging:
        (staging / "a.txt").write_text("two")
    assert (out / "a.txt").read_text() == "one" and list(tmp_path.iterdir()) == [out]
    with files.atomic_folder(out, replace=True) as staging:
        (staging / "b.txt").write_text("two")
    assert [p.name for p in out.iterdir()] == ["b.txt"] and list(tmp_path.iterdir()) == [out]


def test_two_writers_of_one_file_do_not_share_a_temporary(tmp_path):
    """Threads of a server making the same thumbnail at once: each writes its own temporary, and the file
    lands whole from one of them."""
    target = tmp_path / "thumb.jpg"
    with files.atomic_file(target) as first, files.atomic_file(target) as second:
        assert first != second and first.suffix == second.suffix == ".jpg"
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["thumb.jpg"]
