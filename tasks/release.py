"""Fetch a docs release (https, s3, file or path), archive it once, extract it safely."""

from __future__ import annotations

import hashlib
import re
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import httpx

from tasks.objectstore import ObjectStore, S3Store

_VERSION = re.compile(r"(\d+\.\d+(?:\.(?:\d+|x))?)")
_COPY_CHUNK = 1024 * 1024


class ReleaseError(RuntimeError):
    """The release cannot be used; the message says what to fix."""


class TransientFetchError(ReleaseError):
    """A network failure worth retrying (timeouts, resets, 429, 5xx)."""


@dataclass(frozen=True)
class Release:
    url: str
    version: str
    path: Path
    sha256: str
    size: int
    archive_key: str
    newly_archived: bool


def release_version(url: str) -> str | None:
    """The docs version named in the asset name: ``milvus_docs_2.4.x_en.zip`` -> ``2.4.x``."""
    found = _VERSION.search(PurePosixPath(urlparse(url).path or url).name)
    return found.group(1) if found else None


def fetch_release(url: str, *, home: Path, store: ObjectStore, version: str | None = None,
                  timeout_s: float = 60.0, s3_endpoint_url: str | None = None) -> Release:
    """Bring the zip to local disk, hash it and archive it under version and sha256."""
    local = _local_copy(url, home / "downloads", timeout_s, s3_endpoint_url)
    sha256, size = _digest(local)
    version = version or release_version(url) or f"sha-{sha256[:12]}"
    key = f"releases/{version}/{sha256}/{local.name}"
    newly_archived = not store.exists(key)
    if newly_archived:
        store.put_file(key, local)
    return Release(url, version, local, sha256, size, key, newly_archived)


def _local_copy(url: str, downloads: Path, timeout_s: float, s3_endpoint_url: str | None) -> Path:
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return _download(url, downloads / _asset_name(parsed.path), timeout_s)
    if parsed.scheme == "s3":
        target = downloads / _asset_name(parsed.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        bucket = S3Store(f"s3://{parsed.netloc}", s3_endpoint_url)
        if not bucket.exists(parsed.path.lstrip("/")):
            raise ReleaseError(f"release not found: {url}")
        bucket.get_file(parsed.path.lstrip("/"), target)
        return target
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url).expanduser()
    if not path.is_file():
        raise ReleaseError(f"release file not found: {path}")
    return path


def _asset_name(url_path: str) -> str:
    return PurePosixPath(unquote(url_path)).name or "release.zip"


def _download(url: str, target: Path, timeout_s: float) -> Path:
    """Stream to a .partial file and rename, so a dead connection never leaves a half zip."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=timeout_s) as response:
            if response.status_code == 429 or response.status_code >= 500:
                raise TransientFetchError(f"download of {url} failed: HTTP {response.status_code}")
            if response.status_code >= 400:
                raise ReleaseError(f"download of {url} failed: HTTP {response.status_code}")
            with partial.open("wb") as out:
                for block in response.iter_bytes(_COPY_CHUNK):
                    out.write(block)
    except httpx.TransportError as exc:
        partial.unlink(missing_ok=True)
        raise TransientFetchError(f"download of {url} failed: {exc.__class__.__name__}: {exc}") from exc
    partial.replace(target)
    return target


def _digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(_COPY_CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def extract_release(release: Release, dest_root: Path, *, max_bytes: int, max_files: int) -> Path:
    """Extract into ``dest_root/<sha256>`` after checking every entry; reuse a finished extraction."""
    dest = dest_root / release.sha256
    if (dest / ".complete").exists():
        return dest
    partial = dest_root / f"{release.sha256}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with _open_zip(release.path) as archive:
            members = _checked_members(archive, max_bytes, max_files)
            _copy_members(archive, members, partial, max_bytes)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (partial / ".complete").touch()
    shutil.rmtree(dest, ignore_errors=True)
    partial.replace(dest)
    return dest


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ReleaseError(f"{path.name} is not a valid zip archive (corrupt or truncated): {exc}") from None


def _checked_members(archive: zipfile.ZipFile, max_bytes: int, max_files: int) -> list[zipfile.ZipInfo]:
    infos = archive.infolist()
    if not infos:
        raise ReleaseError("the archive is empty")
    if len(infos) > max_files:
        raise ReleaseError(f"the archive has {len(infos)} entries, over the limit of {max_files} "
                           "(DOCSRAG_MAX_ARCHIVE_FILES)")
    declared = sum(info.file_size for info in infos)
    if declared > max_bytes:
        raise ReleaseError(f"the archive unpacks to {declared} bytes, over the limit of {max_bytes} "
                           "(DOCSRAG_MAX_ARCHIVE_BYTES)")
    for info in infos:
        _check_entry(info)
    files = [info for info in infos if not info.is_dir()]
    if not any(info.filename.lower().endswith(".md") for info in files):
        raise ReleaseError("the archive holds no markdown (.md) files")
    return files


def _check_entry(info: zipfile.ZipInfo) -> None:
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ReleaseError(f"refusing archive entry with an absolute path: {info.filename!r}")
    if ".." in PurePosixPath(name).parts:
        raise ReleaseError(f"refusing archive entry that escapes the release folder: {info.filename!r}")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ReleaseError(f"refusing archive entry that is a symbolic link: {info.filename!r}")


def _copy_members(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], dest: Path, max_bytes: int) -> None:
    written = 0
    for info in members:
        target = dest / info.filename.replace("\\", "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with archive.open(info) as src, target.open("wb") as out:
                # Count real bytes: a forged header can under-declare sizes (zip bomb).
                while block := src.read(_COPY_CHUNK):
                    written += len(block)
                    if written > max_bytes:
                        raise ReleaseError(f"the archive unpacks to more than {max_bytes} bytes "
                                           "(DOCSRAG_MAX_ARCHIVE_BYTES)")
                    out.write(block)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            raise ReleaseError(f"corrupt archive entry {info.filename!r}: {exc}") from None
