"""Reading an embeddings request: OpenAI's body, its input items in the shapes clients send, and the one-line
errors (ApiError) that say which input was wrong and what to send instead.

Items: a string, {"text": ...}, {"image": data URI or bare base64} (Jina's shape), {"type": "text", "text":
...} or {"type": "image_url", "image_url": {"url": data URI}} (the chat-content shape). A URL is never
fetched: a local server must not become a proxy into its user's network or disk.
"""

import base64
import binascii
import json
import re
from dataclasses import dataclass

ENCODINGS = ("float", "base64")
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # base64's alphabet has no colon
SHAPES = (
    'a string, {"text": ...}, {"image": "data:image/jpeg;base64,..."} or {"type": "image_url", '
    '"image_url": {"url": "data:image/jpeg;base64,..."}}'
)


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers: dict[str, str] = {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Item:
    kind: str  # "text" or "image"
    value: str | bytes  # the text, or the image file's bytes


@dataclass
class EmbeddingsRequest:
    model: str
    items: list[Item]
    encoding_format: str = "float"
    dimensions: int | None = None
    truncate: bool = True  # a text over the context length is cut (the CLI's rule), or refused when False


def parse(body: bytes, max_items: int) -> EmbeddingsRequest:
    """The request in `body`, or an ApiError (400) naming what is wrong."""
    return fields(load_json(body), max_items)


def load_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ApiError(
            400,
            f"the body is not valid JSON ({exc}); send an object such as "
            '{"model": "...", "input": ["a photo of a cat"]}',
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, 'the body must be a JSON object with "model" and "input"', code="invalid_json")
    return data


def fields(data: dict, max_items: int) -> EmbeddingsRequest:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, '"model" is missing; name one of GET /v1/models', "model", "missing_model")
    encoding = data.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise ApiError(400, f"encoding_format must be float or base64, not {encoding!r}", "encoding_format")
    dimensions = data.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
        raise ApiError(400, f"dimensions must be a positive whole number, not {dimensions!r}", "dimensions")
    truncate = data.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ApiError(400, f"truncate must be true or false, not {truncate!r}", "truncate")
    raw = data.get("input")
    if raw is None:
        raise ApiError(400, '"input" is missing; send a string or a list of inputs', "input")
    raw = [raw] if isinstance(raw, str | dict) else raw
    if not isinstance(raw, list) or not raw:
        what = "an empty list" if isinstance(raw, list) else f"a {type(raw).__name__}"
        raise ApiError(400, f'"input" is {what}; send a string or a non-empty list of inputs', "input")
    if len(raw) > max_items:
        raise ApiError(
            400,
            f'"input" has {len(raw)} items; this server takes at most {max_items} a request '
            "(--max-batch-items): split it into several requests",
            "input",
        )
    items = [item(value, i) for i, value in enumerate(raw)]
    return EmbeddingsRequest(model, items, encoding, dimensions, truncate)


def item(value, index: int) -> Item:
    """One input: a text or an image's bytes."""
    where = f"input[{index}]"
    if isinstance(value, dict):
        if value.get("type") == "text" or set(value) == {"text"}:
            value = value.get("text")
        elif value.get("type") == "image_url":
            url = value.get("image_url")
            url = url.get("url") if isinstance(url, dict) else None
            if not isinstance(url, str):
                raise ApiError(
                    400, f'{where}: image_url needs {{"url": "data:image/...;base64,..."}}', "input"
                )
            return Item("image", image_bytes(url, where))
        elif set(value) == {"image"}:
            if not isinstance(value["image"], str):
                raise ApiError(400, f"{where}: image must be a data URI or base64 string", "input")
            return Item("image", image_bytes(value["image"], where))
        else:
            raise ApiError(400, f"{where} is an object this server does not read; send {SHAPES}", "input")
    if isinstance(value, str):
        if not value.strip():
            raise ApiError(400, f"{where} is an empty text; send the text to embed", "input")
        return Item("text", value)
    if isinstance(value, list) and all(type(v) is int for v in value):
        raise ApiError(
            400, f"{where} is a list of token ids; this server reads texts: send the string", "input"
        )
    raise ApiError(400, f"{where} is a {type(value).__name__}; send {SHAPES}", "input")


def image_bytes(source: str, where: str) -> bytes:
    """A data URI's or a bare base64 string's bytes; any URL is refused, never fetched."""
    if source.startswith("data:"):
        header, comma, payload = source.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(
                400, f"{where}: the data URI is not base64; send data:image/jpeg;base64,...", "input"
            )
    elif SCHEME.match(source):
        scheme = source.split(":", 1)[0]
        raise ApiError(
            400,
            f"{where}: {scheme}: URLs are not fetched (the server reads no network or disk for a request); "
            "send the image itself as a data URI, data:image/jpeg;base64,...",
            "input",
            "url_not_allowed",
        )
    else:
        payload = source
    try:
        data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, f"{where}: the image is not valid base64; send data:image/jpeg;base64,...", "input"
        ) from None
    if not data:
        raise ApiError(400, f"{where}: the image is empty; send the image file's bytes in base64", "input")
    return data


@dataclass
class ClassifyRequest:
    model: str
    items: list[Item]  # images only
    labels: list[str] | None  # None: a head model's own classes
    templates: list[str] | str | None  # prompts with {} for the label, or "imagenet" (CLIP's 80)
    top_k: int = 5


def parse_classify(body: bytes, max_items: int) -> ClassifyRequest:
    """A classification request: `model`, `input` (images, in any item shape), `labels` (zero-shot; left
    out for a model with a trained head), optional `templates` and `top_k`; or an ApiError (400)."""
    data = load_json(body)
    wanted = fields({"model": data.get("model"), "input": data.get("input")}, max_items)
    if texts := [i for i, item in enumerate(wanted.items) if item.kind != "image"]:
        raise ApiError(400, f"input[{texts[0]}] is a text; zero-shot classification takes images", "input")
    labels = data.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise ApiError(400, '"labels" must be a list of strings, e.g. ["cat", "dog"]', "labels")
    templates = data.get("templates")
    if templates not in (None, "imagenet") and (
        not isinstance(templates, list) or not all(isinstance(t, str) for t in templates)
    ):
        raise ApiError(
            400, '"templates" must be a list of prompts with {} for the label, or "imagenet"', "templates"
        )
    top_k = data.get("top_k", 5)
    if type(top_k) is not int or top_k < 1:
        raise ApiError(400, f"top_k must be a positive whole number, not {top_k!r}", "top_k")
    return ClassifyRequest(wanted.model, wanted.items, labels, templates, top_k)
