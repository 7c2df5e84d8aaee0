"""Searching a library: the model that built the index, filters over what the photos' EXIF says, and cosine
top-k over the vectors held in memory.

A query is embedded by the model whose vectors it is compared with (same identity, `model.info.key`), so a
search never mixes spaces. It is one or more terms joined by + and - (`parse_query`): texts through the LiT
text tower, image files through the image tower, indexed photos (`id:N`) by their own vectors, each with an
optional weight (`2:a dog`). As rclip does, the query vector is the normalised weighted sum of the
normalised term vectors, a - term's weight counted negative; a score is the cosine similarity to it, -1 to 1,
whatever the size of the library.

Filters (capture date, folder, camera, distance, a minimum score) choose the rows before the top k are taken,
so `k` filtered results come back whenever that many photos pass. Below APPROX_FROM vectors, or when no
more than EXACT_UPTO rows pass a filter, the search is exact: one float32 matrix-vector product over the
rows. Above it, a first pass scores int8 copies of the vectors with usearch's SIMD kernels (a quarter of the
memory traffic) and keeps the best CANDIDATES among the rows that pass; those are re-ranked with their
float32 vectors, so every score returned is exact and only the choice of candidates is approximate
(recall@10 against exact search: benchmarks/RESULTS.md). There is no graph index to build or keep in step
with the library: HNSW builds took minutes per 100 000 vectors on a 2-core machine, which every re-index
would pay.
"""

import math
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from aim_mlx.checkpoints.variants import DEFAULT_TEXT_MODEL
from aim_mlx.errors import ConfigError
from aim_mlx.extras import missing, optional
from aim_mlx.inputs.images import image_suffixes
from aim_mlx.log import warn_once
from aim_mlx.registry import FAMILIES, require_text, text_models

from .db import Library, LibraryError

APPROX_FROM = 20_000  # vectors; see benchmarks/bench_library.py for where exact search gets slow
CANDIDATES = 100  # at least this many (and 10 per result asked for) go on to exact re-ranking
EXACT_UPTO = 5_000  # rows passing a filter that are scored exactly, without the int8 pass (15 MB to gather)
EARTH_KM = 6371.0088  # the mean Earth radius, for great-circle distances
DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
WEIGHT = re.compile(r"(\d+(?:\.\d*)?|\.\d+):(.+)", re.S)  # "2:a dog", "0.5:beach.jpg"
PHOTO = re.compile(r"id:(\d+)")


