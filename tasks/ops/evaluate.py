"""Retrieval quality against a gold set: doc-level recall@k, MRR@10, "not covered" checks.

Scoring is doc-level: the rank of the first gold document among the distinct documents
retrieved, in order. A gold list may name a fragment beside the page that includes it;
either counts. A question with no gold documents should be answered "not covered".
A gold line's optional ``lang`` (ISO 639-1, English when absent) splits the figures by language.
"""

from __future__ import annotations

import json
from pathlib import Path

from docsrag.tasks.core.records import Hit

KS = (1, 3, 5, 10)


def load_gold(path: Path) -> list[dict]:
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            items.append({"id": item.get("id", f"line{n}"), "question": item["question"],
                          "lang": str(item.get("lang") or "en"),
                          "gold_sources": list(item.get("gold_sources") or []),
                          "must_contain_any": list(item.get("must_contain_any") or [])})
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a gold item with a question ({exc})") from None
    if not items:
        raise ValueError(f"{path} holds no questions")
    return items


def first_gold_rank(gold: list[str], hits: list[Hit]) -> int | None:
    """1-based rank of the first gold doc among the distinct docs retrieved."""
    distinct: list[str] = []
    for hit in hits:
        if hit.doc_path not in distinct:
            distinct.append(hit.doc_path)
    return next((rank for rank, doc in enumerate(distinct, 1) if doc in gold), None)


def score(item: dict, hits: list[Hit], not_covered: bool) -> dict:
    """One question: rank of the first gold doc, gold text found, and whether the system would
    say "not covered" (decided by the caller, as the answer flow decides it)."""
    text = "\n".join(h.text for h in hits)
    best = max((h.relevance for h in hits), default=-1.0)
    return {
        "id": item["id"], "question": item["question"], "lang": item.get("lang", "en"),
        "answerable": bool(item["gold_sources"]),
        "expected": ", ".join(item["gold_sources"]) or "(not covered)",
        "rank": first_gold_rank(item["gold_sources"], hits) if item["gold_sources"] else None,
        "contains": any(s in text for s in item["must_contain_any"]) if item["must_contain_any"] else None,
        "not_covered": not_covered, "best_relevance": round(best, 4),
        "retrieved": ", ".join(dict.fromkeys(h.doc_path for h in hits[:5])),
    }


def aggregate(rows: list[dict]) -> dict:
    answerable = [r for r in rows if r["answerable"]]
    unanswerable = [r for r in rows if not r["answerable"]]
    n = len(answerable) or 1
    figures = {f"recall@{k}": round(sum(1 for r in answerable if r["rank"] and r["rank"] <= k) / n, 4) for k in KS}
    figures["mrr@10"] = round(sum(1 / r["rank"] for r in answerable if r["rank"] and r["rank"] <= 10) / n, 4)
    with_strings = [r for r in answerable if r["contains"] is not None]
    figures["contains"] = round(sum(r["contains"] for r in with_strings) / (len(with_strings) or 1), 4)
    figures["not_covered_unanswerable"] = f"{sum(r['not_covered'] for r in unanswerable)}/{len(unanswerable)}"
    figures["not_covered_answerable"] = f"{sum(r['not_covered'] for r in answerable)}/{len(answerable)}"
    figures["questions"] = len(rows)
    return figures


def by_language(rows: list[dict]) -> dict[str, dict]:
    """The same figures for each language's questions, English first, then by code."""
    langs = sorted({r["lang"] for r in rows}, key=lambda lang: (lang != "en", lang))
    return {lang: aggregate([r for r in rows if r["lang"] == lang]) for lang in langs}
