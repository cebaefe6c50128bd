"""Untrusted text (doc paths, headings, skip reasons, questions, LLM output and errors) made safe
for where it is shown: a terminal, a markdown artifact in Prefect's UI, a prompt's source fence.

One function per place, so every caller escapes the same way:

- ``for_terminal``: C0 and C1 control characters (ESC sequences, CSI ``\\x9b``, OSC ``\\x9d`` that
  sets titles and hyperlinks) and bidi overrides (text that reads in another order than it is
  stored, "Trojan Source") are printed as their code; newlines and tabs stay;
- ``for_markdown``: one line of literal text in a markdown artifact: no link, image, HTML, code
  span or table cell of its own (a newline or ``|`` would forge a row);
- ``source_tags_normalized``: look-alikes of ``<source`` / ``</source`` (spaces, full-width or
  other angle brackets and slashes, full-width letters) rewritten to the ASCII tag, so the fence
  escapes them as it escapes the real one.
"""

from __future__ import annotations

import html
import re
import unicodedata

# C0 but \t and \n, DEL, C1; bidi marks, embeddings, overrides and isolates (U+061C, U+200E/F,
# U+202A-E, U+2066-9).
_TERMINAL_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# Every ASCII punctuation character CommonMark lets a backslash escape that starts markup here.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~:/=])")
_LESS_THAN = "<\uff1c\ufe64\u2329\u3008\u27e8\u2039\u02c2\u276e"  # < ＜ ﹤ 〈 〈 ⟨ ‹ ˂ ❮
_SLASH = "/\uff0f\u2044\u2215\u29f8\u2571"  # / ／ ⁄ ∕ ⧸ ╱
_GAP = r"[\s\u200b-\u200d\u2060\ufeff]*"  # spaces, and the invisible ones a reader skips
_TAG_LIKE = re.compile(rf"[{_LESS_THAN}]({_GAP}[{_SLASH}]?{_GAP})(\w{{6}})")


def for_terminal(text: str) -> str:
    """``text`` safe to print: unsafe characters shown as ``\\xNN`` or ``\\uNNNN``."""
    return _TERMINAL_UNSAFE.sub(_code, str(text))


def for_markdown(text: str, limit: int = 500) -> str:
    """``text`` as one line of literal text in markdown, cut to ``limit`` characters first."""
    line = " ".join(for_terminal(str(text)[:limit]).split())  # no newline: a row stays one row
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(line, quote=False))


def source_tags_normalized(text: str) -> str:
    """Every tag that a reader (the model) could take for ``<source`` or ``</source``, written
    as that ASCII tag; other text unchanged."""
    return _TAG_LIKE.sub(_ascii_tag, text)


def _ascii_tag(match: re.Match) -> str:
    word = unicodedata.normalize("NFKC", match.group(2))
    if word.casefold() != "source":
        return match.group(0)
    slash = "/" if any(c in _SLASH for c in match.group(1)) else ""
    return f"<{slash}{word}"


def _code(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"
