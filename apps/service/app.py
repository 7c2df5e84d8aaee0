"""The embeddings API on Starlette, in OpenAI's shapes: `POST /v1/embeddings`, `GET /v1/models`,
`GET /v1/models/{id}` and `GET /health`; `POST /v1/classify` scores images against labels as
`aim-mlx classify` does; anything else is passed to `fallback` (the photo page, or a page
that says how to make a library).

Every error is {"error": {"message", "type", "param", "code"}} with a 4xx status for a bad request; nothing a
client sends stops the server. With an API key, /v1 answers only `Authorization: Bearer KEY` (compared in
constant time). CORS is off unless origins are named.
"""

import asyncio
import base64
import hmac
import time
from contextlib import AsyncExitStack, asynccontextmanager

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from aim_mlx.tasks.zeroshot import predict, top_k_softmax

from .batcher import Full
from .models import Held, Models
from .parse import ApiError, EmbeddingsRequest, parse, parse_classify

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
MAX_BODY = 64 * 2**20  # bytes: 256 photos of a few hundred KB each, in base64
MAX_BODIES = 4 * MAX_BODY  # bytes of request bodies held at once, all clients together: beyond it, 429
MAX_ITEMS = 256  # inputs per request (--max-batch-items)
RETRY_AFTER = 1  # seconds, when the queue is full


def create_app(
    models: Models,
    api_key: str | None = None,
    cors_origins=(),
    hosts=LOOPBACK,
    max_items: int = MAX_ITEMS,
    max_body: int = MAX_BODY,
    fallback=None,
    max_bodies: int = MAX_BODIES,
) -> Starlette:
    """The server's app over `models` (loaded or lazy); `hosts`: the Host names requests may use ("*": any);
    `fallback`: an ASGI app for every path outside /v1 and /health (its lifespan runs with this one's)."""
    created = int(time.time())
    bodies = Bodies(max_body, max_bodies)

    async def embeddings(request: Request):
        async with bodies.read(request) as body:
            return await embeddings_of(request, body)

    async def embeddings_of(request: Request, body: bytes):
        wanted = parse(body, max_items)
        held = models.find(wanted.model)
        await held.ready()
        held.check_dimensions(wanted.dimensions)
        answer = await admitted(request, models, held, wanted)
        if answer is None:  # the client went away; its queued work was dropped
            return Response(status_code=499)
        rows, tokens = answer
        data = [
            {"object": "embedding", "index": i, "embedding": encode(row, wanted.encoding_format)}
            for i, row in enumerate(rows)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": held.id, "usage": usage})

    async def classify(request: Request):
        async with bodies.read(request) as body:
            return await classify_of(request, body)

    async def classify_of(request: Request, body: bytes):
        wanted = parse_classify(body, max_items)
        held = models.find(wanted.model)
        await held.ready()
        images = EmbeddingsRequest(held.id, wanted.items)
        if wanted.labels is None:  # the classes of the model's trained head
            labels = held.head_labels()
            answer = await admitted(request, models, held, images, kind="head")
            if answer is None:
                return Response(status_code=499)
            predictions = top_k_softmax(np.stack(answer[0]), labels, wanted.top_k)
        else:
            labels, templates = held.zero_shot_set(wanted.labels, wanted.templates)
            loop = asyncio.get_running_loop()
            classifier, scale = await loop.run_in_executor(
                models.executor, held.classifier, labels, templates
            )
            answer = await admitted(request, models, held, images)
            if answer is None:
                return Response(status_code=499)
            predictions = predict(np.stack(answer[0]), classifier, labels, scale, wanted.top_k)
        data = [
            {"object": "classification", "index": i, "top": prediction.to_list()}
            for i, prediction in enumerate(predictions)
        ]
        return JSONResponse({"object": "list", "data": data, "model": held.id})

    def card(held: Held) -> dict:
        owner = "local" if held.folder else held.id.split("/")[0]
        extra = {"short_name": held.short, "loaded": held.model is not None}
        return {"id": held.id, "object": "model", "created": created, "owned_by": owner, **extra}

    async def list_models(request: Request):
        return JSONResponse({"object": "list", "data": [card(held) for held in models.held]})

    async def one_model(request: Request):
        return JSONResponse(card(models.find(request.path_params["id"])))

    async def health(request: Request):
        held = [state(held) for held in models.held]
        return JSONResponse({"status": "ok", "models": held, "body_bytes_held": bodies.held})

    middleware = []
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["authorization", "content-type"],
            )
        )
    if api_key:
        middleware.append(Middleware(ApiKey, key=api_key))
    api = Starlette(
        routes=[
            Route("/embeddings", embeddings, methods=["POST"]),
            Route("/classify", classify, methods=["POST"]),
            Route("/models", list_models),
            Route("/models/{id:path}", one_model),
        ],
        middleware=middleware,
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
    )

    @asynccontextmanager
    async def lifespan(app):
        async with AsyncExitStack() as stack:
            router = getattr(fallback, "router", None)
            if router is not None:
                await stack.enter_async_context(router.lifespan_context(fallback))
            try:
                yield
            finally:
                models.close()

    routes = [Route("/health", health), Mount("/v1", app=api)]
    if fallback is not None:
        routes.append(Mount("/", app=fallback))
    return Starlette(
        routes=routes,
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))],
        lifespan=lifespan,
    )


