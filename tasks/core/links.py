"""Where a cited passage is published: the URL of its page on the docs site, deep-linked to its heading.

``DOCSRAG_DOCS_URL`` is a template with these placeholders:

- ``{version}``: the docs version as docsrag names it, from the release (``2.4.x``); milvus.io writes
  it ``v2.4.x``, hence its template ``https://milvus.io/docs/v{version}/{doc_id}``;
- ``{doc_id}``: the page's file name, the last part of its path in the release
  (``en/faq/product_faq.md`` -> ``product_faq.md``): milvus.io serves every page of a version under
  one folder, by file name;
- ``{doc_path}``: the whole path in the release (``en/faq/product_faq.md``), for a site that keeps
  the release's folders.

The heading's anchor follows the site's own rule (``anchor``). An empty template: no URL.
"""

from __future__ import annotations

import re
import string
from urllib.parse import quote

PLACEHOLDERS = ("version", "doc_id", "doc_path")
HEADING_SEPARATOR = " > "  # a chunk's heading is its path of headings (tasks/ingest/markdown.py)
_DROPPED = re.compile(r"[^\w\s-]")  # punctuation and symbols; letters and digits of any script stay


def anchor(heading: str) -> str:
    """The ``id`` the docs site gives a heading: spaces to '-', punctuation dropped (milvus.io:
    "What Makes GPT-oss Special and Why You Should Care?" -> ``What-Makes-GPT-oss-Special-and-Why-You-Should-Care``).
    Of a heading path, the last heading."""
    last = heading.rsplit(HEADING_SEPARATOR, 1)[-1]
    return re.sub(r"\s+", "-", _DROPPED.sub("", last).strip())


def page_url(template: str, version: str, doc_path: str, heading: str, title: str = "") -> str:
    """The page of ``doc_path`` in ``version``, at the heading's anchor ("" when the template is
    empty). A chunk of the page's top (its heading is the title alone) links to the page itself."""
    if not template:
        return ""
    values = {"version": quote(version), "doc_id": quote(doc_path.rsplit("/", 1)[-1]), "doc_path": quote(doc_path)}
    url = template.format(**values)
    below_title = HEADING_SEPARATOR in heading or (heading and heading != title)
    return f"{url}#{quote(anchor(heading), safe='-_')}" if below_title and anchor(heading) else url


def template_problem(template: str) -> str | None:
    """Why a DOCSRAG_DOCS_URL cannot be used, or None: it must be an http(s) URL whose only
    placeholders are those above (a link any reader may click: never javascript: or data:)."""
    if not template:
        return None
    if not re.match(r"^https?://[^/\s{}]+", template):
        return "must be an http:// or https:// URL (or empty: no links)"
    try:
        named = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as exc:
        return f"is not a template: {exc}"
    unknown = sorted(named - set(PLACEHOLDERS))
    if unknown:
        return f"has unknown placeholders {unknown}: use {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
    return None
