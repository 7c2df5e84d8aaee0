"""Searching a library: the model that built the index, and cosine top-k over its vectors held in memory.

A query is embedded by the model whose vectors it is compared with (same identity, `model.info.key`), so a
search never mixes spaces: text through the LiT text tower, an image file through the image tower, or an
indexed photo's own vector ("more like this").
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aim_mlx.errors import ConfigError
from aim_mlx.registry import require_text
from aim_mlx.variants import DEFAULT_TEXT_MODEL

from .db import Library, LibraryError


@dataclass
class Hit:
    id: int
    path: str
    score: float  # cosine similarity, -1 to 1

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "score": round(self.score, 6)}


class Vectors:
    """One model's vectors, L2-normalised float32 (n, D), with their file ids and paths: exact top-k."""

    def __init__(self, ids: np.ndarray, paths: list[str], matrix: np.ndarray):
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        self.ids, self.paths = ids, paths
        self.matrix = matrix / np.maximum(norms, 1e-12)
        self.row = {int(i): r for r, i in enumerate(ids)}

    @classmethod
    def load(cls, library: Library, model_id: int) -> "Vectors":
        return cls(*library.vectors(model_id))

    def __len__(self) -> int:
        return len(self.ids)

    def vector(self, file_id: int) -> np.ndarray:
        if file_id not in self.row:
            raise ConfigError(f"no indexed photo has id {file_id}")
        return self.matrix[self.row[file_id]]

    def top_k(self, query: np.ndarray, k: int = 10, exclude: int | None = None) -> list[Hit]:
        """The k rows most similar to `query` (D,), best first; `exclude`: a file id left out."""
        if not len(self):
            return []
        query = np.asarray(query, np.float32).reshape(-1)
        scores = self.matrix @ (query / max(float(np.linalg.norm(query)), 1e-12))
        if exclude is not None and exclude in self.row:
            scores[self.row[exclude]] = -np.inf
        k = min(k, len(self) - (exclude in self.row if exclude is not None else 0))
        top = np.argpartition(-scores, k - 1)[:k] if k > 0 else np.array([], dtype=np.int64)
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Hit(int(self.ids[r]), self.paths[r], float(scores[r])) for r in top]


def choose_model(library: Library, wanted: str | None = None) -> dict:
    """The library's model to search with: `wanted` (a hub id, folder or key), else the only one, else the
    default LiT checkpoint when it indexed something. One clear line when there is no choice to make."""
    models = [m for m in library.models() if m["files"]]
    if not models:
        raise LibraryError(f"{library.path} holds no photos yet; run `aim-mlx index FOLDER` first")
    if wanted:
        folder = Path(wanted).expanduser()
        names = {wanted, str(folder.resolve())} if folder.is_dir() else {wanted}
        found = [m for m in models if m["key"] in names or m["info"]["source"] in names]
        if not found:
            known = ", ".join(m["info"]["source"] for m in models)
            raise ConfigError(f"{library.path} has no index made with {wanted}; it has: {known}")
        return found[-1]
    if len(models) == 1:
        return models[0]
    default = [m for m in models if m["info"]["source"] == DEFAULT_TEXT_MODEL]
    if default:
        return default[-1]
    known = ", ".join(m["info"]["source"] for m in models)
    raise ConfigError(f"{library.path} has indexes from several models ({known}); choose one with -m")


def load_model(entry: dict):
    """The model that built `entry`'s vectors, loaded as it was (source, revision, dtype); refuses one whose
    identity changed since (a local folder edited), which would mix spaces."""
    from aim_mlx.loading import load

    info = entry["info"]
    model, processor = load(info["source"], revision=info["revision"], dtype=info["dtype"])
    if model.info.key != entry["key"]:
        raise ConfigError(
            f"{info['source']} has changed since this library was indexed with it; run `aim-mlx index` again"
        )
    return model, processor


def text_query(model, text: str) -> np.ndarray:
    import mlx.core as mx

    require_text(model, "search by text")
    return np.asarray(model.encode_text([text]).astype(mx.float32))[0]


def image_query(model, processor, path: str | Path) -> np.ndarray:
    import mlx.core as mx

    pixels = mx.array(processor.preprocess_one(Path(path))[None])
    return np.asarray(model.encode_image(pixels).astype(mx.float32))[0]
