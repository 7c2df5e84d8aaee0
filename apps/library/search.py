"""Searching a library: the model that built the index, and cosine top-k over its vectors held in memory.

A query is embedded by the model whose vectors it is compared with (same identity, `model.info.key`), so a
search never mixes spaces: text through the LiT text tower, an image file through the image tower, or an
indexed photo's own vector ("more like this").

Below APPROX_FROM vectors the search is exact: one float32 matrix-vector product. Above it, a first pass
scores int8 copies of the vectors with usearch's SIMD kernels (a quarter of the memory traffic) and keeps
the best CANDIDATES; those are re-ranked with their float32 vectors, so every score returned is exact and
only the choice of candidates is approximate (recall@10 against exact search: benchmarks/RESULTS.md).
There is no graph index to build or keep in step with the library: HNSW builds took minutes per 100 000
vectors on a 2-core machine, which every re-index would pay.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aim_mlx.checkpoints.variants import DEFAULT_TEXT_MODEL
from aim_mlx.errors import ConfigError
from aim_mlx.extras import missing, optional
from aim_mlx.log import warn_once
from aim_mlx.registry import FAMILIES, require_text, text_models

from .db import Library, LibraryError

APPROX_FROM = 20_000  # vectors; see benchmarks/bench_library.py for where exact search gets slow
CANDIDATES = 100  # at least this many (and 10 per result asked for) go on to exact re-ranking


@dataclass
class Hit:
    id: int
    path: str
    score: float  # cosine similarity, -1 to 1

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "score": round(self.score, 6)}


class Vectors:
    """One model's vectors, L2-normalised float32 (n, D), with their file ids and paths: top-k by cosine."""

    def __init__(self, ids: np.ndarray, paths: list[str], matrix: np.ndarray, approx_from: int = APPROX_FROM):
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        self.ids, self.paths = ids, paths
        self.matrix = matrix / np.maximum(norms, 1e-12)
        self.row = {int(i): r for r, i in enumerate(ids)}
        self.codes = None  # int8 copies for the first pass, above `approx_from` vectors
        if len(ids) >= approx_from and _usearch() is not None:
            self.codes = _int8(self.matrix)

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
        query = np.asarray(query, np.float32).reshape(-1)
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        skip = self.row.get(exclude) if exclude is not None else None
        k = min(k, len(self) - (skip is not None))
        if k <= 0:
            return []
        if self.codes is None:
            rows = np.arange(len(self))
            scores = self.matrix @ query
        else:
            rows = self.candidates(query, max(CANDIDATES, 10 * k) + (skip is not None))
            scores = self.matrix[rows] @ query  # exact re-ranking
        if skip is not None:
            scores[rows == skip] = -np.inf
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Hit(int(self.ids[rows[t]]), self.paths[rows[t]], float(scores[t])) for t in top]

    def candidates(self, query: np.ndarray, count: int) -> np.ndarray:
        """Rows of the `count` best int8 scores (usearch's exact scan of the int8 copies)."""
        usearch = _usearch()
        found = usearch.search(
            self.codes, _int8(query[None])[0], min(count, len(self)), usearch.MetricKind.IP, exact=True
        )
        return np.asarray(found.keys, dtype=np.int64)


def _int8(rows: np.ndarray) -> np.ndarray:
    """Unit vectors as int8 codes, one scale for all (cosine order is kept up to rounding)."""
    scale = 127.0 / max(float(np.abs(rows).max(initial=0.0)), 1e-12)
    return np.clip(np.rint(rows * scale), -127, 127).astype(np.int8)


def _usearch():
    """usearch.index, or None (with a warning once) when the `library` extra is not installed."""
    index = optional("usearch.index")
    if index is None:
        warn_once(f"exact search only: {missing('usearch')}")
    return index


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


def find(
    db_path: str | Path,
    text: str | None = None,
    image: str | Path | None = None,
    like: int | None = None,
    k: int = 10,
    model: str | None = None,
    load=None,
) -> list[Hit]:
    """The library's `k` best matches, best first, for one query: a text, an image file, or an indexed
    photo's id (its own vector; no model is loaded). `model`: which of the library's indexes (see
    `choose_model`); `load`: how to load its model (aim_mlx.load's signature, the default)."""
    if sum(x is not None for x in (text, image, like)) != 1:
        raise ConfigError("give one query: a TEXT, --image FILE or --like ID")
    with Library.reader(db_path) as library:
        entry = choose_model(library, model)
        info = entry["info"]
        if text is not None and not FAMILIES[info["family"]].text:
            raise ConfigError(
                f"this library was indexed with {info['source']}, which has no text tower; search it with "
                f"--image, or index with {', '.join(text_models())} to search by text"
            )
        vectors = Vectors.load(library, entry["id"])
        if like is not None:
            return vectors.top_k(vectors.vector(like), k, exclude=like)
        net, processor = load_model(entry, load)
        vector = text_query(net, text) if text is not None else image_query(net, processor, image)
        return vectors.top_k(vector, k)


def load_model(entry: dict, load=None):
    """The model that built `entry`'s vectors, loaded as it was (source, revision, dtype) by `load`
    (default aim_mlx.load); refuses one whose identity changed since (a local folder edited), which would
    mix spaces."""
    if load is None:
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
