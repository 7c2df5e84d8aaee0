"""A Hugging Face cache in huggingface_hub's real on-disk layout, for offline hub tests."""

import hashlib
import json
from pathlib import Path


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], ref: str | None = None):
    """Store `files` as huggingface_hub does: content-addressed blobs, snapshot symlinks, refs/<branch>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if name.endswith((".safetensors", ".bin")):  # LFS files are named by sha256, others by git blob sha1
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (repo / "snapshots" / commit / name).symlink_to(Path("..", "..", "blobs", blob))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return repo / "snapshots" / commit


def add_folder(cache: Path, repo_id: str, commit: str, folder: Path, ref: str | None = "main") -> Path:
    """Cache the files of a checkpoint folder as `repo_id` at `commit`."""
    return add_snapshot(cache, repo_id, commit, {p.name: p.read_bytes() for p in folder.iterdir()}, ref)


def add_tree_listing(cache: Path, repo_id: str, commit: str, names) -> None:
    """The per-commit file listing newer huggingface_hub versions keep (trees/<commit>.json)."""
    trees = cache / f"models--{repo_id.replace('/', '--')}" / "trees"
    trees.mkdir(parents=True, exist_ok=True)
    files = {name: {"size": 1, "blob_id": "0" * 40} for name in names}
    (trees / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": files}))
