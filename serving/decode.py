"""Uploaded bytes -> a PIL image, or a ``BadImage`` whose message tells the caller what is wrong.

Decoding itself is ``training.preprocess.decode_image`` (the same code that reads training data,
with its decompression-bomb guard); this module adds the checks that only matter at the edge:
empty or oversized uploads, formats outside the data contract, and any decoder exception, so a
hostile file becomes a 4xx and never kills a worker.

``UploadGuard`` checks the request itself before BentoML parses it: BentoML would also accept a
JSON body naming a server-side *path* (``{"image": "/etc/hosts"}``) or a text field holding a
URL to download, and it answers malformed forms with a 500. The guard lets through only a
multipart form whose ``image`` field is a file, of bounded size.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from training.preprocess import decode_image

__all__ = ["BadImage", "ImageTooLarge", "UploadGuard", "decode_upload", "read_upload"]

FIELD = "image"
HOW = "send the file as the multipart form field 'image' (curl -F image=@cell.png)"


class BadImage(ValueError):
    """The upload is not an acceptable image; ``status`` is the HTTP status to answer with."""

    status = 400


class ImageTooLarge(BadImage):
    status = 413


def read_upload(path: str | Path | None, max_bytes: int) -> bytes:
    """Read an uploaded file, refusing it by size before reading it into memory."""
    if path is None:
        raise BadImage(f"no image: {HOW}")
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageTooLarge(f"image is {size} bytes, more than the limit of {max_bytes} bytes")
    return path.read_bytes()


def decode_upload(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    allowed_formats: Iterable[str] | None = None,
) -> Image.Image:
    """Bytes -> RGB image; raises ``BadImage`` (400) or ``ImageTooLarge`` (413) with a reason."""
    if not data:
        raise BadImage("the 'image' upload is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes, more than the limit of {max_bytes}")
    allowed = [f.upper() for f in allowed_formats] if allowed_formats else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            fmt = _sniff_format(data, max_pixels)
            if allowed is not None and fmt not in allowed:
                raise BadImage(f"image format {fmt} is not accepted; send one of "
                               f"{', '.join(allowed)}")
            return decode_image(data, max_pixels=max_pixels)
    except BadImage:
        raise
    except ValueError as exc:  # decode_image's own messages: not decodable, bomb, too many px
        raise BadImage(str(exc)) from exc
    except Exception as exc:  # any other decoder failure is still the upload's fault
        raise BadImage(f"not a decodable image: {type(exc).__name__}: {exc}") from exc


def _sniff_format(data: bytes, max_pixels: int) -> str:
    """The container format from the header only (no pixel decoding)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise BadImage(f"image is {img.width}x{img.height} pixels, more than the limit "
                               f"of {max_pixels} (a decompression bomb?)")
            return str(img.format or "unknown")
    except Image.DecompressionBombError as exc:
        raise BadImage(f"image refused as a decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        kind = next((name for magic, name in _MAGIC if data.startswith(magic)), None)
        if kind:
            raise BadImage(f"the file starts like a {kind} but cannot be read: it is truncated "
                           "or corrupt") from exc
        raise BadImage("not an image: the bytes match no known image format "
                       f"(first bytes: {data[:8]!r})") from exc


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"GIF8", "GIF"))


# ------------------------------------------------------------------------------ ASGI guard
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class UploadGuard:
    """Pure ASGI middleware for the image routes: multipart only, ``image`` must be a file,
    the body at most ``max_bytes`` (+64 KiB for the form around it).

    Answers 415 (not multipart), 413 (too large, checked on Content-Length and while reading)
    or 400 (malformed form, no ``image`` file) with ``{"error": ...}``; otherwise replays the
    buffered body to the app, which parses it again.
    """

    OVERHEAD = 64 * 1024

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 routes: Iterable[str] = ("/classify", "/detect", "/explain"),
                 max_bytes: int | None = None) -> None:
        self.app = app
        self.routes = frozenset(routes)
        if max_bytes is None:
            from training.config import load_config

            max_bytes = load_config().serving.max_image_bytes
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").rstrip("/")
        if scope["type"] != "http" or scope.get("method") != "POST" or path not in self.routes:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if not headers.get("content-type", "").lower().startswith("multipart/form-data"):
            got = headers.get("content-type") or "no Content-Type"
            await _reply(send, 415, f"{path} takes multipart/form-data, got {got}: {HOW}")
            return
        limit = self.max_bytes + self.OVERHEAD
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _reply(send, 413, f"request body is {declared} bytes; images may be at most "
                                    f"{self.max_bytes} bytes")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _reply(send, 413, f"request body is over {limit} bytes; images may be at "
                                        f"most {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = await _form_problem(scope, body)
        if problem:
            await _reply(send, 400, problem)
            return

        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _form_problem(scope: Scope, body: bytes) -> str | None:
    """Why this multipart body is unacceptable, or None."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    async def once() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    # Without "app" in the scope, Starlette raises the parser's own exception, not a 400 page.
    request = Request({k: v for k, v in scope.items() if k != "app"}, once)
    try:
        form = await request.form(max_part_size=1024 * 1024)
    except MultiPartException as exc:
        return f"malformed multipart/form-data body: {exc.message}"
    except Exception as exc:  # the parser's own errors are the body's fault too
        return f"malformed multipart/form-data body: {type(exc).__name__}: {exc}"
    try:
        values = form.getlist(FIELD)
        if not values:
            fields = sorted(set(form.keys()))
            return f"no '{FIELD}' field (got {fields or 'none'}): {HOW}"
        if not all(isinstance(v, UploadFile) for v in values):
            return f"the '{FIELD}' field is text, not a file: {HOW}"
        if len(values) > 1:
            return f"send one image per request, got {len(values)} '{FIELD}' files"
        return None
    finally:
        await form.close()


async def _reply(send: Send, status: int, message: str) -> None:
    data = json.dumps({"error": message}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
