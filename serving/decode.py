"""Uploaded bytes -> a PIL image, or a ``BadImage`` whose message tells the caller what is wrong.

The rules are the input contract of :mod:`training.contract`, the very rules the batch
validation applies (formats, modes, sides; the endpoint's own byte and pixel budgets), and the
conversion to RGB is the one training uses, so a file the validation would quarantine is a 4xx
naming the same reason here, and any decoder exception is a 4xx too, never a dead worker.

``UploadGuard`` checks the request itself before BentoML parses it: BentoML would also accept a
JSON body naming a server-side *path* (``{"image": "/etc/hosts"}``) or a text field holding a
URL to download, and it answers malformed forms with a 500. The guard lets through only a
multipart form whose ``image`` field is a file, of bounded size, received within
``serving.body_timeout_s``. BentoML writes the upload to a temporary file whose name ends
with the client's filename (245+ bytes: ENAMETOOLONG, a 500 on every image route), so the
guard hands BentoML a form rebuilt with a safe name (``upload`` + a short extension) instead.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from training.contract import InputContract, check_image, convert

__all__ = [
    "BadImage", "ImageTooLarge", "NotExplainable", "UploadGuard", "decode_upload", "read_upload",
    "safe_filename",
]

FIELD = "image"
HOW = "send the file as the multipart form field 'image' (curl -F image=@cell.png)"


class BadImage(ValueError):
    """The upload is not an acceptable image; ``status`` is the HTTP status to answer with,
    ``reasons`` the input contract's codes (``training.contract``)."""

    status = 400

    def __init__(self, message: str, reasons: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.reasons = tuple(reasons)


class ImageTooLarge(BadImage):
    status = 413


class NotExplainable(RuntimeError):
    """The champion cannot explain its answer (a hand-crafted model has no gradients for
    Grad-CAM): a 409 for ``/explain``, and the web page shows the answer without a heatmap."""

    status = 409


def read_upload(path: str | Path | None, max_bytes: int) -> bytes:
    """Read an uploaded file, refusing it by size before reading it into memory."""
    if path is None:
        raise BadImage(f"no image: {HOW}")
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageTooLarge(f"file_too_large: image is {size} bytes, more than the limit of "
                            f"{max_bytes} bytes", reasons=("file_too_large",))
    return path.read_bytes()


def decode_upload(
    data: bytes,
    *,
    contract: InputContract | None = None,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
    allowed_formats: Iterable[str] | None = None,
) -> Image.Image:
    """Bytes -> RGB image by the input contract; raises ``BadImage`` (400) or ``ImageTooLarge``
    (413, ``file_too_large``) whose ``reasons`` are the contract's codes, named in the message.

    ``contract``: the endpoint's (``InputContract.for_serving(cfg)``); without one, the default
    contract with the given budgets and formats. The image is converted as training converts
    it (:func:`training.contract.convert`: EXIF orientation, then the mode's conversion).
    """
    if contract is None:
        base = InputContract()
        contract = InputContract(
            tuple(f.upper() for f in allowed_formats) if allowed_formats else base.formats,
            base.modes, base.min_side, base.max_side,
            max_pixels if max_pixels is not None else base.max_pixels,
            max_bytes if max_bytes is not None else base.max_bytes)
    if len(data) > contract.max_bytes:  # before anything is parsed
        raise ImageTooLarge(f"file_too_large: image is {len(data)} bytes, more than the limit "
                            f"of {contract.max_bytes}", reasons=("file_too_large",))
    try:
        verdict, img = check_image(data, contract)
        if img is None:
            cls = ImageTooLarge if "file_too_large" in verdict.reasons else BadImage
            raise cls(verdict.message, reasons=verdict.reasons)
        return convert(img)
    except BadImage:
        raise
    except Exception as exc:  # any other decoder failure is still the upload's fault
        raise BadImage(f"not_decodable:unreadable: not a decodable image: "
                       f"{type(exc).__name__}: {exc}",
                       reasons=("not_decodable:unreadable",)) from exc


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
                 max_bytes: int | None = None, body_timeout_s: float | None = None) -> None:
        self.app = app
        self.routes = frozenset(routes)
        if max_bytes is None or body_timeout_s is None:
            from training.config import load_config

            serving = load_config().serving
            max_bytes = serving.max_image_bytes if max_bytes is None else max_bytes
            body_timeout_s = serving.body_timeout_s if body_timeout_s is None else body_timeout_s
        self.max_bytes = int(max_bytes)
        self.body_timeout_s = float(body_timeout_s)

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
        deadline = time.monotonic() + self.body_timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                await _reply(send, 408, f"the request body did not arrive within "
                                        f"{self.body_timeout_s:g}s")
                return
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
        problem, body, content_type = await _safe_form(scope, b"".join(chunks))
        if problem:
            await _reply(send, 400, problem)
            return
        scope = dict(scope, headers=[
            *((k, v) for k, v in scope.get("headers", [])
              if k.lower() not in (b"content-type", b"content-length")),
            (b"content-type", content_type), (b"content-length", str(len(body)).encode())])

        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


_SAFE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}$")


def safe_filename(name: str | None) -> str:
    """A filename safe to put in a path: ``upload`` + the client's extension when it is short
    and alphanumeric (``.png``), whatever the client sent (long, ``../``, control bytes)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    match = _SAFE_SUFFIX.search(base)
    return "upload" + (match.group(0).lower() if match else "")


_MEDIA_TYPE = re.compile(r"^[\w.+-]+/[\w.+-]+$")


async def _safe_form(scope: Scope, body: bytes) -> tuple[str | None, bytes, bytes]:
    """(why the multipart body is unacceptable or None, the body rebuilt with safe filenames,
    its Content-Type). Only the ``image`` file is kept: it is all the routes take."""
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    async def once() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    # Without "app" in the scope, Starlette raises the parser's own exception, not a 400 page.
    request = Request({k: v for k, v in scope.items() if k != "app"}, once)
    try:
        form = await request.form(max_part_size=1024 * 1024)
    except MultiPartException as exc:
        return f"malformed multipart/form-data body: {exc.message}", b"", b""
    except Exception as exc:  # the parser's own errors are the body's fault too
        return f"malformed multipart/form-data body: {type(exc).__name__}: {exc}", b"", b""
    try:
        problem = _check_form(form)
        if problem:
            return problem, b"", b""
        upload = form.getlist(FIELD)[0]  # the only field the routes take
        media = upload.content_type or ""
        media = media if _MEDIA_TYPE.match(media) else "application/octet-stream"
        boundary = "leukoflow-" + secrets.token_hex(16)
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{FIELD}"; '
                f'filename="{safe_filename(upload.filename)}"\r\nContent-Type: {media}\r\n\r\n')
        rebuilt = head.encode() + await upload.read() + f"\r\n--{boundary}--\r\n".encode()
        return None, rebuilt, f"multipart/form-data; boundary={boundary}".encode()
    finally:
        await form.close()


def _check_form(form: Any) -> str | None:
    from starlette.datastructures import UploadFile

    values = form.getlist(FIELD)
    if not values:
        fields = sorted(set(form.keys()))
        return f"no '{FIELD}' field (got {fields or 'none'}): {HOW}"
    if not all(isinstance(v, UploadFile) for v in values):
        return f"the '{FIELD}' field is text, not a file: {HOW}"
    if len(values) > 1:
        return f"send one image per request, got {len(values)} '{FIELD}' files"
    return None


async def _reply(send: Send, status: int, message: str) -> None:
    data = json.dumps({"error": message}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
