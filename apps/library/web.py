"""The library's web app (`aim-mlx serve`): one page and the JSON API it uses, on Starlette.

- `GET /api/search?q=TEXT&k=K`, `POST /api/search/image?q=TEXT` (the image file's bytes as the body),
  `GET /api/similar/{id}?q=TEXT`, `GET /api/duplicates?threshold=COS`, `GET /api/photo/{id}`,
  `GET /api/status`. The searches take the CLI's filters as parameters (after, before, in (repeatable),
  camera, near, within, min_score) and TEXT in search.parse_text's syntax (`a dog -people +2:id:12`);
  image files are never named in a request, only uploaded;
- `GET /thumb/{id}`: a JPEG thumbnail, made once and kept in aim-mlx's cache folder under the photo's content
  hash and the thumbnail size; `GET /photo/{id}`: the photo itself (as JPEG when browsers cannot show its
  format, e.g. HEIC).

Threads: one worker, the library thread, owns the read-only database connection, the model and the vectors,
so neither SQLite nor MLX is shared between threads; handlers await it. The model is loaded once, at start;
the vectors are loaded then and again when an index run has committed since (SQLite's `data_version`), so a
search during `aim-mlx index` answers from what is committed. Thumbnails (and photos in formats browsers
cannot show) are decoded on Starlette's thread pool.

What is served: files only by their id in the index, never by a path from the request, and only while the
file on disk is the one indexed (same size and mtime); uploads up to MAX_UPLOAD bytes, decoded by
inputs.images.load_image (Pillow's decompression-bomb limit). The page loads nothing from elsewhere, and its
Content-Security-Policy forbids it; requests naming another host are refused (DNS rebinding).
"""

import asyncio
import mimetypes
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from io import BytesIO
from pathlib import Path

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from aim_mlx.errors import AimMlxError, ImageError
from aim_mlx.files import atomic_file, cache_dir
from aim_mlx.inputs.images import load_image

from .db import Library
from .duplicates import DEFAULT_THRESHOLD, groups
from .search import (
    FilterError,
    Filters,
    Term,
    Vectors,
    choose_model,
    load_model,
    parse_text,
    query_vector,
)

STATIC = Path(__file__).with_name("static")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")  # Host header names (Starlette keeps [ ] or not)
MAX_UPLOAD = 20 * 1024 * 1024  # bytes; a phone's photo is 2-12 MB
MAX_K = 200
THUMB_SIZE = 384  # px, the longer side: sharp in a grid cell on a 2x screen
WEB_FORMATS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".avif", ".bmp"}  # served as they are
PARAMS = {"folders": "in"}  # Filters' fields named otherwise in a request
HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob:; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class Service:
    """The library as the server sees it. Every method runs on the library thread."""

    def __init__(self, db: str | Path, model: str | None = None):
        self.library = Library.reader(db)
        self.entry = choose_model(self.library, model)
        self.model, self.processor = load_model(self.entry)
        self.version = None
        self.vectors = self.current()

    def current(self) -> Vectors:
        """The vectors, loaded again if another connection (an index run) committed since the last look."""
        version = self.library.conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self.version:
            self.vectors = Vectors.load(self.library, self.entry["id"])
            self.groups = {}  # threshold -> duplicate groups of these vectors
            self.version = version
        return self.vectors

    def status(self) -> dict:
        return {
            "photos": len(self.current()),
            "model": self.entry["info"]["source"],
            "text": self.model.info.text,
        }

    def search(self, terms: list[Term], k: int, filters: Filters | None = None) -> list[dict]:
        """The best k of the photos `filters` pass for a query of `terms` (see search.query_vector); photos
        given as + id:N terms are left out."""
        vectors = self.current()
        for term in terms:
            if term.kind == "photo" and term.value not in vectors.row:
                raise HTTPException(404, f"no indexed photo has id {term.value}")
        vector = query_vector(terms, vectors, self.model, self.processor)
        exclude = [t.value for t in terms if t.kind == "photo" and t.weight > 0]
        return self.hits(vectors.top_k(vector, k, exclude, filters))

    def by_text(self, text: str, k: int, filters: Filters | None = None) -> list[dict]:
        return self.search(parse_text(text), k, filters)  # a vision-only model: one line naming LiT

    def by_image(self, path: Path, k: int, filters: Filters | None = None, text: str = "") -> list[dict]:
        return self.search([Term("image", str(path)), *parse_text(text)], k, filters)

    def similar(self, file_id: int, k: int, filters: Filters | None = None, text: str = "") -> list[dict]:
        return self.search([Term("photo", file_id), *parse_text(text)], k, filters)

    def duplicates(self, threshold: float) -> list[dict]:
        """Duplicate groups, computed once per threshold until the library changes (they cost O(n^2))."""
        self.current()
        if threshold not in self.groups:
            self.groups[threshold] = groups(self.library, self.entry["id"], threshold)
        return self.groups[threshold]

    def photo(self, file_id: int) -> dict:
        """The file's row, if this model indexed it."""
        row = self.library.file(file_id) if 0 < file_id < 2**63 else None
        if row is None or row["model_id"] != self.entry["id"]:
            raise HTTPException(404, f"no indexed photo has id {file_id}")
        return row

    @staticmethod
    def hits(hits) -> list[dict]:
        return [{**hit.to_dict(), "name": Path(hit.path).name} for hit in hits]


