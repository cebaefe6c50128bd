"""The README a person reads in minutes, and the docs site it links to: built with mkdocs --strict,
so a broken link or a page missing from the navigation fails the suite; the layout page true to the code."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

README = ROOT / "README.md"
QUIET = {"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)}


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=120, env=QUIET, check=False)


def test_the_docs_site_builds_strict(tmp_path):
    built = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "site" / "layout" / "index.html").exists()


def test_a_broken_link_fails_the_build(tmp_path):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / "concepts.md").open("a") as page:
        page.write("\nSee [the missing page](missing.md).\n")
    built = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0 and "missing.md" in built.stderr


def test_the_readme_is_read_in_minutes_and_links_the_site():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) < 12_000, f"README is {len(text.encode())} bytes"
    for needed in ("make run", "make test", "docsrag.testing.llm_emulator", "Ollama", "vLLM", "DOCSRAG_DOCS_URL"):
        assert needed in text, needed
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).exists(), link
    assert "midway" not in text and "issue 2" not in text, "no development log"


def test_the_layout_page_names_every_module_in_its_room():
    layout = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\|\s*(\w*)\s*\|\s*`([\w/]+\.py)`\s*\|", layout, re.MULTILINE)
    room, listed = "", set()
    for named_room, module in rows:
        room = named_room or room
        listed.add(f"{room}/{module}")
    modules = {f"{p.parent.name}/{p.name}" for p in (ROOT / "tasks").glob("*/*.py") if p.name != "__init__.py"}
    assert modules == listed, f"missing: {sorted(modules - listed)}, gone: {sorted(listed - modules)}"

    flows_table = layout.split("## `flows/`", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\|\s*`([\w/]+\.(?:py|html))`\s*\|", flows_table, re.MULTILINE))
    files = {str(p.relative_to(ROOT / "flows")) for p in (ROOT / "flows").rglob("*") if p.suffix in (".py", ".html")}
    files = {f for f in files if not f.endswith("__init__.py") or f == "cli/__init__.py"}
    assert files == listed, f"flows missing: {sorted(files - listed)}, gone: {sorted(listed - files)}"
