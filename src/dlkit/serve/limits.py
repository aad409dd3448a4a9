"""What the server accepts, each limit in one place with its number and its reason, and the checks
that enforce them: the API key, the body size while it streams, the image formats, the text length.

Every refusal is a `ClientError` carrying its HTTP status and one line; the app turns it into
`{"error": line}`. dlkit's own InputError maps to 400, or 413 when it refuses an image's size.
"""
from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from dlkit.data.inputs import MAX_PIXELS
from dlkit.errors import InputError

HOST = "127.0.0.1"  # loopback unless the user asks for more (--host 0.0.0.0)
# Whole request body, counted while it streams: a 12-megapixel phone JPEG is 3-8 MB, and base64 in JSON
# adds a third; 16 MiB holds that with room, and bounds what a hostile client makes us buffer.
BODY_LIMIT = 16 * 1024 * 1024
# Inputs (files or JSON items) in one request: a page of uploads; more is a batch job for `dlkit predict`.
MAX_INPUTS = 64
# Table rows in one request (a CSV upload or JSON rows): 1,024 rows of 30 features is 120 KB of floats.
MAX_ROWS = 1024
# Multipart form fields that are not files: the API reads none, so a few stray ones are tolerated.
MAX_FIELDS = 16
# Characters in one text: IMDb's longest review has 13,704; tokenizers keep max_len tokens anyway.
MAX_TEXT_CHARS = 100_000
# Requests waiting for one model's worker: 8 full batches of 32; past it the client should back off.
QUEUE_LIMIT = 256
RETRY_AFTER_S = 1  # what a 503 (queue full, still loading) tells the client to wait
# A request that waited longer than this (queue + model) answers 504 and its work is dropped.
TIMEOUT_S = 10.0

# the first bytes of every format dlkit's image reader takes (PIL: PNG, JPEG, GIF, BMP, TIFF, WebP; .npy)
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF87a", ".gif"), (b"GIF89a", ".gif"),
    (b"BM", ".bmp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"), (b"\x93NUMPY", ".npy"),
)
IMAGE_FORMATS = "PNG, JPEG, GIF, BMP, TIFF, WebP or a .npy array"


class ClientError(Exception):
    """A request the server refuses: its HTTP status and one line saying what to send instead."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def input_status(exc: InputError) -> int:
    """dlkit's InputError as an HTTP status: 413 when it refuses an image's size, else 400."""
    return 413 if f"{MAX_PIXELS // 1_000_000} megapixels" in str(exc) else 400


def image_suffix(data: bytes, label: str) -> str:
    """The file suffix of an upload in a format dlkit reads, from its first bytes; 400 when empty, 415
    when it is anything else (whatever its name says)."""
    if not data:
        raise ClientError(400, f"{label}: empty file; expected an image ({IMAGE_FORMATS})")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    raise ClientError(415, f"{label}: not an image format dlkit reads; expected {IMAGE_FORMATS}")


def check_text(text: str, label: str) -> str:
    """A text within MAX_TEXT_CHARS (413 otherwise)."""
    if len(text) > MAX_TEXT_CHARS:
        raise ClientError(413, f"{label}: {len(text):,} characters is more than the {MAX_TEXT_CHARS:,} "
                               "a text may hold; send a shorter text")
    return text


def check_count(n: int, limit: int, what: str) -> None:
    """At most `limit` inputs or rows in one request (413 otherwise)."""
    if n > limit:
        raise ClientError(413, f"{n:,} {what} in one request; send at most {limit:,} per request")


def check_api_key(headers: dict[str, str], key: str | None) -> None:
    """With a key set, the request must carry it (`Authorization: Bearer KEY` or `X-API-Key: KEY`);
    compared in constant time. 401 otherwise."""
    if key is None:
        return
    given = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if given is None:
        raise ClientError(401, "this server needs an API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                          {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key.encode("utf-8")):
        raise ClientError(401, "wrong API key", {"WWW-Authenticate": "Bearer"})


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _TooLarge(Exception):
    """Raised inside `receive` once the body passes the limit; the middleware answers 413."""


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes answers 413 without being read further, told by its
    Content-Length before reading or by counting the bytes as they arrive (chunked uploads)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: int = BODY_LIMIT) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:  # h11 refuses bad ones
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if started:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"error": f"request body is larger than {self.limit:,} bytes; send less at once"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body.encode()})
