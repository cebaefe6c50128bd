"""Markdown -> Elements: front matter, includes, element kinds, best-effort parsing."""

import json
from pathlib import Path

from unstructured.documents.elements import CodeSnippet, ListItem, NarrativeText, Table, Title

from docsrag.tasks.ingest.markdown import html_text, parse_document, parse_release


def write(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


PAGE = """---
id: page.md
title: "The Page"
summary: What it is about.
deprecate: true
order: 3
---

# The Page

Intro with a [link](other.md) and **bold**.

## Install

- first step
- second step

| Option | Default |
|---|---|
| a | 1 |

```python
print("hi")
```

<div class="alert note">Mind the <b>gap</b>.</div>
"""


def test_front_matter_is_parsed():
    doc = parse_document("en/page.md", PAGE)
    assert doc.title == "The Page"
    assert doc.front_matter == {"id": "page.md", "title": "The Page", "summary": "What it is about.",
                                "deprecate": True, "order": 3}


def test_block_kinds_become_unstructured_elements():
    elements = parse_document("en/page.md", PAGE).elements
    kinds = [(type(e), e.text) for e in elements]
    assert kinds[0] == (Title, "The Page")
    assert (NarrativeText, "Intro with a [link](other.md) and **bold**.") in kinds
    assert (ListItem, "first step") in kinds and (ListItem, "second step") in kinds
    table = next(e for e in elements if isinstance(e, Table))
    assert table.text.splitlines()[0] == "| Option | Default |"
    code = next(e for e in elements if isinstance(e, CodeSnippet))
    assert code.text == 'print("hi")' and code.metadata.language == "python"
    assert (NarrativeText, "Mind the gap.") in kinds


def test_titles_carry_depth_and_elements_their_heading_path():
    elements = parse_document("en/page.md", PAGE).elements
    install = next(e for e in elements if e.text == "Install")
    assert install.metadata.category_depth == 1
    assert next(e for e in elements if e.text == "first step").metadata.heading_path == "The Page > Install"


def test_broken_front_matter_is_parsed_best_effort():
    notes: list[str] = []
    doc = parse_document("en/x.md", "---\ntitle: [unclosed\n---\n# Heading\n\nBody.\n", notes=notes)
    assert doc.title == "Heading"
    assert [e.text for e in doc.elements] == ["Heading", "Body."]
    assert "front matter is not valid YAML" in notes[0]


def test_unbalanced_fence_is_reported():
    notes: list[str] = []
    parse_document("en/x.md", "# T\n\n```bash\nls\n\nMore prose.\n", notes=notes)
    assert notes == ["unbalanced code fence at line 3: the rest of the file was read as code"]


def test_balanced_fence_at_end_of_file_is_not_reported():
    notes: list[str] = []
    parse_document("en/x.md", "# T\n\n```bash\nls\n```", notes=notes)
    assert notes == []


def test_release_expands_includes_and_skips_fragments(tmp_path):
    root = write(tmp_path, {
        "en/Variables.json": json.dumps({"milvus_release_version": "2.4.5", "auth": {"name": "Zilliz"}}),
        "en/fragments/cpu.md": "Needs AVX2 on {{var.auth.name}}.\n",
        "en/faq/ops.md": "---\ntitle: Ops\n---\n# Ops\n\n{{fragments/cpu.md}}\n\n{{tab}}\n\n"
                         "Install {{var.milvus_release_version}} and {{var.nope}}.\n",
    })
    parsed = parse_release(root)
    assert [d.path for d in parsed.documents] == ["en/faq/ops.md"]
    texts = [e.text for e in parsed.documents[0].elements]
    assert texts == ["Ops", "Needs AVX2 on Zilliz.", "Install 2.4.5 and {{var.nope}}."]
    assert parsed.warnings == [{"path": "en/faq/ops.md", "reason": "unknown variable {{var.nope}} left as is"}]


def test_missing_fragment_is_left_and_reported(tmp_path):
    root = write(tmp_path, {"en/a.md": "# A\n\n{{fragments/gone.md}}\n"})
    parsed = parse_release(root)
    assert parsed.documents[0].elements[1].text == "{{fragments/gone.md}}"
    assert "include {{fragments/gone.md}} not found" in parsed.warnings[0]["reason"]


def test_bad_utf8_and_empty_files_never_fail_the_run(tmp_path):
    root = write(tmp_path, {"en/bad.md": b"# Caf\xe9\n\nok\n", "en/empty.md": "---\ntitle: E\n---\n", "en/ok.md": "# Ok\n"})
    parsed = parse_release(root)
    assert [d.path for d in parsed.documents] == ["en/bad.md", "en/ok.md"]
    assert parsed.skipped == [{"path": "en/empty.md", "reason": "no text content"}]
    assert parsed.warnings == [{"path": "en/bad.md", "reason": "invalid UTF-8 at byte 5; undecodable bytes replaced"}]


def test_html_text_keeps_visible_text_only():
    assert html_text('<div class="x"><p>One &amp; two</p><script>x()</script><table><tr><td>a</td><td>b</td></tr></table></div>') \
        == "One & two\n| a | b"