def on_disk(row: dict) -> os.stat_result:
    """The indexed file's stat, if it is still the file that was indexed; 410 otherwise."""
    try:
        stat = os.stat(row["path"])
    except OSError:
        raise HTTPException(410, f"photo {row['id']} is no longer on disk; run `aim-mlx index`") from None
    if (stat.st_size, stat.st_mtime_ns) != (row["size"], row["mtime_ns"]):
        raise HTTPException(
            410, f"photo {row['id']} changed on disk since it was indexed; run `aim-mlx index`"
        )
    return stat


def thumbnail(row: dict) -> Path:
    """The cached thumbnail of `row`'s photo, made now if not there yet (written whole or not at all)."""
    cached = cache_dir("thumbnails", f"{row['hash']}-{THUMB_SIZE}.jpg")
    if not cached.exists():
        image = load_image(row["path"])
        image.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
        with atomic_file(cached) as out:
            image.save(out, "JPEG", quality=85)
    return cached


def as_jpeg(path: str) -> bytes:
    out = BytesIO()
    load_image(path).save(out, "JPEG", quality=90)
    return out.getvalue()


def embed_upload(service: Service, data: bytes, k: int, filters: Filters, text: str) -> list[dict]:
    """Search with uploaded image bytes (and `text`'s terms): written to a private temporary file so that
    load_image's checks (and its messages, with "the upload" for the file's name) apply to it as to any
    file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "upload")
        path.write_bytes(data)
        try:
            return service.by_image(path, k, filters, text)
        except ImageError as exc:
            raise HTTPException(400, str(exc).replace(str(path), "the upload")) from None


def create_app(db: str | Path, model: str | None = None, hosts=LOOPBACK) -> Starlette:
    """The app over the library at `db`, searching with `model` (see choose_model); `hosts`: the names
    requests may address it by ("*" for any). Loads the model and vectors before it returns."""
    worker = ThreadPoolExecutor(1, thread_name_prefix="library")
    try:
        service = worker.submit(Service, db, model).result()
    except BaseException:
        worker.shutdown()
        raise

    async def run(function, *args):
        """`function(*args)` on the library thread."""
        return await asyncio.wrap_future(worker.submit(function, *args))

    async def status(request: Request):
        return JSONResponse(await run(service.status))

    async def search(request: Request):
        text = request.query_params.get("q", "").strip()
        if not text:
            raise HTTPException(400, "no query; pass ?q=TEXT")
        k, chosen = top(request), filters(request)
        return JSONResponse({"results": await run(service.by_text, text, k, chosen)})

    async def search_image(request: Request):
        k, chosen, text = top(request), filters(request), request.query_params.get("q", "")
        data = await upload(request)
        return JSONResponse({"results": await run(embed_upload, service, data, k, chosen, text)})

    async def similar(request: Request):
        k, chosen, text = top(request), filters(request), request.query_params.get("q", "")
        found = await run(service.similar, request.path_params["id"], k, chosen, text)
        return JSONResponse({"results": found})

    async def duplicates(request: Request):
        threshold = number(request, "threshold", DEFAULT_THRESHOLD, -1.0, 1.0)
        return JSONResponse({"groups": await run(service.duplicates, threshold)})

    async def photo_info(request: Request):
        row = await run(service.photo, request.path_params["id"])
        keys = ("id", "path", "size", "width", "height", "taken", "lat", "lon", "camera", "indexed_at")
        return JSONResponse({**{key: row[key] for key in keys}, "name": Path(row["path"]).name})

    async def thumb(request: Request):
        row = await run(service.photo, request.path_params["id"])
        on_disk(row)
        return FileResponse(await run_in_threadpool(thumbnail, row), media_type="image/jpeg")

    async def photo(request: Request):
        row = await run(service.photo, request.path_params["id"])
        stat = on_disk(row)
        if Path(row["path"]).suffix.lower() in WEB_FORMATS:
            kind = mimetypes.guess_type(row["path"])[0] or "application/octet-stream"
            return FileResponse(row["path"], stat_result=stat, media_type=kind)
        return Response(await run_in_threadpool(as_jpeg, row["path"]), media_type="image/jpeg")

    async def page(request: Request):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def error(request: Request, exc: Exception):
        code = exc.status_code if isinstance(exc, HTTPException) else 400
        if isinstance(exc, FilterError):
            message = f"{PARAMS.get(exc.name, exc.name)}: {exc.reason}"
        else:
            message = exc.detail if isinstance(exc, HTTPException) else " ".join(str(exc).split())
        return JSONResponse({"error": message}, status_code=code)

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    routes = [
        Route("/", page),
        Route("/api/status", status),
        Route("/api/search", search),
        Route("/api/search/image", search_image, methods=["POST"]),
        Route("/api/similar/{id:int}", similar),
        Route("/api/duplicates", duplicates),
        Route("/api/photo/{id:int}", photo_info),
        Route("/thumb/{id:int}", thumb),
        Route("/photo/{id:int}", photo),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(TrustedHostMiddleware, allowed_hosts=list(hosts)),
            Middleware(SecurityHeaders),
        ],
        exception_handlers={HTTPException: error, AimMlxError: error},
        lifespan=lifespan,
    )
    app.state.service = service
    return app


def filters(request: Request) -> Filters:
    """The search filters a request's parameters ask for (see Filters.parse)."""
    params = request.query_params
    names = ("after", "before", "camera", "near", "within", "min_score")
    return Filters.parse(folders=params.getlist("in"), **{name: params.get(name) for name in names})


def top(request: Request) -> int:
    return int(number(request, "k", 48, 1, MAX_K, whole=True))


def number(request: Request, name: str, default: float, low: float, high: float, whole: bool = False):
    """A query parameter within [low, high], or 400 saying what it must be."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        kind = "a whole number" if whole else "a number"
        raise HTTPException(400, f"{name} must be {kind} from {low:g} to {high:g}, not {raw!r}")
    return value


async def upload(request: Request) -> bytes:
    """The request body, refused with 413 once it passes MAX_UPLOAD (before reading it when it says so)."""
    too_large = HTTPException(413, f"the upload is over {MAX_UPLOAD // 2**20} MB; send a smaller image")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_UPLOAD:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_UPLOAD:
            raise too_large
    if not body:
        raise HTTPException(400, "no image in the request; send the image file's bytes as the body")
    return bytes(body)


class SecurityHeaders:
    """Adds HEADERS to every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)
