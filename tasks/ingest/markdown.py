"""Markdown files of a release -> documents of unstructured Elements.

``partition_md`` would download a language model at run time and takes ~40 s for a
release; markdown-it-py tokens map onto Elements directly in well under a second.
Element text keeps each block's markdown source (links, emphasis, table rows): that is
what a reader quotes and what the answer model should cite. HTML is reduced to its text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from markdown_it import MarkdownIt
from unstructured.documents.elements import (
    CodeSnippet,
    Element,
    ListItem,
    NarrativeText,
    Table,
    Title,
)

from docsrag.tasks.core.errors import DocsragError

if TYPE_CHECKING:
    from docsrag.tasks.core.settings import Settings

FRAGMENTS_DIR = "fragments"
_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?\n)?---[ \t]*(?:\n|\Z)", re.S)
_FRAGMENT = re.compile(r"\{\{\s*(fragments/[\w./-]+?\.md)\s*\}\}")
_VARIABLE = re.compile(r"\{\{\s*var\.([\w.]+)\s*\}\}")
_TAB_MARKER = re.compile(r"^[ \t]*\{\{\s*tab\s*\}\}[ \t]*$", re.M)  # language-tab marker, no content
_INLINE_TAG = re.compile(r"</?[A-Za-z][\w-]*(?:\s[^<>]*)?/?>")
_MAX_INCLUDE_DEPTH = 5
_MAX_FRONT_MATTER_BYTES = 64 * 1024
_MAX_VARIABLES_BYTES = 1024 * 1024

_markdown = MarkdownIt("commonmark").enable("table")


@dataclass
class Document:
    path: str  # relative to the release root, e.g. en/faq/product_faq.md
    title: str
    front_matter: dict
    elements: list[Element]


@dataclass(frozen=True)
class Budgets:
    """What one file may cost. The real docs stay far below (2.5.x: 96 KB, 776 elements at most);
    a file over budget is skipped with its reason, so a crafted file cannot take the release's memory."""

    file_bytes: int = 1024 * 1024
    document_bytes: int = 2 * 1024 * 1024  # after includes and variables are expanded
    document_elements: int = 10_000

    @classmethod
    def of(cls, settings: Settings) -> Budgets:
        return cls(settings.max_file_bytes, settings.max_document_bytes, settings.max_document_elements)


class OverBudget(DocsragError, ValueError):
    """A file would cost more than its budget."""


@dataclass
class ParsedRelease:
    documents: list[Document] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {path, reason}: not indexed
    warnings: list[dict] = field(default_factory=list)  # {path, reason}: indexed best-effort


def parse_release(root: Path, budgets: Budgets = Budgets()) -> ParsedRelease:
    """Parse every markdown document under ``root``; fragments only feed includes. One bad file
    never fails the release: whatever goes wrong with it becomes its skip reason."""
    result = ParsedRelease()
    context = _IncludeContext(root, _load_variables(root, result), budgets.document_bytes)
    for path in sorted(root.rglob("*.md")):
        rel = path.relative_to(root).as_posix()
        if FRAGMENTS_DIR in path.relative_to(root).parts[:-1]:
            continue
        notes: list[str] = []
        try:
            document = _parse_file(path, rel, context, notes, budgets)
        except Exception as exc:  # noqa: BLE001 - RecursionError, a parser bug, a budget: this file only
            result.skipped.append({"path": rel, "reason": _skip_reason(exc)})
            continue
        result.warnings.extend({"path": rel, "reason": note} for note in notes)
        if document.elements:
            result.documents.append(document)
        else:
            result.skipped.append({"path": rel, "reason": "no text content"})
    return result


def _parse_file(path: Path, rel: str, context: _IncludeContext, notes: list[str], budgets: Budgets) -> Document:
    size = path.stat().st_size
    if size > budgets.file_bytes:
        raise OverBudget(f"{size} bytes, over the limit of {budgets.file_bytes} (DOCSRAG_MAX_FILE_BYTES)")
    document = parse_document(rel, _read_text(path, notes), context, notes)
    if len(document.elements) > budgets.document_elements:
        raise OverBudget(f"{len(document.elements)} elements, over the limit of {budgets.document_elements} "
                         "(DOCSRAG_MAX_DOCUMENT_ELEMENTS)")
    return document


