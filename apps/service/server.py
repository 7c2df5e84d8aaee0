"""What `aim-mlx serve` runs: the embeddings API always, and the photo library's page when there is a library
(or `--db` names one); without one, a page that says how to make one."""

from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from aim_mlx.checkpoints.variants import DEFAULT_TEXT_MODEL
from aim_mlx.errors import ConfigError

from .app import LOOPBACK, MAX_ITEMS, create_app
from .models import Models

QUEUE = 512  # inputs in the server at once, per model: beyond them, 429
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>aim-mlx</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; line-height: 1.5">
<h1>aim-mlx</h1>
<p>The embeddings API answers at <code>/v1</code>: <code>POST /v1/embeddings</code> (texts and images, in
OpenAI's shape) and <code>GET /v1/models</code>.</p>
<p>To search your photos on this page, index a folder of them, then start the server again:</p>
<pre>aim-mlx index ~/Pictures
aim-mlx serve</pre>
</body></html>
"""
HEADERS = {
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
}


@dataclass
class Served:
    app: object
    models: list[str]  # the API's model ids
    photos: int | None  # the library's photos; None without a library
    lazy: bool  # whether the models load on first use


def build(
    db: Path,
    explicit_db: bool,
    models: list[str] | None = None,
    lazy: bool = False,
    batch_size: int = 8,
    batch_wait: float = 0.005,
    max_items: int = MAX_ITEMS,
    queue: int = QUEUE,
    api_key: str | None = None,
    cors_origins=(),
    local: bool = True,
    load=None,
) -> Served:
    """The app for `aim-mlx serve`, its models loaded (unless lazy). The library at `db` is served when it
    holds photos, or when the user named it (`explicit_db`: then one that cannot be served is an error).
    Without --model the API serves the library's model (loaded on first use: the page loads its own), or
    the LiT checkpoint without a library. `local`: whether the server listens on a loopback address only
    (else requests may name any host)."""
    if batch_size < 1 or max_items < 1 or batch_wait < 0:
        raise ConfigError("--batch-size and --max-batch-items must be at least 1, --batch-wait-ms at least 0")
    if queue < max_items:
        raise ConfigError(f"--queue-size ({queue}) must be at least --max-batch-items ({max_items})")
    hosts = LOOPBACK if local else ["*"]
    fallback, photos, library_model = None, None, None
    if explicit_db or has_photos(db):
        from aim_mlx.apps.library.web import create_app as library_app

        fallback = library_app(db, choose(db, models or []), hosts=hosts)
        photos = fallback.state.service.vectors.files()  # no query: the library thread owns the database
        library_model = fallback.state.service.entry["info"]["source"]
    else:
        fallback = Starlette(routes=[Route("/", index_page)])
    if not models:
        lazy = lazy or library_model is not None
        models = [library_model or DEFAULT_TEXT_MODEL]
    held = Models(models, load, batch_size, batch_wait, queue, lazy)
    app = create_app(held, api_key, cors_origins, hosts, max_items, fallback=fallback)
    return Served(app, [h.id for h in held.held], photos, lazy)


async def index_page(request):
    return HTMLResponse(PAGE, headers=HEADERS)


def has_photos(db: Path) -> bool:
    """Whether the library at `db` exists and has indexed a photo."""
    from aim_mlx.apps.library.db import Library

    if not db.is_file():
        return False
    with Library.reader(db) as library:
        return any(m["files"] for m in library.models())


def choose(db: Path, models: list[str]) -> str | None:
    """The first --model that indexed the library, else None (the library's own choice)."""
    from aim_mlx.apps.library.db import Library
    from aim_mlx.apps.library.search import choose_model

    with Library.reader(db) as library:
        for model in models:
            try:
                choose_model(library, model)
                return model
            except ConfigError:
                continue
    return None
