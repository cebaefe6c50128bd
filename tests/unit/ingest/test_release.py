"""Fetching and safe extraction, on zips built by the tests (hostile ones included)."""

import hashlib
import http.server
import stat
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest

from docsrag.tasks.core.objectstore import LocalStore
from docsrag.tasks.ingest.release import Release, ReleaseError, extract_release, fetch_release, release_version


def make_zip(path: Path, entries: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def as_release(path: Path) -> Release:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Release(str(path), "1.0", path, digest, path.stat().st_size, "k", True)


def extract(path: Path, dest: Path, max_bytes=10**7, max_files=100) -> Path:
    return extract_release(as_release(path), dest, max_bytes=max_bytes, max_files=max_files)


GOOD = {"en/": b"", "en/a.md": b"# A\n\ntext\n", "en/sub/b.md": b"# B\n"}


def test_extracts_a_good_release(tmp_path):
    root = extract(make_zip(tmp_path / "r.zip", GOOD), tmp_path / "out")
    assert (root / "en" / "a.md").read_text() == "# A\n\ntext\n"
    assert (root / "en" / "sub" / "b.md").exists()


@pytest.mark.parametrize("name,reason", [
    ("/etc/evil.md", "absolute path"),
    ("C:/evil.md", "absolute path"),
    ("en/../../evil.md", "escapes the release folder"),
    ("..\\evil.md", "escapes the release folder"),
])
def test_refuses_hostile_paths(tmp_path, name, reason):
    archive = make_zip(tmp_path / "r.zip", {**GOOD, name: b"x"})
    with pytest.raises(ReleaseError, match=reason):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.md").exists()
    assert not any((tmp_path / "out").glob("*/en/a.md")), "nothing is extracted from a refused archive"


FILE_AND_FOLDER = {"en/a.md": b"# A\n", "en/a.md/b.md": b"# B\n"}


@pytest.mark.parametrize("entries", [FILE_AND_FOLDER, dict(reversed(FILE_AND_FOLDER.items()))])
def test_refuses_a_file_and_a_folder_of_one_name(tmp_path, entries):
    archive = make_zip(tmp_path / "r.zip", entries)
    with pytest.raises(ReleaseError, match="'en/a.md' is both a file and a folder"):
        extract(archive, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*/**/*.md"))  # the scratch tree is gone


def test_a_refused_archive_is_not_kept_in_the_object_store(tmp_path):
    """The ingest flow's extract stage forgets what it refused: no archive, no empty folders left."""
    from docsrag.flows.ingest import extract as extract_stage
    from docsrag.tasks.core.settings import Settings

    archive = make_zip(tmp_path / "milvus_docs_9.8.x_en.zip", FILE_AND_FOLDER)
    objects, settings = tmp_path / "objects", Settings.model_validate({"home": tmp_path / "home"})
    (objects / "reports").mkdir(parents=True)  # the store's other folders stay
    rel = fetch_release(str(archive), home=settings.home, store=LocalStore(objects))
    assert rel.newly_archived and (objects / rel.archive_key).is_file()
    with pytest.raises(ReleaseError, match="both a file and a folder"):
        extract_stage.fn(settings, LocalStore(objects), rel)
    assert [p.relative_to(objects).as_posix() for p in objects.rglob("*")] == ["reports"]


def test_refuses_symbolic_links(tmp_path):
    archive = make_zip(tmp_path / "r.zip", GOOD, links={"en/link.md": "/etc/passwd"})
    with pytest.raises(ReleaseError, match="symbolic link"):
        extract(archive, tmp_path / "out")


def test_refuses_too_many_files(tmp_path):
    archive = make_zip(tmp_path / "r.zip", {f"en/{i}.md": b"x" for i in range(20)})
    with pytest.raises(ReleaseError, match="20 entries, over the limit of 10 .DOCSRAG_MAX_ARCHIVE_FILES"):
        extract(archive, tmp_path / "out", max_files=10)


def test_refuses_too_many_bytes(tmp_path):
    archive = make_zip(tmp_path / "r.zip", {"en/big.md": b"a" * 50_000})
    with pytest.raises(ReleaseError, match="DOCSRAG_MAX_ARCHIVE_BYTES"):
        extract(archive, tmp_path / "out", max_bytes=10_000)


def test_counts_real_bytes_not_declared_sizes(tmp_path):
    """A forged header that under-declares the size must not get past the cap."""
    archive = make_zip(tmp_path / "r.zip", {"en/big.md": b"a" * 50_000})
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo("en/big.md")
    # Patch the central directory's uncompressed size (offset 24 in the entry) to 10 bytes.
    central = data.rfind(b"PK\x01\x02")
    data[central + 24:central + 28] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match="corrupt archive entry|DOCSRAG_MAX_ARCHIVE_BYTES"):
        extract(archive, tmp_path / "out", max_bytes=10_000)
    assert info.file_size == 50_000
    assert not list((tmp_path / "out").iterdir()), "no partial extraction is left behind"


def test_corrupt_archive_is_named(tmp_path):
    archive = tmp_path / "r.zip"
    archive.write_bytes(make_zip(tmp_path / "ok.zip", GOOD).read_bytes()[:60])
    with pytest.raises(ReleaseError, match="not a valid zip archive"):
        extract(archive, tmp_path / "out")


def test_corrupt_entry_is_named(tmp_path):
    archive = make_zip(tmp_path / "r.zip", {"en/a.md": b"hello " * 1000})
    data = bytearray(archive.read_bytes())
    start = data.find(b"en/a.md") + len("en/a.md") + 5
    data[start:start + 20] = b"\x00" * 20
    archive.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match="corrupt archive entry 'en/a.md'"):
        extract(archive, tmp_path / "out")


