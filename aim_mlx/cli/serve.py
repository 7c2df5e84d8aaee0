"""`aim-mlx serve`: the photo library's web app (aim_mlx.apps.library.web) on uvicorn."""

import socket
import threading
import time
from typing import Annotated

import typer

from ..errors import ConfigError
from .common import Db, LibraryModel, library_path, plural, say, spinner, warn

EXAMPLES = [
    "aim-mlx serve",
    "aim-mlx serve --open --port 8080",
    "aim-mlx serve --db ~/photos.sqlite --host 0.0.0.0",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def serve(
    db: Db = None,
    model: LibraryModel = None,
    host: Annotated[
        str,
        typer.Option(
            metavar="HOST",
            help="The address to listen on. Any other than 127.0.0.1 lets whoever can reach this "
            "machine see your photos.",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, metavar="PORT", help="The port to listen on; 0 picks a free one.")
    ] = 8000,
    open: Annotated[bool, typer.Option("--open", help="Open the page in the default browser.")] = False,
):
    """Search the photo library in a web browser.

    The page searches as you type, by an image you drop or pick, and by photo ("more like this"), and lists
    duplicates. It and its JSON API (/api/search?q=TEXT, /api/search/image, /api/similar/ID,
    /api/duplicates) serve only photos in the library, by their id, and only while each file is the one
    indexed. A search while `aim-mlx index` runs answers from what that run has committed. Ctrl-C stops the
    server.
    """
    from ..extras import require

    require("starlette")  # before web.py imports it: one line naming the extra
    uvicorn = require("uvicorn")
    from aim_mlx.apps.library.web import create_app

    listener = listen(host, port)
    local = host in LOOPBACK
    if not local:
        warn(f"listening on {host}: anyone who can reach this machine on port {port} can see your photos")
    try:
        with spinner("loading the library and its model"):
            app = create_app(library_path(db), model, **({} if local else {"hosts": ["*"]}))
    except BaseException:
        listener.close()
        raise
    name = f"[{host}]" if ":" in host else host
    url = f"http://{name}:{listener.getsockname()[1]}/"
    photos = plural(len(app.state.service.vectors), "photo")  # no query: the library thread owns the db
    say(f"serving {photos} at {url} (Ctrl-C to stop)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
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
