"""Fetch a docs release (https, s3, file or path), archive it once, extract it safely."""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import shutil
import stat
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse, urlsplit

import httpx

from docsrag.tasks.core.errors import DocsragError
from docsrag.tasks.core.objectstore import ObjectStore, S3Store
from docsrag.tasks.core.redaction import redact_url

_VERSION = re.compile(r"(\d+\.\d+(?:\.(?:\d+|x))?)")
_RELEASE_VERSION = re.compile(r"\d+(?:\.(?:\d+|x))+")
# A version names folders, object keys and aliases: a short slug that cannot climb out of any of them.
_SAFE_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}")
_COPY_CHUNK = 1024 * 1024
# Set when the process is asked to stop (SIGTERM): downloads in worker threads end at their next block.
stopping = threading.Event()
MAX_RETRY_AFTER_S = 30  # the longest wait a fetch retry honours; beyond it the run fails saying when to retry
MAX_REDIRECTS = 5  # GitHub's release download takes one (to its asset host); a chain past this is refused
# Shown each redirect's target and the URL that gave it, before the target is asked: raises to refuse
# it (a deployment's run passes its source policy, tasks/ingest/source_policy.py).
RedirectCheck = Callable[[str, str], None]


class ReleaseError(DocsragError, RuntimeError):
    """The release cannot be used; the message says what to fix."""


class TransientFetchError(ReleaseError):
    """A network failure worth retrying (timeouts, resets, 429, 5xx)."""


class ReleaseUnreachable(TransientFetchError):
    """The release's server could not be reached at all (no network, no such host, refused): a
    deployment's run retries it like a TransientFetchError, a person at the terminal is told at once."""


@dataclass(frozen=True)
class Release:
    url: str  # redacted: safe to show and store
    version: str
    path: Path
    sha256: str
    size: int
    archive_key: str
    newly_archived: bool
    named: bool = True  # the version was given or read from the asset name, not made up from the hash
    downloaded: bool = False  # ``path`` is this home's copy (downloads/<sha256>/), not the user's own file


def checked_version(version: str) -> str:
    """A version from a flag, a feed or an asset name, safe to use in paths, keys and aliases."""
    if not _SAFE_VERSION.fullmatch(version) or ".." in version:
        raise ReleaseError(f"refusing version {version[:80]!r}: a version is 1-64 letters, digits, '.', '_' "
                           "or '-', starting with a letter or digit, without '..'")
    return version


def version_order(version: str) -> tuple:
    """2.4.x < 2.4.10 < 2.5.x; an 'x' stands for the newest patch of its line. Anything that is not
    a release version (``sha-…``, a build name) sorts below every release version."""
    if not _RELEASE_VERSION.fullmatch(version):
        return (-1,)
    return tuple(int(p) if p.isdigit() else 10**6 for p in version.split("."))


def version_slug(version: str) -> str:
    """The version as Milvus names allow it: 2.4.x -> 2_4_x."""
    return re.sub(r"[^A-Za-z0-9]", "_", version)


def has_credentials(url: str) -> bool:
    return redact_url(url) != url


def release_version(url: str) -> str | None:
    """The docs version named in the asset name: ``milvus_docs_2.4.x_en.zip`` -> ``2.4.x``. The name
    is read as its server reads it (an http path decoded, ';' included): ``milvus_docs_%32.4.x_en.zip``
    is the 2.4.x asset, not a release 32.4.x that would sort above every genuine one."""
    found = _VERSION.search(_asset_name_of(url))
    return found.group(1) if found else None


def _asset_name_of(url: str) -> str:
    """The asset's file name as its fetcher reads it: an http(s) server and a file URL decode the
    path, an S3 key and a local path are taken as written."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https", "file"):
        return PurePosixPath(unquote(parts.path)).name
    return PurePosixPath(parts.path if scheme == "s3" else url).name


def check_source(url: str, version: str | None = None) -> None:
    """What can be told about a release before a run starts: its version (given or in the asset
    name), its URL's scheme, and, for a local path, that the file is there."""
    named = version or release_version(url)
    if named:
        checked_version(named)
    _local_path(url)


