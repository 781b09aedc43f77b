"""Upload decoding: every kind of bad upload is a BadImage (HTTP 4xx) whose message says what is
wrong, and the request guard lets only a bounded multipart form with an ``image`` file through."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from serving.decode import BadImage, ImageTooLarge, UploadGuard, decode_upload, read_upload

LIMITS = {"max_bytes": 200_000, "max_pixels": 100_000, "allowed_formats": ["PNG", "JPEG"]}


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _noise(side: int = 64, fmt: str = "PNG") -> bytes:
    return _encode(Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)), fmt)


def test_a_good_image_decodes_to_rgb() -> None:
    img = decode_upload(_encode(Image.new("L", (40, 32), 128)), **LIMITS)
    assert img.mode == "RGB" and img.size == (40, 32)
    assert decode_upload(_noise(fmt="JPEG"), **LIMITS).size == (64, 64)


@pytest.mark.parametrize(("data", "status", "words"), [
    (b"", 400, "empty"),
    (b"just some text, no pixels", 400, "not an image"),
    (_noise()[: len(_noise()) // 2], 400, "truncated"),
    (_noise()[:40], 400, "starts like a PNG"),
    (_noise(fmt="JPEG")[:300], 400, "not a decodable image"),
    (_encode(Image.new("RGB", (8, 8)), "GIF"), 400, "format GIF is not accepted"),
    (_encode(Image.new("RGB", (400, 300))), 400, "more than the limit of 100000"),  # 120k px
    (_encode(Image.new("1", (600, 600))), 400, "decompression bomb"),  # 360k px > 2x limit
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 300_000, 413, "more than the limit"),
])
def test_bad_uploads_say_what_is_wrong(data: bytes, status: int, words: str) -> None:
    with pytest.raises(BadImage) as info:
        decode_upload(data, **LIMITS)
    assert info.value.status == status
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)  # callers that know only ValueError still catch it


def test_the_pixel_limit_does_not_leak_into_the_process() -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImage):
        decode_upload(_encode(Image.new("1", (600, 600))), **LIMITS)
    decode_upload(_noise(), **LIMITS)
    assert Image.MAX_IMAGE_PIXELS == before


def test_read_upload_refuses_big_files_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"\0" * 1000)
    with pytest.raises(ImageTooLarge, match="1000 bytes"):
        read_upload(path, max_bytes=999)
    assert read_upload(path, max_bytes=1000) == b"\0" * 1000
    with pytest.raises(BadImage, match="multipart form field 'image'"):
        read_upload(None, max_bytes=10)


# ---------------------------------------------------------------------------- UploadGuard
async def _body_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the length of the body it received (proves the guard replays it)."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def _post(path: str = "/classify", **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        app = UploadGuard(_body_echo, max_bytes=100_000)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post(path, **kwargs)

    return asyncio.run(go())


def test_guard_passes_a_multipart_image_and_replays_the_body() -> None:
    resp = _post(files={"image": ("c.png", _noise(), "image/png")})
    assert resp.status_code == 200
    assert int(resp.text) > len(_noise()) - 100  # the app saw the whole form


@pytest.mark.parametrize(("kwargs", "status", "words"), [
    ({"json": {"image": "/etc/hosts"}}, 415, "multipart/form-data"),
    ({"content": b"raw", "headers": {"Content-Type": "image/png"}}, 415, "image/png"),
    ({"data": {"image": "http://example.com/x.png"}, "files": {"other": ("o", b"1")}},
     400, "text, not a file"),
    ({"files": {"picture": ("c.png", b"123", "image/png")}}, 400, "no 'image' field"),
    ({"files": [("image", ("a.png", b"1")), ("image", ("b.png", b"2"))]}, 400, "one image"),
    ({"files": {"image": ("c.png", b"\0" * 200_000, "image/png")}}, 413, "at most 100000"),
    ({"content": b"--xyz\r\nnonsense", "headers": {
        "Content-Type": "multipart/form-data; boundary=xyz"}}, 400, "'image'"),
])
def test_guard_refuses_what_bentoml_would_mishandle(
    kwargs: dict[str, Any], status: int, words: str
) -> None:
    resp = _post(**kwargs)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]


def test_guard_counts_a_body_sent_without_content_length() -> None:
    async def chunks() -> Any:
        for _ in range(30):
            yield b"x" * 10_000

    resp = _post(content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert resp.status_code == 413


def test_guard_ignores_other_routes_and_methods() -> None:
    assert _post("/whoami", json={}).status_code == 200
    assert _post("/other", content=b"x" * 300_000).status_code == 200
