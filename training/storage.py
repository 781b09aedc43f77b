"""One object-store interface with a local-folder and an S3 backend.

Every stage reads and writes through :class:`Storage`, so the embedded default (``file://``)
and a MinIO/S3 deployment (``s3://bucket/prefix`` + ``endpoint_url``) run the same code path.
Keys are POSIX-style paths relative to the store's root. Writes are atomic where the backend
allows it (local: write to a temp file then rename; S3: single PUT), so a reader never sees
half an object. :meth:`Storage.create` writes only if the key is still absent (local: a hard
link, which fails if the name exists; S3: a conditional ``PutObject`` with ``If-None-Match: *``),
so two writers racing for one key cannot both win: the curated manifest versions rely on it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from training.errors import StorageError

__all__ = ["LocalStorage", "S3Storage", "Storage", "open_storage"]


class Storage(ABC):
    """A flat key -> bytes store; folders are key prefixes."""

    uri: str

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield every key under ``prefix`` (recursively), sorted."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist yet, atomically; False if it already did."""

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Immediate child 'folders' of ``prefix`` (e.g. batch ids in the landing zone)."""
        prefix = _dir(prefix)
        rests = (k[len(prefix):] for k in self.list(prefix))
        return sorted({rest.split("/", 1)[0] for rest in rests if "/" in rest})

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def copy_in(self, src: Path, key: str) -> None:
        """Upload a local file."""
        self.write_bytes(key, Path(src).read_bytes())

    def download(self, key: str, dest: Path) -> Path:
        """Copy an object to a local path (used to hand files to TF/YOLO, which need paths)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.read_bytes(key))
        return dest

    def local_path(self, key: str) -> Path | None:
        """The object's path on this machine if the backend is a local folder, else None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _dir(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


class LocalStorage(Storage):
    """A folder on this machine."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        p = (self.root / key.lstrip("/")).resolve()
        if p != self.root and self.root not in p.parents:
            raise StorageError(f"key {key!r} escapes the store root {self.root}")
        return p

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            yield prefix.strip("/")
            return
        if not base.is_dir():
            return
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        yield from sorted(keys)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.uri}/{key} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri}/{key}: {exc}") from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"cannot write {self.uri}/{key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.link(tmp, path)  # atomic, and refuses an existing name (os.replace would not)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot create {self.uri}/{key}: {exc}") from exc
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def copy_in(self, src: Path, key: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)

    def download(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), dest)
        return dest

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def list_dirs(self, prefix: str = "") -> list[str]:
        """One ``scandir`` of the folder, not a walk of everything below it."""
        base = self._path(prefix) if prefix.strip("/") else self.root
        try:
            return sorted(e.name for e in os.scandir(base) if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []


_TAKEN = {"PreconditionFailed", "ConditionalRequestConflict"}


class S3Storage(Storage):
    """A bucket (and optional prefix) behind the S3 protocol: AWS, MinIO, or a test server."""

    def __init__(
        self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
        region: str = "us-east-1",
    ) -> None:
        import boto3
        from botocore.config import Config as BotoConfig

        self.bucket = bucket
        self.prefix = _dir(prefix)
        self.endpoint_url = endpoint_url
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=BotoConfig(retries={"max_attempts": 3, "mode": "standard"},
                              connect_timeout=5, read_timeout=30),
        )

    def _fail(self, what: str, key: str, exc: Exception) -> StorageError:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return StorageError(f"cannot {what} s3://{self.bucket}/{self.prefix}{key}{where}: {exc}")

    def list(self, prefix: str = "") -> Iterator[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self.prefix + prefix.lstrip("/")
        keys = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                keys.extend(obj["Key"][len(self.prefix):] for obj in page.get("Contents", []))
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("list", prefix, exc) from exc
        yield from sorted(keys)

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Immediate child 'folders' from ``CommonPrefixes`` (``Delimiter="/"``): one entry per
        folder, so the landing zone's batch ids cost one page per 1,000 batches however many
        files they hold."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = self.prefix + _dir(prefix)
        names = set()
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/"
            ):
                for common in page.get("CommonPrefixes", []):
                    name = common["Prefix"][len(full):].rstrip("/")
                    if name:
                        names.add(name)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("list", prefix, exc) from exc
        return sorted(names)

    def read_bytes(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("read", key, exc) from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("write", key, exc) from exc

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data,
                                    IfNoneMatch="*")
            return True
        except ClientError as exc:
            # 412: the key exists; 409: a concurrent conditional write to it is in flight
            if exc.response.get("Error", {}).get("Code") in _TAKEN or exc.response.get(
                    "ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False
            raise self._fail("create", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("create", key, exc) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self.prefix + key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise self._fail("check", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("check", key, exc) from exc


def open_storage(uri: str, endpoint_url: str | None = None, region: str = "us-east-1") -> Storage:
    """Open ``file:///abs/path`` (or a plain path) or ``s3://bucket/prefix``."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return LocalStorage(unquote(parsed.path) if parsed.scheme else uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri!r} names no bucket: use s3://bucket/prefix")
        return S3Storage(parsed.netloc, parsed.path, endpoint_url=endpoint_url, region=region)
    raise StorageError(f"unsupported storage URI {uri!r}: use file:// or s3://")