def test_empty_archive(tmp_path):
    with pytest.raises(ReleaseError, match="empty"):
        extract(make_zip(tmp_path / "r.zip", {}), tmp_path / "out")


def test_archive_without_markdown(tmp_path):
    with pytest.raises(ReleaseError, match="no markdown"):
        extract(make_zip(tmp_path / "r.zip", {"en/a.txt": b"x"}), tmp_path / "out")


def test_version_from_asset_name():
    assert release_version("https://x/y/milvus_docs_2.4.x_en.zip") == "2.4.x"
    assert release_version("/data/milvus_docs_2.5.10_en.zip") == "2.5.10"
    assert release_version("docs.zip") is None


def test_the_version_is_read_from_the_name_the_server_sees():
    """A server decodes the path: '%32.4.x' is the 2.4.x asset, not a release 32.4.x that would sort
    above every genuine one."""
    assert release_version("https://x/y/milvus_docs_%32.4.x_en.zip") == "2.4.x"
    assert release_version("https://x/y/a;milvus_docs_2.5.x_en.zip") == "2.5.x"  # ';' is part of the name
    assert release_version("/data/milvus_docs_%32.6.x_en.zip") == "32.6.x"  # a local name is not decoded
    assert release_version("s3://b/milvus_docs_%32.6.x_en.zip") == "32.6.x"  # nor is an S3 key


def test_fetch_from_path_archives_once(tmp_path):
    archive = make_zip(tmp_path / "milvus_docs_9.9.x_en.zip", GOOD)
    store = LocalStore(tmp_path / "objects")
    first = fetch_release(str(archive), home=tmp_path, store=store)
    second = fetch_release(f"file://{archive}", home=tmp_path, store=store)
    assert first.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert first.size == archive.stat().st_size and first.version == "9.9.x"
    assert (first.newly_archived, second.newly_archived) == (True, False)
    assert store.exists(f"releases/9.9.x/{first.sha256}/milvus_docs_9.9.x_en.zip")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ReleaseError, match="release file not found"):
        fetch_release(str(tmp_path / "nope.zip"), home=tmp_path, store=LocalStore(tmp_path / "o"))