class FilterError(ConfigError):
    """A filter value that cannot be used; `name` is the Filters field (the CLI and the API name their own
    flag or parameter for it), `reason` says what was expected."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


@dataclass(frozen=True)
class Filters:
    """Which photos a search may return. Dates compare with the capture time as the camera's clock showed
    it (EXIF's local time); a photo the filter needs a fact about and that lacks it does not pass."""

    after: str | None = None  # ISO date-time: taken at or after it
    before: str | None = None  # ... and before it
    folders: tuple[str, ...] = ()  # resolved folders, without a trailing separator; a photo under any passes
    camera: str | None = None  # a case-insensitive part of "Make Model"
    near: tuple[float, float] | None = None  # (lat, lon) in degrees ...
    within_km: float | None = None  # ... and the distance from it
    min_score: float | None = None  # cosine similarity to the query

    @classmethod
    def parse(
        cls,
        after: str | None = None,
        before: str | None = None,
        folders=(),
        camera: str | None = None,
        near: str | None = None,
        within: str | float | None = None,
        min_score: str | float | None = None,
    ) -> "Filters":
        """Filters from what a person types: dates as YYYY, YYYY-MM or YYYY-MM-DD (`after` from the start
        of that year, month or day, `before` up to its start), folders (which must exist), "LAT,LON" and
        kilometres. Raises FilterError naming the field."""
        near_at = _position(near) if near not in (None, "") else None
        km = _number("within", within, 0, math.inf, low_open=True)
        if (near_at is None) != (km is None):
            missing_one = "within" if km is None else "near"
            raise FilterError(missing_one, "--near LAT,LON and --within KM go together; give both")
        if camera is not None and not camera.strip():
            raise FilterError("camera", "expected a part of a camera's make or model, not an empty text")
        start, end = _date("after", after), _date("before", before)
        if start and end and start >= end:
            raise FilterError("before", f"{before!r} is not later than --after {after!r}: no date is between")
        return cls(
            after=start,
            before=end,
            folders=tuple(_folder(f) for f in folders or ()),
            camera=camera.strip() if camera else None,
            near=near_at,
            within_km=km,
            min_score=_number("min_score", min_score, -1, 1),
        )

    def __bool__(self) -> bool:
        return any(v not in (None, ()) for v in vars(self).values())


def _date(name: str, text: str | None) -> str | None:
    if text in (None, ""):
        return None
    match = DATE.fullmatch(text.strip())
    try:
        if match is None:
            raise ValueError
        year, month, day = (int(g) if g else 1 for g in match.groups())
        return datetime(year, month, day).isoformat()
    except ValueError:
        raise FilterError(name, f"expected a date as YYYY, YYYY-MM or YYYY-MM-DD, not {text!r}") from None


def _position(text: str) -> tuple[float, float]:
    try:
        lat, lon = (float(part) for part in text.split(","))
    except ValueError:
        lat = lon = math.nan
    if not (abs(lat) <= 90 and abs(lon) <= 180):  # (false for NaN)
        raise FilterError(
            "near", f"expected LAT,LON in decimal degrees (-90 to 90, -180 to 180), not {text!r}"
        )
    return lat, lon


def _number(name: str, raw, low: float, high: float, low_open: bool = False) -> float | None:
    if raw in (None, ""):
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not ((low < value if low_open else low <= value) and value <= high):
        if high == math.inf:
            raise FilterError(name, f"expected a number above {low:g}, not {raw!r}")
        raise FilterError(name, f"expected a number from {low:g} to {high:g}, not {raw!r}")
    return value


def _folder(text: str) -> str:
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise FilterError("folders", f"{text}: no such folder")
    return str(folder.resolve()).rstrip(os.sep) or os.sep


def haversine_km(lat, lon, lat0: float, lon0: float):
    """Great-circle distances in km from (lat0, lon0) to arrays of positions (degrees)."""
    lat, lon, lat0, lon0 = np.radians(lat), np.radians(lon), math.radians(lat0), math.radians(lon0)
    a = np.sin((lat - lat0) / 2) ** 2 + np.cos(lat) * math.cos(lat0) * np.sin((lon - lon0) / 2) ** 2
    return 2 * EARTH_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


@dataclass
class Hit:
    id: int
    path: str
    score: float  # cosine similarity, -1 to 1
    taken: str | None = None  # ISO 8601, the camera's local time (+HH:MM when EXIF has it)
    lat: float | None = None
    lon: float | None = None
    camera: str | None = None

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "path": self.path,
            "score": round(self.score, 6),
            "taken": self.taken,
            "lat": self.lat,
            "lon": self.lon,
            "camera": self.camera,
        }


