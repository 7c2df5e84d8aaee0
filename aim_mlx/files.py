"""One home for where aim-mlx keeps files and how it writes them.

- `cache_dir()`: aim-mlx's own cache (the BLAS copy, zero-shot label embeddings), `$AIM_MLX_CACHE`, else
  `$XDG_CACHE_HOME/aim-mlx`, else `~/.cache/aim-mlx`. An empty variable counts as unset.
- `data_dir()`: aim-mlx's data (the photo library's database), `$AIM_MLX_DATA`, else the platform's place
  for application data: `~/Library/Application Support/aim-mlx` on macOS, `$XDG_DATA_HOME/aim-mlx` or
  `~/.local/share/aim-mlx` elsewhere.
- `atomic_file` and `atomic_folder`: a write that a reader never sees half done and that a failure (or an
  interrupt) leaves no trace of. What lands has the user's normal permissions (0666/0777 less the umask),
  not the private mode of a temporary file or folder.

Standard library only: `import aim_mlx` reads the cache directory before anything else loads.
"""

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """aim-mlx's cache directory, or a folder below it (not created here)."""
    root = os.environ.get("AIM_MLX_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "aim-mlx")
    return Path(root, *parts)


def data_dir(*parts: str) -> Path:
    """aim-mlx's data directory, or a path below it (not created here)."""
    root = os.environ.get("AIM_MLX_DATA")
    if not root:
        home = os.path.expanduser("~")
        if sys.platform == "darwin":
            root = os.path.join(home, "Library", "Application Support", "aim-mlx")
        else:
            root = os.path.join(
                os.environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share"), "aim-mlx"
            )
    return Path(root, *parts)


def _umask() -> int:
    """The process's umask: from /proc on Linux; elsewhere by setting it and putting it straight back (which,
    for that instant, another thread creating a file would see)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def normal_mode(folder: bool = False) -> int:
    """The mode a file (or folder) gets when the user creates it: 0666 (0777) less the umask."""
    return (0o777 if folder else 0o666) & ~_umask()


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it is renamed over `path`, on any error
    (KeyboardInterrupt included) it is removed. The temporary name is unique (threads and processes writing
    the same file do not meet) and keeps `path`'s suffix, so that writers which append a missing one (numpy)
    write where they are told."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, normal_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; on success it becomes `path`, on any error it is deleted.

    `replace`: an existing `path` is swapped out (moved aside, then deleted once the new one is in place);
    without it, a `path` that appeared meanwhile raises FileExistsError and the staging folder is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        os.chmod(staging, normal_mode(folder=True))  # mkdtemp makes it 0700
        _swap_in(staging, path, replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(new: Path, path: Path, replace: bool) -> None:
    if not path.exists() and not path.is_symlink():
        os.replace(new, path)
        return
    if not replace:
        raise FileExistsError(f"{path} exists")
    # A folder cannot be renamed over a non-empty one: move the old one aside first, delete it last.
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.replace(path, old / path.name)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old / path.name, path)  # put the old one back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def save_figure(fig, path: str | os.PathLike) -> None:
    """A matplotlib figure written to `path` whole or not at all (the temporary name keeps the suffix, which
    picks the format), then closed."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
