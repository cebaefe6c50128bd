"""Where raw releases and run reports are archived: a local folder or S3 (boto3).

A few verbs on keys, the same for both backends, so the flows do not care which one
is configured (``DOCSRAG_OBJECT_STORE`` is a path or ``s3://bucket/prefix``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from docsrag.tasks.core.errors import DocsragError


class ObjectStoreError(DocsragError, RuntimeError):
    """The object store could not be reached or refused a request."""


class ObjectStore(Protocol):
    url: str

    def exists(self, key: str) -> bool: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes | None: ...
    def delete(self, key: str) -> None: ...
    def uri(self, key: str) -> str: ...


class LocalStore:
    def __init__(self, root: Path):
        self.root = root

    def _path(self, key: str) -> Path:
        path = self.root / key
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ObjectStoreError(f"refusing object key {key[:200]!r}: it leaves the object store")
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(path, partial)
        partial.replace(target)  # readers never see a half-copied object

    def get_file(self, key: str, path: Path) -> None:
        shutil.copyfile(self._path(key), path)

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(data)
        partial.replace(target)

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def delete(self, key: str) -> None:
        """The object, and the folders of its key that it leaves empty (``releases/<version>/<sha256>/``
        of a refused archive), up to the store's root."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        for folder in path.parents:
            if folder == self.root or not folder.is_relative_to(self.root):
                break
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): an earlier folder of the key holds others
                break

    def uri(self, key: str) -> str:
        return self._path(key).resolve().as_uri()


class S3Store:
    def __init__(self, url: str, endpoint_url: str | None):
        import boto3
        from botocore.config import Config

        parsed = urlparse(url)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint = endpoint_url or "AWS S3"
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60),
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise ObjectStoreError(f"S3 {what} on s3://{self.bucket} at {self.endpoint} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise ObjectStoreError(f"S3 endpoint {self.endpoint} unreachable during {what}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self._call("head", self.client.head_object, Bucket=self.bucket, Key=self._key(key)) is not None

    def size(self, key: str) -> int | None:
        """Bytes of the object; None when there is none."""
        found = self._call("head", self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        return None if found is None else int(found["ContentLength"])

    def put_file(self, key: str, path: Path) -> None:
        self._call("upload", self.client.upload_file, str(path), self.bucket, self._key(key))

    def get_file(self, key: str, path: Path) -> None:
        self._call("download", self.client.download_file, self.bucket, self._key(key), str(path))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("put", self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes | None:
        found = self._call("get", self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return None if found is None else found["Body"].read()

    def delete(self, key: str) -> None:
        self._call("delete", self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def open_store(url: str, s3_endpoint_url: str | None = None) -> ObjectStore:
    if url.startswith("s3://"):
        return S3Store(url, s3_endpoint_url)
    return LocalStore(Path(url.removeprefix("file://")))