class Vectors:
    """One model's vectors, L2-normalised float32 (n, D), with their file ids, paths and facts (see
    Library.search_rows): top-k by cosine among the rows that pass a filter."""

    def __init__(
        self,
        ids: np.ndarray,
        paths: list[str],
        matrix: np.ndarray,
        facts: dict | None = None,
        approx_from: int | None = None,
        exact_upto: int | None = None,
    ):
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        self.ids, self.paths = ids, paths
        self.matrix = matrix / np.maximum(norms, 1e-12)
        self.row = {int(i): r for r, i in enumerate(ids)}
        n = len(ids)
        facts = facts or {}
        self.taken = facts.get("taken") or [None] * n
        self.lat = facts.get("lat", np.full(n, np.nan))
        self.lon = facts.get("lon", np.full(n, np.nan))
        self.camera = facts.get("camera") or [None] * n
        self._columns: dict = {}  # facts in the forms filters compare fast (see `column`)
        self.codes = None  # int8 copies for the first pass, above `approx_from` vectors
        self.exact_upto = EXACT_UPTO if exact_upto is None else exact_upto
        if n >= (APPROX_FROM if approx_from is None else approx_from) and _usearch() is not None:
            self.codes = _int8(self.matrix)

    @classmethod
    def load(cls, library: Library, model_id: int) -> "Vectors":
        return cls(*library.search_rows(model_id))

    def __len__(self) -> int:
        return len(self.ids)

    def vector(self, file_id: int) -> np.ndarray:
        if file_id not in self.row:
            raise ConfigError(f"no indexed photo has id {file_id}")
        return self.matrix[self.row[file_id]]

    def hit(self, row: int, score: float) -> Hit:
        lat, lon = float(self.lat[row]), float(self.lon[row])
        known = not (math.isnan(lat) or math.isnan(lon))
        return Hit(
            int(self.ids[row]),
            self.paths[row],
            score,
            self.taken[row],
            lat if known else None,
            lon if known else None,
            self.camera[row],
        )

    def column(self, name: str):
        """A fact in the form filters compare fast, made when first used: "taken" as datetime64 (NaT where
        unknown, the offset left out: the camera's clock), "camera" and "folder" as (codes per row, the
        distinct values; -1 where unknown), so that a text is matched once per distinct value."""
        if name not in self._columns:
            if name == "taken":
                local = [t[:19] if t else "NaT" for t in self.taken]
                try:
                    taken = np.array(local, dtype="datetime64[s]")
                except ValueError:  # a time no camera can have (not one scan.py wrote): unknown
                    taken = np.array([_datetime64(t) for t in local], dtype="datetime64[s]")
                self._columns[name] = taken.reshape(-1)
            else:
                values = self.camera if name == "camera" else [os.path.dirname(p) for p in self.paths]
                distinct: dict[str, int] = {}
                codes = np.array([-1 if v is None else distinct.setdefault(v, len(distinct)) for v in values])
                self._columns[name] = (codes.astype(np.int64).reshape(-1), list(distinct))
        return self._columns[name]

    def matching(self, name: str, match) -> np.ndarray:
        """The rows whose `name` value (see `column`) `match(value)` accepts."""
        codes, values = self.column(name)
        return np.isin(codes, [i for i, value in enumerate(values) if match(value)])

    def mask(self, filters: Filters) -> np.ndarray:
        """The rows that pass `filters` (all but the score threshold), as a boolean array."""
        keep = np.ones(len(self), dtype=bool)
        if filters.after or filters.before:
            taken = self.column("taken")
            keep &= ~np.isnat(taken)
            if filters.after:
                keep &= taken >= np.datetime64(filters.after, "s")
            if filters.before:
                keep &= taken < np.datetime64(filters.before, "s")
        if filters.folders:
            keep &= self.matching(
                "folder",
                lambda d: any(d == f or d.startswith(f.rstrip(os.sep) + os.sep) for f in filters.folders),
            )
        if filters.camera:
            part = filters.camera.lower()
            matches = self.matching("camera", lambda camera: part in camera.lower())
            if not matches.any():
                known = sorted(self.column("camera")[1])
                listed = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "") if known else "none"
                raise FilterError(
                    "camera",
                    f"no photo here was taken with a camera matching {filters.camera!r}; "
                    f"cameras in the library: {listed}",
                )
            keep &= matches
        if filters.near is not None:
            lat0, lon0 = filters.near
            with np.errstate(invalid="ignore"):  # NaN (no position) compares False
                # a great circle is no shorter than its change in latitude (111.2 km a degree on this
                # sphere): rows outside that band, with a margin, need no haversine
                band = np.flatnonzero(keep & (np.abs(self.lat - lat0) <= filters.within_km / 110.5))
                near = haversine_km(self.lat[band], self.lon[band], lat0, lon0) <= filters.within_km
            keep = np.zeros(len(self), dtype=bool)
            keep[band[near]] = True
        return keep

    def top_k(
        self, query: np.ndarray, k: int = 10, exclude=None, filters: Filters | None = None
    ) -> list[Hit]:
        """The k rows most similar to `query` (D,) among those that pass `filters`, best first; `exclude`:
        a file id (or several) left out."""
        query = np.asarray(query, np.float32).reshape(-1)
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        filters = filters or Filters()
        mask = self.mask(filters) if filters else None
        skip = [self.row[i] for i in _ids(exclude) if i in self.row]
        if skip:
            mask = np.ones(len(self), dtype=bool) if mask is None else mask
            mask[skip] = False
        rows = np.arange(len(self)) if mask is None else np.flatnonzero(mask)
        k = min(k, len(rows))
        if k <= 0:
            return []
        count = max(CANDIDATES, 10 * k)
        if self.codes is not None and len(rows) > (count if mask is None else max(count, self.exact_upto)):
            rows = self.candidates(query, count, mask)
            scores = _product(self.matrix[rows], query)  # exact re-ranking
        elif len(rows) > len(self) // 4:  # most rows: one product over all, then the rows picked
            scores = _product(self.matrix, query)[rows]
        else:
            scores = _product(self.matrix[rows], query)
        if filters.min_score is not None:
            passed = scores >= filters.min_score
            rows, scores = rows[passed], scores[passed]
            k = min(k, len(rows))
            if k <= 0:
                return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [self.hit(int(rows[t]), float(scores[t])) for t in top]

    def candidates(self, query: np.ndarray, count: int, mask: np.ndarray | None = None) -> np.ndarray:
        """Rows of the `count` best int8 scores among the rows `mask` passes (usearch's exact scan of the
        int8 copies). A filter that passes a good share of the rows takes the best of all the rows, enough
        of them that `count` should pass, and checks that they did; otherwise the rows that pass are
        scanned alone."""
        usearch = _usearch()
        code = _int8(query[None])[0]

        def best(codes: np.ndarray, n: int) -> np.ndarray:
            found = usearch.search(codes, code, min(n, len(codes)), usearch.MetricKind.IP, exact=True)
            return np.asarray(found.keys, dtype=np.int64)

        if mask is None:
            return best(self.codes, count)
        share = float(mask.mean())
        if share >= 0.05:
            found = best(self.codes, math.ceil(2 * count / share))
            kept = found[mask[found]]
            if len(kept) >= count:  # the best of all that pass are the best of those that pass
                return kept[:count]
        rows = np.flatnonzero(mask)
        return rows[best(self.codes[rows], count)]


