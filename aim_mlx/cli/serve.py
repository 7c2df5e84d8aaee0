"""`aim-mlx serve`: the embeddings API (aim_mlx.apps.service) and the photo library's page on uvicorn."""

import socket
import threading
import time
from typing import Annotated

import typer

from ..errors import ConfigError
from .common import Db, library_path, plural, say, spinner, warn

EXAMPLES = [
    "aim-mlx serve",
    'aim-mlx serve --model apple/aimv2-large-patch14-224-lit --api-key "$KEY"',
    "aim-mlx serve --open --port 8080",
    "aim-mlx serve --db ~/photos.sqlite --host 0.0.0.0",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def serve(
    db: Db = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            metavar="MODEL",
            show_default=False,
            help="A model the API serves (hub id or folder); repeat it for several. Default: the "
            "library's model, else apple/aimv2-large-patch14-224-lit. The photo page searches with the "
            "first one that indexed the library.",
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            metavar="HOST",
            help="The address to listen on. Any other than 127.0.0.1 lets whoever can reach this "
            "machine use the API and see your photos.",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, metavar="PORT", help="The port to listen on; 0 picks a free one.")
    ] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="AIM_MLX_API_KEY",
            show_default=False,
            show_envvar=True,
            metavar="KEY",
            help="Require Authorization: Bearer KEY on /v1 requests.",
        ),
    ] = None,
    lazy: Annotated[bool, typer.Option("--lazy", help="Load each model on its first request.")] = False,
    batch_size: Annotated[
        int, typer.Option(min=1, metavar="N", help="Inputs per forward pass, from all requests together.")
    ] = 8,
    batch_wait_ms: Annotated[
        float, typer.Option(min=0, metavar="MS", help="How long a batch waits to fill before it runs.")
    ] = 5.0,
    max_batch_items: Annotated[
        int, typer.Option(min=1, metavar="N", help="Inputs one request may send.")
    ] = 256,
    queue_size: Annotated[
        int, typer.Option(min=1, metavar="N", help="Inputs in progress per model; beyond them, 429.")
    ] = 512,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            metavar="ORIGIN", help="Let web pages from ORIGIN call the API (repeatable). Default: none."
        ),
    ] = None,
    open: Annotated[bool, typer.Option("--open", help="Open the page in the default browser.")] = False,
):
    """Serve an OpenAI-style embeddings API and the photo page.

    POST /v1/embeddings takes texts and images (data URIs or base64; URLs are never fetched) in OpenAI's
    request shape; GET /v1/models lists the models; GET /health. Concurrent requests share batches.

    The page (when a library exists, or --db names one) searches as you type, by an image you drop or
    pick, and by photo ("more like this"), and lists duplicates. It and its JSON API (/api/search?q=TEXT,
    /api/search/image, /api/similar/ID, /api/duplicates) serve only photos in the library, by their id, and
    only while each file is the one indexed. A search while `aim-mlx index` runs answers from what that
    run has committed. Ctrl-C stops the server.
    """
    from ..extras import require

    require("starlette")  # before the apps import it: one line naming the extra
    uvicorn = require("uvicorn")
    from aim_mlx.apps.service.server import build

    listener = listen(host, port)
    local = host in LOOPBACK
    if not local:
        warn(
            f"listening on {host}: anyone who can reach this machine on port {port} can see your photos "
            + ("and use the API with its key" if api_key else "and use the API (set --api-key)")
        )
    try:
        with spinner("loading the library and the models"):
            served = build(
                library_path(db),
                db is not None,
                model,
                lazy=lazy,
                batch_size=batch_size,
                batch_wait=batch_wait_ms / 1000,
                max_items=max_batch_items,
                queue=queue_size,
                api_key=api_key,
                cors_origins=cors_origin or (),
                local=local,
            )
    except BaseException:
        listener.close()
        raise
    name = f"[{host}]" if ":" in host else host
    url = f"http://{name}:{listener.getsockname()[1]}/"
    models = ", ".join(served.models) + (" (loaded on first use)" if served.lazy else "")
    if served.photos is None:
        say(f"serving the embeddings API at {url}v1 for {models} (Ctrl-C to stop)")
        say(f"the page at {url} says how to index your photos into {library_path(db)}")
    else:
        say(f"serving {plural(served.photos, 'photo')} at {url} (Ctrl-C to stop)")
        say(f"the embeddings API is at {url}v1 for {models}")
    server = uvicorn.Server(
        uvicorn.Config(served.app, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
    )
    if open:
        threading.Thread(target=_open_when_started, args=(server, url), daemon=True).start()
    server.run(sockets=[listener])


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port before anything is loaded, so that a port in use is one line at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)  # connections wait in the backlog until uvicorn accepts them
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host} port {port}: {exc.strerror or exc}; try another --port"
        ) from None
    return listener


def _open_when_started(server, url: str) -> None:
    import webbrowser

    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        webbrowser.open(url)