def _local_path(url: str) -> Path | None:
    """The release's file on this machine (a path or file:// URL), None for a remote URL."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "s3"):
        return None
    if len(parsed.scheme) > 1 and parsed.scheme != "file":  # one letter: a Windows drive, a path
        raise ReleaseError(f"unsupported release URL {redact_url(url)}: use https, http, s3, file or a path")
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url).expanduser()
    if not path.is_file():
        raise ReleaseError(f"release file not found: {path} (no such file here; pass --release with the path or "
                           "URL of a docs release zip)")
    return path


def fetch_release(url: str, *, home: Path, store: ObjectStore, version: str | None = None,
                  timeout_s: float = 60.0, s3_endpoint_url: str | None = None, max_bytes: int = 512 * 1024**2,
                  deadline_s: float = 1800.0, check_redirect: RedirectCheck | None = None) -> Release:
    """Bring the zip to local disk, hash it and archive it under version and sha256. Over http(s),
    each redirect is shown to ``check_redirect`` before it is followed."""
    named = version or release_version(url)
    if named:
        checked_version(named)  # before anything is downloaded
    downloads = home / "downloads"
    local, downloaded = _local_copy(url, downloads, timeout_s, s3_endpoint_url, max_bytes, deadline_s,
                                    check_redirect)
    sha256, size = _digest(local)
    if downloaded:  # by content: a concurrent run of the same release writes the same bytes there
        final = downloads / sha256 / _asset_name(url)
        final.parent.mkdir(parents=True, exist_ok=True)
        local = local.replace(final)
    version = named or f"sha-{sha256[:12]}"
    key = f"releases/{version}/{sha256}/{local.name}"
    newly_archived = not store.exists(key)
    if newly_archived:
        store.put_file(key, local)
    return Release(redact_url(url), version, local, sha256, size, key, newly_archived, named=bool(named),
                   downloaded=downloaded)


def _local_copy(url: str, downloads: Path, timeout_s: float, s3_endpoint_url: str | None, max_bytes: int,
                deadline_s: float, check_redirect: RedirectCheck | None) -> tuple[Path, bool]:
    """-> (a local file, whether it is a scratch copy of this run's own)."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return _download(url, _scratch(downloads), timeout_s, max_bytes, deadline_s, check_redirect), True
    if parsed.scheme == "s3":
        return _s3_copy(url, _scratch(downloads), s3_endpoint_url, max_bytes), True
    return _local_path(url), False


def _scratch(folder: Path) -> Path:
    """A file name no other run uses: two runs never write into one another's download."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f".{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"


def _s3_copy(url: str, target: Path, s3_endpoint_url: str | None, max_bytes: int) -> Path:
    parsed = urlparse(url)
    bucket, key = S3Store(f"s3://{parsed.netloc}", s3_endpoint_url), parsed.path.lstrip("/")
    size = bucket.size(key)
    if size is None:
        raise ReleaseError(f"release not found: {redact_url(url)}")
    if size > max_bytes:
        raise ReleaseError(f"download of {redact_url(url)} refused: {size} bytes, over {max_bytes} bytes "
                           "(DOCSRAG_MAX_ARCHIVE_BYTES)")
    try:
        bucket.get_file(key, target)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


def _asset_name(url: str) -> str:
    name = re.sub(r"[^\w.-]", "_", _asset_name_of(url))[:200]  # a plain local file name
    return name.lstrip(".") or "release.zip"


def _download(url: str, target: Path, timeout_s: float, max_bytes: int, deadline_s: float,
              check_redirect: RedirectCheck | None) -> Path:
    """Stream to ``target``, a scratch file deleted on any failure, so a dead connection never leaves
    a half zip where a release is looked for. Stops at
    ``max_bytes`` and after ``deadline_s`` overall (a server trickling bytes keeps every read alive);
    redirects are followed over http(s) only, each shown to ``check_redirect`` first."""
    partial, shown = target, redact_url(url)
    deadline = time.monotonic() + deadline_s
    try:
        with httpx.Client(timeout=timeout_s) as client, _followed(client, url, shown, check_redirect) as response:
            _check_status(response, shown)
            written = 0
            with partial.open("wb") as out:
                for block in response.iter_bytes():  # as it arrives: a trickle meets the deadline too
                    written += len(block)
                    if written > max_bytes:
                        raise ReleaseError(f"download of {shown} stopped: over {max_bytes} bytes "
                                           "(DOCSRAG_MAX_ARCHIVE_BYTES)")
                    if stopping.is_set():
                        raise ReleaseError(f"download of {shown} stopped: the run is stopping")
                    if time.monotonic() > deadline:  # not retried: another try would take as long
                        raise ReleaseError(f"download of {shown} stopped: not finished after {deadline_s:.0f} s "
                                           "(DOCSRAG_DOWNLOAD_DEADLINE_S)")
                    out.write(block)
    except httpx.UnsupportedProtocol:
        partial.unlink(missing_ok=True)
        raise ReleaseError(f"download of {shown} redirected to a URL that is not http(s): refused") from None
    except httpx.ConnectError as exc:
        partial.unlink(missing_ok=True)
        raise ReleaseUnreachable(f"download of {shown} failed: could not reach its server ({exc})") from None
    except httpx.TransportError as exc:
        partial.unlink(missing_ok=True)
        # httpx puts the full URL in some messages: name the redacted one instead.
        raise TransientFetchError(f"download of {shown} failed: {exc.__class__.__name__}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return partial


@contextmanager
def _followed(client: httpx.Client, url: str, shown: str, check_redirect: RedirectCheck | None
              ) -> Iterator[httpx.Response]:
    """The streamed response at the end of ``url``'s redirects. httpx would follow them unseen: here
    each target is checked before a request is sent to it."""
    for _ in range(MAX_REDIRECTS + 1):
        response = client.send(client.build_request("GET", url), stream=True)
        if response.next_request is None:  # not a redirect: the answer itself
            try:
                yield response
            finally:
                response.close()
            return
        response.close()
        target = str(response.next_request.url)
        if check_redirect:
            check_redirect(target, url)
        url = target
    raise ReleaseError(f"download of {shown} refused: more than {MAX_REDIRECTS} redirects")


def _check_status(response: httpx.Response, shown: str) -> None:
    """429 and 5xx are worth retrying; a Retry-After longer than our retries wait is a clear refusal."""
    status = response.status_code
    if status == 429 or status >= 500:
        wait = _retry_after_s(response)
        if wait is not None and wait > MAX_RETRY_AFTER_S:
            raise ReleaseError(f"download of {shown}: the server asks to retry after {wait:.0f} s (HTTP {status})")
        if wait:
            time.sleep(wait)  # what it asked for, before the task's own retry
        raise TransientFetchError(f"download of {shown} failed: HTTP {status}")
    if status >= 400:
        raise ReleaseError(f"download of {shown} failed: HTTP {status}")


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(_COPY_CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def extract_release(release: Release, dest_root: Path, *, max_bytes: int, max_files: int) -> Path:
    """Extract into ``dest_root/<sha256>`` after checking every entry. A finished extraction is
    reused only when it holds every file of the archive at its size; each run extracts into a
    scratch folder of its own and renames it into place, so no run sees another's half tree."""
    dest = dest_root / release.sha256
    with _open_zip(release.path) as archive:
        members = _checked_members(archive, max_bytes, max_files)
        if _extracted(dest, members):
            return dest
        partial = _scratch(dest_root)
        try:
            _copy_members(archive, members, partial, max_bytes)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    (partial / ".complete").touch()
    shutil.rmtree(dest, ignore_errors=True)  # an incomplete or damaged tree
    try:
        partial.replace(dest)
    except OSError:  # a concurrent run put its own complete tree there first
        shutil.rmtree(partial, ignore_errors=True)
        if not _extracted(dest, members):
            raise
    return dest


def _extracted(dest: Path, members: list[zipfile.ZipInfo]) -> bool:
    if not (dest / ".complete").is_file():
        return False
    for info in members:
        path = dest / info.filename.replace("\\", "/")
        if not path.is_file() or path.stat().st_size != info.file_size:
            return False
    return True


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
    _check_tree(files)
    return files


def _check_tree(files: list[zipfile.ZipInfo]) -> None:
    """A name that is a file and also the folder of another entry (``en/a.md``, ``en/a.md/b.md``) has
    no tree to extract to: refused before a byte is written, whichever comes first in the archive."""
    paths = {PurePosixPath(info.filename.replace("\\", "/")) for info in files}
    for path in paths:
        clash = next((parent for parent in path.parents if parent in paths), None)
        if clash is not None:
            raise ReleaseError(f"refusing archive: {clash.as_posix()!r} is both a file and a folder "
                               f"(of {path.as_posix()[:200]!r})")


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
