"""The photo library's database: SQLite in WAL mode, the system of record.

- `files`: one row per indexed file (path, size, mtime, content hash, pixel size, and what its EXIF says:
  capture time, GPS position, camera). A row exists only once its vector does, for the model that indexed
  it: both are written in one transaction. `facts` is the version of scan.py's header reader that filled
  the EXIF columns: a run re-reads the headers of unchanged files read by an older one, reusing vectors.
- `models`: each model identity (`model.info.key`) that indexed something, with what `load()` needs to load
  it again. `vectors`: one embedding per (model, content hash), so a renamed, moved or copied photo reuses
  its vector, a second model adds rows beside the first, and search never mixes spaces.
- `failures`: files that could not be read, with the reason, until they are fixed or gone.
- `meta`: the schema version; `MIGRATIONS` take an older database forward, a newer one is refused.

WAL lets searches (readers) run while an index run writes; a killed writer leaves the last committed
transaction, which SQLite guarantees whatever the moment of the kill.
"""

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aim_mlx.errors import AimMlxError

SCHEMA_VERSION = 2
FACTS_VERSION = 1  # scan.header's; rows from schema 1 have 0 (they lack GPS and camera)
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE models (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,       -- model.info.key
    info TEXT NOT NULL,             -- model.info as JSON: source, revision, family, dims, dtype, files
    dim INTEGER NOT NULL
);
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    model_id INTEGER NOT NULL REFERENCES models(id),
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash TEXT NOT NULL,             -- SHA-256 of the file's bytes
    width INTEGER,                  -- upright (after EXIF rotation)
    height INTEGER,
    taken TEXT,                     -- EXIF capture time, ISO 8601 (local time, +HH:MM when EXIF says)
    indexed_at REAL NOT NULL,
    lat REAL,                       -- EXIF GPS position, decimal degrees
    lon REAL,
    camera TEXT,                    -- EXIF Make and Model
    facts INTEGER NOT NULL DEFAULT 0,  -- FACTS_VERSION of the reader that filled taken..camera
    UNIQUE (model_id, path)
);
CREATE INDEX files_hash ON files (hash);
CREATE TABLE vectors (
    model_id INTEGER NOT NULL REFERENCES models(id),
    hash TEXT NOT NULL,
    vector BLOB NOT NULL,           -- float32, L2-normalised
    PRIMARY KEY (model_id, hash)
);
CREATE TABLE failures (
    path TEXT PRIMARY KEY,
    size INTEGER,
    mtime_ns INTEGER,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
"""
# version v -> the SQL that takes a database from v to v + 1
MIGRATIONS: dict[int, str] = {
    1: "ALTER TABLE files ADD COLUMN lat REAL; ALTER TABLE files ADD COLUMN lon REAL; "
    "ALTER TABLE files ADD COLUMN camera TEXT; ALTER TABLE files ADD COLUMN facts INTEGER NOT NULL DEFAULT 0",
}


class LibraryError(AimMlxError):
    """A database that cannot be used as it is: newer, locked, corrupt, or not a library."""


@dataclass
class FileFacts:
    """What indexing learns about a file before (or instead of) running the model."""

    path: str
    size: int
    mtime_ns: int
    hash: str
    width: int | None = None
    height: int | None = None
    taken: str | None = None
    lat: float | None = None
    lon: float | None = None
    camera: str | None = None


class Library:
    """One open library database. `Library(path)` creates it (with its folder) if it does not exist."""

    def __init__(self, path: str | Path, create: bool = True, timeout: float = 10.0):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            if not create:
                raise LibraryError(f"{self.path}: no library here yet; run `aim-mlx index FOLDER` first")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
            self.conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise _database_error(self.path, exc) from None

    @classmethod
    def reader(cls, path: str | Path, timeout: float = 10.0, migrate: bool = True) -> "Library":
        """A read-only connection (a server's): it never waits for an index run's write lock, as opening
        with `Library()` (which may migrate) would, and may be used from another thread than its creator's
        as long as one thread uses it at a time. A library of an older schema is brought forward first
        (once, under the write lock), unless `migrate` is False (a dry run, which reads it as it is)."""
        self = cls.__new__(cls)
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise LibraryError(f"{self.path}: no library here yet; run `aim-mlx index FOLDER` first")
        version = self._open_reader(timeout)
        if migrate and version is not None and version < SCHEMA_VERSION:
            self.conn.close()
            Library(self.path, create=False, timeout=timeout).close()
            version = self._open_reader(timeout)
        if version is None:
            raise LibraryError(f"{self.path} is an empty database, not an aim-mlx library")
        if version > SCHEMA_VERSION:
            raise _newer(self.path, version)
        return self

    def _open_reader(self, timeout: float) -> int | None:
        try:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self.conn = sqlite3.connect(
                uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False
            )
            return self._version()
        except sqlite3.DatabaseError as exc:
            raise _database_error(self.path, exc) from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _migrate(self) -> None:
        """Create the schema in a new database, or bring an older one forward, in one write transaction (so
        two processes opening a new library at once cannot both create it). An up-to-date library is only
        read: opening it never waits for another process's write lock."""
        if self._version() == SCHEMA_VERSION:
            return
        with self.transaction():
            version = self._version()  # again, under the lock
            if version is None:
                _run(self.conn, SCHEMA)
                self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                return
            if version > SCHEMA_VERSION:
                raise _newer(self.path, version)
            for step in range(version, SCHEMA_VERSION):
                _run(self.conn, MIGRATIONS[step])
            self.conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))

    def _version(self) -> int | None:
        """The schema version, or None for an empty database."""
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return None
        if "meta" not in tables:
            raise LibraryError(f"{self.path} is an SQLite database but not an aim-mlx library")
        return int(self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])

    def transaction(self):
        """A write transaction (BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error)."""
        return _Transaction(self.conn, self.path)

    # models

    def model_id(self, info) -> int:
        """The id of `info`'s model identity (a ModelInfo), added if new."""
        row = self.conn.execute("SELECT id FROM models WHERE key=?", (info.key,)).fetchone()
        if row:
            return row[0]
        with self.transaction():
            cur = self.conn.execute(
                "INSERT INTO models (key, info, dim) VALUES (?, ?, ?)",
                (info.key, json.dumps({**info.to_dict(), "files": info.files}), int(info.dims["embed_dim"])),
            )
            return cur.lastrowid

    def models(self) -> list[dict]:
        """Every model with vectors here: id, key, info (dict), dim, and how many files it indexed."""
        rows = self.conn.execute(
            "SELECT m.id, m.key, m.info, m.dim, COUNT(f.id) FROM models m "
            "LEFT JOIN files f ON f.model_id = m.id GROUP BY m.id ORDER BY m.id"
        )
        return [
            {"id": i, "key": k, "info": json.loads(info), "dim": dim, "files": n}
            for i, k, info, dim, n in rows
        ]

    # files and vectors

    def known_files(self, model_id: int) -> dict[str, tuple[int, int, str, int]]:
        """path -> (size, mtime_ns, hash, facts version) of every file `model_id` indexed."""
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(files)")}
        facts = "facts" if "facts" in columns else "0"  # schema 1, read by a dry run as it is
        rows = self.conn.execute(
            f"SELECT path, size, mtime_ns, hash, {facts} FROM files WHERE model_id=?", (model_id,)
        )
        return {p: (s, m, h, v) for p, s, m, h, v in rows}

    def known_hashes(self, model_id: int) -> set[str]:
        return {h for (h,) in self.conn.execute("SELECT hash FROM vectors WHERE model_id=?", (model_id,))}

    def hashes(self, model_id: int) -> dict[int, str]:
        """file id -> content hash, for the files `model_id` indexed."""
        rows = self.conn.execute("SELECT id, hash FROM files WHERE model_id=?", (model_id,))
        return dict(rows.fetchall())

    def put(self, model_id: int, facts: FileFacts, vector: np.ndarray | None = None) -> None:
        """Record a file (replacing its row), with its vector when that is new; inside a transaction."""
        if vector is not None:
            blob = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
            self.conn.execute(
                "INSERT OR REPLACE INTO vectors (model_id, hash, vector) VALUES (?, ?, ?)",
                (model_id, facts.hash, blob),
            )
        self.conn.execute(
            "INSERT OR REPLACE INTO files (path, model_id, size, mtime_ns, hash, width, height, taken, "
            "indexed_at, lat, lon, camera, facts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                facts.path,
                model_id,
                facts.size,
                facts.mtime_ns,
                facts.hash,
                facts.width,
                facts.height,
                facts.taken,
                time.time(),
                facts.lat,
                facts.lon,
                facts.camera,
                FACTS_VERSION,
            ),
        )
        self.conn.execute("DELETE FROM failures WHERE path=?", (facts.path,))

    def refresh(self, model_id: int, facts: FileFacts) -> None:
        """Replace an unchanged file's header facts (its hash and vector stay); inside a transaction."""
        self.conn.execute(
            "UPDATE files SET width=?, height=?, taken=?, lat=?, lon=?, camera=?, facts=? "
            "WHERE model_id=? AND path=?",
            (
                facts.width,
                facts.height,
                facts.taken,
                facts.lat,
                facts.lon,
                facts.camera,
                FACTS_VERSION,
                model_id,
                facts.path,
            ),
        )

    def fail(self, path: str, reason: str, size: int | None = None, mtime_ns: int | None = None) -> None:
        """Record why a file could not be indexed; inside a transaction."""
        self.conn.execute(
            "INSERT OR REPLACE INTO failures (path, size, mtime_ns, reason, at) VALUES (?, ?, ?, ?, ?)",
            (path, size, mtime_ns, reason, time.time()),
        )

    def failures(self) -> list[tuple[str, str]]:
        return list(self.conn.execute("SELECT path, reason FROM failures ORDER BY path"))

    def remove(self, model_id: int, paths: list[str]) -> None:
        """Forget files that are gone (and their failures)."""
        with self.transaction():
            self.conn.executemany(
                "DELETE FROM files WHERE model_id=? AND path=?", [(model_id, p) for p in paths]
            )
            self.conn.executemany("DELETE FROM failures WHERE path=?", [(p,) for p in paths])

    def prune(self, model_id: int) -> None:
        """Drop the vectors no file of the model uses any more (edited or deleted photos)."""
        with self.transaction():
            self.conn.execute(
                "DELETE FROM vectors WHERE model_id=? "
                "AND hash NOT IN (SELECT hash FROM files WHERE model_id=?)",
                (model_id, model_id),
            )

    def vectors(self, model_id: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(file ids, paths, (n, D) float32 vectors) of every file `model_id` indexed, in id order."""
        return self.search_rows(model_id)[:3]

    def search_rows(self, model_id: int) -> tuple[np.ndarray, list[str], np.ndarray, dict]:
        """`vectors` and, in the same order and from the same snapshot, the facts filters use: a dict of
        taken (list of ISO strings or None), lat, lon (float64 arrays, NaN where unknown), camera (list)."""
        rows = self.conn.execute(
            "SELECT f.id, f.path, v.vector, f.taken, f.lat, f.lon, f.camera FROM files f JOIN vectors v "
            "ON v.model_id = f.model_id AND v.hash = f.hash WHERE f.model_id=? ORDER BY f.id",
            (model_id,),
        ).fetchall()
        dim = self.conn.execute("SELECT dim FROM models WHERE id=?", (model_id,)).fetchone()[0]
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        matrix = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        facts = {
            "taken": [r[3] for r in rows],
            "lat": np.array([np.nan if r[4] is None else r[4] for r in rows], dtype=np.float64),
            "lon": np.array([np.nan if r[5] is None else r[5] for r in rows], dtype=np.float64),
            "camera": [r[6] for r in rows],
        }
        return ids, [r[1] for r in rows], matrix, facts

    def export_npz(self, model_id: int, output: str | Path) -> int:
        """Write `model_id`'s vectors, paths and ids to .npz (whole or not at all); returns the count."""
        from aim_mlx.files import atomic_file

        ids, paths, matrix = self.vectors(model_id)
        key, info = self.conn.execute("SELECT key, info FROM models WHERE id=?", (model_id,)).fetchone()
        with atomic_file(output) as tmp:
            np.savez(
                tmp,
                embeddings=matrix,
                paths=np.array(paths, dtype=str),
                ids=ids,
                model=np.array(json.loads(info)["source"]),
                model_key=np.array(key),
            )
        return len(ids)

    def file(self, file_id: int) -> dict | None:
        """One indexed file's row as a dict, or None."""
        cur = self.conn.execute("SELECT * FROM files WHERE id=?", (file_id,))
        row = cur.fetchone()
        return None if row is None else dict(zip([c[0] for c in cur.description], row, strict=True))

    def check(self) -> str:
        """SQLite's integrity check: 'ok', or what is wrong."""
        return "; ".join(r[0] for r in self.conn.execute("PRAGMA integrity_check"))


def _run(conn: sqlite3.Connection, script: str) -> None:
    """Each statement of `script` in the open transaction (executescript would commit it first)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


class _Transaction:
    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn, self.path = conn, path

    def __enter__(self):
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise _database_error(self.path, exc) from None
        return self.conn

    def __exit__(self, kind, exc, tb):
        if kind is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
        return False


def _newer(path: Path, version: int) -> LibraryError:
    return LibraryError(
        f"{path} was written by a newer aim-mlx (schema {version}, this one reads up to {SCHEMA_VERSION}); "
        "upgrade aim-mlx"
    )


def _database_error(path: Path, exc: sqlite3.DatabaseError) -> LibraryError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return LibraryError(f"{path} is locked by another aim-mlx process; wait for it to finish")
    if "not a database" in text or "malformed" in text:
        return LibraryError(f"{path} is not a readable library database ({text}); move it aside and re-index")
    return LibraryError(f"{path}: {text}")