@pytest.fixture
def http_dir(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_over_http_streams_and_archives(tmp_path, http_dir):
    served, base = http_dir
    make_zip(served / "milvus_docs_1.2.x_en.zip", GOOD)
    store = LocalStore(tmp_path / "objects")
    rel = fetch_release(f"{base}/milvus_docs_1.2.x_en.zip", home=tmp_path / "home", store=store)
    assert rel.path.read_bytes() == (served / "milvus_docs_1.2.x_en.zip").read_bytes()
    assert not list(rel.path.parent.glob("*.partial"))
    again = fetch_release(f"{base}/milvus_docs_1.2.x_en.zip", home=tmp_path / "home", store=store)
    assert again.sha256 == rel.sha256 and not again.newly_archived
    encoded = fetch_release(f"{base}/milvus_docs_%31.2.x_en.zip", home=tmp_path / "home", store=store)
    assert encoded.sha256 == rel.sha256 and encoded.version == "1.2.x"


def test_http_not_found_is_a_clear_error(tmp_path, http_dir):
    _, base = http_dir
    with pytest.raises(ReleaseError, match="HTTP 404"):
        fetch_release(f"{base}/missing.zip", home=tmp_path, store=LocalStore(tmp_path / "o"))


class Hops:
    """A redirect check that allows what ``allowed`` names and remembers every hop it was shown."""

    def __init__(self, *allowed: str):
        self.allowed, self.seen = allowed, []

    def __call__(self, url: str, came_from: str) -> None:
        self.seen.append((url, came_from))
        if not url.startswith(self.allowed):
            raise ReleaseError(f"refusing the redirect to {url}")


def test_each_redirect_is_checked_before_it_is_followed(tmp_path, http_dir):
    from tests.unit.ingest.test_source_policy import Redirecting, Watched

    served, base = http_dir
    make_zip(served / "milvus_docs_1.2.x_en.zip", GOOD)
    internal = Watched()
    mirror, elsewhere = Redirecting(f"{base}/milvus_docs_1.2.x_en.zip"), Redirecting(internal.url + "/x.zip")
    hops, store = Hops(base), LocalStore(tmp_path / "objects")
    rel = fetch_release(f"{mirror.url}/milvus_docs_1.2.x_en.zip", home=tmp_path / "home", store=store,
                        check_redirect=hops)
    assert rel.path.read_bytes() == (served / "milvus_docs_1.2.x_en.zip").read_bytes()
    assert hops.seen == [(f"{base}/milvus_docs_1.2.x_en.zip", f"{mirror.url}/milvus_docs_1.2.x_en.zip")]
    with pytest.raises(ReleaseError, match="refusing the redirect"):
        fetch_release(f"{elsewhere.url}/milvus_docs_1.2.x_en.zip", home=tmp_path / "home", store=store,
                      check_redirect=hops)
    assert internal.requests == [] and not list((tmp_path / "home" / "downloads").glob(".*.partial"))
    local = Redirecting((served / "milvus_docs_1.2.x_en.zip").as_uri())
    with pytest.raises(ReleaseError, match="not http"):  # with or without a check
        fetch_release(f"{local.url}/milvus_docs_1.2.x_en.zip", home=tmp_path / "home", store=store)
    for server in (internal, mirror, elsewhere, local):
        server.server.shutdown()


def test_a_redirect_loop_ends_with_a_clear_error(tmp_path):
    from tests.unit.ingest.test_source_policy import Redirecting

    loop = Redirecting("/again")
    with pytest.raises(ReleaseError, match="redirects"):
        fetch_release(f"{loop.url}/milvus_docs_1.2.x_en.zip", home=tmp_path, store=LocalStore(tmp_path / "o"),
                      check_redirect=Hops(loop.url))
    loop.server.shutdown()
    assert len(loop.requests) <= 6


def test_dead_server_is_transient(tmp_path):
    from docsrag.tasks.ingest.release import TransientFetchError

    with pytest.raises(TransientFetchError, match="download of http://127.0.0.1:9/x.zip failed"):
        fetch_release("http://127.0.0.1:9/x.zip", home=tmp_path, store=LocalStore(tmp_path / "o"), timeout_s=2)