async def admitted(request: Request, models: Models, held: Held, wanted: EmbeddingsRequest, kind=None):
    """`embed` within room reserved for the request's inputs (429 without it); None if the client left.
    `kind` "head": images give their head's logits, not embeddings."""
    count = len(wanted.items)
    held.check_texts(wanted.items)
    admit(held, count)
    try:
        return await unless_gone(request, embed(models, held, wanted, kind))
    finally:
        held.batcher.release(count)


async def embed(
    models: Models, held: Held, wanted: EmbeddingsRequest, kind=None
) -> tuple[list[np.ndarray], int]:
    """Each item decoded on the decoding pool, then batched: its rows in input order, and the token count.
    On the first bad item the others are cancelled and its error is raised."""
    loop = asyncio.get_running_loop()
    put = 0

    async def one(index, item):
        nonlocal put
        data, tokens = await loop.run_in_executor(models.decoders, held.prepare, item, index, wanted.truncate)
        future = held.batcher.put(kind or item.kind, data)
        put += 1
        return await future, tokens

    tasks = [asyncio.ensure_future(one(i, item)) for i, item in enumerate(wanted.items)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        if failed:
            raise failed[0].exception()
        results = [t.result() for t in tasks]
    finally:
        for task in tasks:
            task.cancel()  # none of them puts an item after this
        held.batcher.lost(len(tasks) - put)
    return [row for row, _ in results], sum(tokens for _, tokens in results)


async def unless_gone(request: Request, work):
    """`work`'s result, or None (and `work` cancelled) if the client disconnects first."""
    work = asyncio.ensure_future(work)

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        return work.result() if work.done() else None
    finally:
        watch.cancel()
        work.cancel()


def admit(held: Held, count: int) -> None:
    """Room for `count` inputs in `held`'s batcher, or 429 with Retry-After."""
    try:
        held.batcher.admit(count)
    except Full:
        raise busy(f"the server is busy ({held.batcher.admitted} inputs in progress for {held.id})") from None


def busy(why: str) -> ApiError:
    """A 429 that says why and when to retry."""
    error = ApiError(429, f"{why}; retry in {RETRY_AFTER} s", code="rate_limit_exceeded", kind="requests")
    error.headers["retry-after"] = str(RETRY_AFTER)
    return error


def encode(row: np.ndarray, encoding_format: str):
    if encoding_format == "base64":  # what the openai SDK asks for by default: little-endian float32
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return row.tolist()


def state(held: Held) -> dict:
    batcher = held.batcher
    return {
        "id": held.id,
        "loaded": held.model is not None,
        "in_progress": batcher.admitted,
        "decoding": batcher.coming,
        "queued": len(batcher.queue),
        "batches": batcher.batches,
        "embedded": batcher.items,
    }


class Bodies:
    """Request bodies held in memory, bounded twice: one over `limit` bytes is a 413, and room is reserved
    for each (its Content-Length, or as it arrives) within `total` bytes for all clients together, so
    memory does not grow with the number of clients; without room, a 429 with Retry-After before reading.
    The room is freed when the request's answer is ready."""

    def __init__(self, limit: int, total: int):
        self.limit, self.total, self.held = limit, total, 0

    @asynccontextmanager
    async def read(self, request: Request):
        taken = 0

        def take(size: int):
            nonlocal taken
            if size > self.limit:
                raise ApiError(
                    413,
                    f"the request body is over {self.limit // 2**20} MB; send fewer or smaller images a "
                    "request",
                    code="request_too_large",
                )
            if self.held + size - taken > self.total:
                raise busy(f"the server holds {self.held // 2**20} MB of request bodies already")
            self.held += size - taken
            taken = size

        try:
            length = request.headers.get("content-length", "")
            take(int(length) if length.isdigit() else 0)
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > taken:
                    take(len(body))
            yield bytes(body)
        finally:
            self.held -= taken


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def api_error(request: Request, exc: ApiError):
    return error_response(exc)


async def http_error(request: Request, exc: HTTPException):
    """Starlette's own 404 and 405, in OpenAI's shape."""
    message = {404: f"no route {request.url.path}; the API is POST /v1/embeddings and GET /v1/models"}
    text = message.get(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    return error_response(ApiError(exc.status_code, text, code=str(exc.status_code)))


async def server_error(request: Request, exc: Exception):
    text = f"the server failed on this request ({type(exc).__name__}: {' '.join(str(exc).split())})"
    return error_response(ApiError(500, text, kind="server_error"))


class ApiKey:
    """401 unless `Authorization: Bearer KEY`; preflight (OPTIONS) requests pass, for CORS."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                error = ApiError(
                    401,
                    "missing or wrong API key; send the header Authorization: Bearer KEY, KEY being the "
                    "server's --api-key (or AIM_MLX_API_KEY)",
                    code="invalid_api_key",
                )
                error.headers["www-authenticate"] = "Bearer"
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