def _skip_reason(exc: Exception) -> str:
    if isinstance(exc, OverBudget):
        return f"over budget: {exc}"
    if isinstance(exc, RecursionError):
        return "nested too deeply to parse"
    return f"could not be parsed: {type(exc).__name__}: {_one_line(exc)[:300]}"


def parse_document(rel_path: str, text: str, context: _IncludeContext | None = None,
                   notes: list[str] | None = None) -> Document:
    notes = notes if notes is not None else []
    front_matter, body = split_front_matter(text, notes)
    if context is not None:
        body = context.expand(body, rel_path, notes)
    elements = markdown_elements(body, notes)
    title = str(front_matter.get("title") or _first_title(elements) or Path(rel_path).stem).strip()
    return Document(rel_path, title, front_matter, elements)


class _NoAliasLoader(yaml.SafeLoader):
    """Front matter never needs YAML anchors; refusing aliases stops "billion laughs" expansion
    (a 400-byte alias bomb took 17.5 GB once something walked it)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases are not allowed in front matter",
                                              event.start_mark)
        return super().compose_node(parent, index)


def split_front_matter(text: str, notes: list[str]) -> tuple[dict, str]:
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, text
    body = text[match.end():]
    if len(match.group(1) or "") > _MAX_FRONT_MATTER_BYTES:
        notes.append(f"front matter over {_MAX_FRONT_MATTER_BYTES} bytes, indexed without it")
        return {}, body
    try:
        data = yaml.load(match.group(1) or "", Loader=_NoAliasLoader) or {}
    except yaml.YAMLError as exc:
        notes.append(f"front matter is not valid YAML, indexed without it: {_one_line(exc)}")
        return {}, body
    if not isinstance(data, dict):
        notes.append("front matter is not a mapping, indexed without it")
        return {}, body
    return data, body


def _read_text(path: Path, notes: list[str]) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        notes.append(f"invalid UTF-8 at byte {exc.start}; undecodable bytes replaced")
        return raw.decode("utf-8", errors="replace")


def _load_variables(root: Path, result: ParsedRelease) -> dict:
    variables: dict = {}
    for path in sorted(root.rglob("Variables.json")):
        try:
            variables.update(_variables_file(path))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            result.warnings.append({"path": path.relative_to(root).as_posix(),
                                    "reason": f"variables file unusable, {{{{var.*}}}} left as is: "
                                              f"{_one_line(exc)[:200] or type(exc).__name__}"})
    return variables


def _variables_file(path: Path) -> dict:
    if path.stat().st_size > _MAX_VARIABLES_BYTES:
        raise ValueError(f"over {_MAX_VARIABLES_BYTES} bytes")
    data = json.loads(path.read_text("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


class _IncludeContext:
    """Expands ``{{fragments/x.md}}``, ``{{var.name}}`` and drops ``{{tab}}`` markers."""

    def __init__(self, root: Path, variables: dict, max_bytes: int = Budgets.document_bytes):
        self.root = root
        self.variables = variables
        self.max_bytes = max_bytes

    def expand(self, text: str, rel_path: str, notes: list[str], depth: int = 0) -> str:
        text = _TAB_MARKER.sub("", text)
        text = self._bounded_sub(_VARIABLE, lambda m: self._variable(m, notes), text)
        if depth >= _MAX_INCLUDE_DEPTH:
            notes.append(f"includes nested deeper than {_MAX_INCLUDE_DEPTH}, left unexpanded")
            return text
        return self._bounded_sub(_FRAGMENT, lambda m: self._fragment(m, rel_path, notes, depth), text)

    def _bounded_sub(self, pattern: re.Pattern, replace, text: str) -> str:
        """``pattern.sub`` that stops as soon as the result outgrows the document budget: a fragment
        including itself, or a long variable used a thousand times, never builds the whole text."""
        parts, size, last = [], 0, 0
        for match in pattern.finditer(text):
            piece = replace(match)
            parts += [text[last:match.start()], piece]
            size += match.start() - last + len(piece)
            last = match.end()
            if size > self.max_bytes:
                raise OverBudget(f"includes and variables expand it past {self.max_bytes} characters "
                                 "(DOCSRAG_MAX_DOCUMENT_BYTES)")
        parts.append(text[last:])
        return "".join(parts)

    def _variable(self, match: re.Match, notes: list[str]) -> str:
        value: object = self.variables
        for part in match.group(1).split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None or isinstance(value, (dict, list)):
            notes.append(f"unknown variable {match.group(0)} left as is")
            return match.group(0)
        return str(value)

    def _fragment(self, match: re.Match, rel_path: str, notes: list[str], depth: int) -> str:
        fragment = self._find(match.group(1), rel_path)
        if fragment is None:
            notes.append(f"include {match.group(0)} not found, left as is")
            return match.group(0)
        _, body = split_front_matter(_read_text(fragment, notes), notes)
        return self.expand(body, rel_path, notes, depth + 1)

    def _find(self, name: str, rel_path: str) -> Path | None:
        # Fragments live beside the language root (en/fragments); look upward from the doc.
        for parent in Path(rel_path).parents:
            candidate = (self.root / parent / name).resolve()
            if candidate.is_file() and candidate.is_relative_to(self.root.resolve()):
                return candidate
        return None


def markdown_elements(body: str, notes: list[str]) -> list[Element]:
    """Map markdown-it block tokens to Elements, each carrying its heading path."""
    lines = body.splitlines()
    tokens = _markdown.parse(body)
    if any(token.level >= _markdown.options.maxNesting - 1 for token in tokens):
        notes.append(f"blocks nested {_markdown.options.maxNesting} deep: text nested deeper is not indexed")
    headings: list[tuple[int, str]] = []
    elements: list[Element] = []
    list_depth = 0
    skip_until = -1
    for i, token in enumerate(tokens):
        if i <= skip_until:
            continue
        kind = token.type
        element: Element | None = None
        if kind == "heading_open":
            level = int(token.tag[1])
            text = _inline_text(tokens[i + 1].content)
            headings = [h for h in headings if h[0] < level] + [(level, text)]
            element = Title(text) if text else None
            if element is not None:
                element.metadata.category_depth = level - 1
        elif kind in ("bullet_list_open", "ordered_list_open"):
            list_depth += 1
        elif kind in ("bullet_list_close", "ordered_list_close"):
            list_depth -= 1
        elif kind == "paragraph_open":
            text = _inline_text(tokens[i + 1].content)
            element = (ListItem if list_depth else NarrativeText)(text) if text else None
        elif kind in ("fence", "code_block"):
            element = _code(token, lines, notes)
        elif kind == "table_open":
            skip_until = next(j for j in range(i, len(tokens)) if tokens[j].type == "table_close")
            start, end = token.map
            element = Table("\n".join(lines[start:end]).strip())
        elif kind == "html_block":
            text = html_text(token.content)
            element = NarrativeText(text) if text else None
        if element is not None:
            element.metadata.heading_path = " > ".join(h[1] for h in headings)
            elements.append(element)
    return elements


def _code(token, lines: list[str], notes: list[str]) -> Element | None:
    text = token.content.rstrip("\n")
    if token.type == "fence" and token.map and token.map[1] >= len(lines):
        closing = lines[-1].strip() if lines else ""
        if token.map[1] - token.map[0] < 2 or not closing.startswith(token.markup):
            notes.append(f"unbalanced code fence at line {token.map[0] + 1}: the rest of the file was read as code")
    if not text.strip():
        return None
    element = CodeSnippet(text)
    element.metadata.language = token.info.split()[0] if token.info.strip() else ""
    return element


def _inline_text(source: str) -> str:
    return _INLINE_TAG.sub("", source).strip()


def _first_title(elements: list[Element]) -> str | None:
    return next((e.text for e in elements if isinstance(e, Title)), None)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


class _TextOfHtml(HTMLParser):
    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "pre"}
    _HIDDEN = {"script", "style"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        self.hidden += tag in self._HIDDEN
        if tag in self._BLOCK:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" | ")

    def handle_endtag(self, tag):
        self.hidden -= tag in self._HIDDEN and self.hidden > 0
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)


def html_text(html: str) -> str:
    """Visible text of an HTML block, one line per block element."""
    parser = _TextOfHtml()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)