def _product(rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """rows @ query; for a few thousand rows without BLAS, whose threads cost more to wake than such a
    product (a 16 ms floor on a busy 2-core machine against 0.7 ms for 5 000 x 768 on one core)."""
    return np.einsum("ij,j->i", rows, query) if len(rows) <= EXACT_UPTO else rows @ query


def _datetime64(text: str) -> np.datetime64:
    try:
        return np.datetime64(text, "s")
    except ValueError:
        return np.datetime64("NaT")


def _ids(exclude) -> list[int]:
    if exclude is None:
        return []
    return [int(exclude)] if isinstance(exclude, int | np.integer) else [int(i) for i in exclude]


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


@dataclass(frozen=True)
class Term:
    """One term of a query: a text, an image file or an indexed photo's id, with its signed weight."""

    kind: str  # "text", "image" or "photo"
    value: str | int
    weight: float = 1.0  # a - term's is negative

    def __str__(self) -> str:
        return f"id:{self.value}" if self.kind == "photo" else str(self.value)


def parse_query(words: list[str], files: bool = True) -> list[Term]:
    """Terms from a query's words, as a shell passes them: `a dog + beach.jpg - 0.5:people`. The words `+`
    and `-` (or a word's leading + or -) join terms, a - term counting against; words in a row make one term.
    A term is `id:N` (an indexed photo), an image file (one that exists, or a name with an image suffix:
    `files=False`, as for the web API, reads every other term as text), or a text; `W:` before it weights it
    (default 1)."""
    groups: list[tuple[str, list[str]]] = []
    for word in map(str.strip, words):
        if not word:
            continue
        sign = word[:1] if word[:1] in ("+", "-") else None
        if sign is not None:
            groups.append((sign, []))
            word = word[1:].strip()
        elif not groups:
            groups.append(("+", []))
        if word:
            groups[-1][1].append(word)
    terms = []
    for sign, group in groups:
        if not group:
            raise ConfigError(f"nothing after {sign!r} in the query; put a text, an image file or id:N there")
        terms.append(_term(" ".join(group), -1.0 if sign == "-" else 1.0, files))
    return terms


def parse_text(text: str) -> list[Term]:
    """Terms from one line typed in the web page: `a dog -people +2:id:12` (see parse_query; no files)."""
    return parse_query(text.split(), files=False)


def _term(text: str, sign: float, files: bool) -> Term:
    weight = 1.0
    match = WEIGHT.fullmatch(text)
    if match:
        weight, text = float(match.group(1)), match.group(2).strip()
    if PHOTO.fullmatch(text):
        return Term("photo", int(text[3:]), sign * weight)
    if text.startswith("id:"):
        raise ConfigError(f"{text}: expected id:N, N an indexed photo's id (search with --json shows them)")
    path = Path(text).expanduser()
    if files and (path.suffix.lower() in image_suffixes() or path.is_file()):
        return Term("image", str(path), sign * weight)
    return Term("text", text, sign * weight)


def query_vector(terms: list[Term], vectors: Vectors, model=None, processor=None) -> np.ndarray:
    """The normalised weighted sum of the terms' normalised vectors (as rclip does)."""
    total = None
    for term in terms:
        if term.kind == "photo":
            if term.value not in vectors.row:
                raise ConfigError(f"id:{term.value}: no indexed photo has id {term.value}")
            vector = vectors.vector(term.value)
        elif term.kind == "text":
            vector = text_query(model, term.value)
        else:
            vector = image_query(model, processor, term.value)  # errors name the file
        vector = term.weight * vector / max(float(np.linalg.norm(vector)), 1e-12)
        total = vector if total is None else total + vector
    norm = float(np.linalg.norm(total)) if total is not None else 0.0
    if norm < 1e-6:
        raise ConfigError("the query's terms cancel out (their weighted sum is zero); change a weight")
    return total / norm


def find(
    db_path: str | Path,
    terms: list[Term],
    k: int = 10,
    filters: Filters | None = None,
    model: str | None = None,
    load=None,
) -> list[Hit]:
    """The library's `k` best matches among the photos `filters` pass, best first, for a query of `terms`
    (see parse_query). Photos named by a + id:N term are left out of the results, as "more like this" does;
    a query of ids alone loads no model. `model`: which of the library's indexes (see `choose_model`);
    `load`: how to load its model (aim_mlx.load's signature, the default)."""
    if not terms:
        raise ConfigError(
            "give one query: a TEXT, an image file or id:N, or several joined by + and -; or --image FILE "
            "or --like ID"
        )
    for term in terms:  # before a model is loaded
        if term.kind == "image" and not Path(term.value).is_file():
            raise ConfigError(f"{term.value}: no such file")
    with Library.reader(db_path) as library:
        entry = choose_model(library, model)
        info = entry["info"]
        if any(t.kind == "text" for t in terms) and not FAMILIES[info["family"]].text:
            raise ConfigError(
                f"this library was indexed with {info['source']}, which has no text tower; search it with "
                f"--image, or index with {', '.join(text_models())} to search by text"
            )
        vectors = Vectors.load(library, entry["id"])
        net = processor = None
        if any(t.kind != "photo" for t in terms):
            net, processor = load_model(entry, load)
        vector = query_vector(terms, vectors, net, processor)
        exclude = [t.value for t in terms if t.kind == "photo" and t.weight > 0]
        return vectors.top_k(vector, k, exclude, filters)


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
