"""Measure retrieval (and optionally answers) against a gold set; runs after each ingest."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from docsrag.tasks.answer.generate import Generator, numbered_sources, searched_as
from docsrag.tasks.answer.retrieve import Retriever, covered
from docsrag.tasks.core import language
from docsrag.tasks.core.records import Hit
from docsrag.tasks.core.settings import Settings, settings_for_run
from docsrag.tasks.core.summaries import EvaluationSummary
from docsrag.tasks.embed import embedding
from docsrag.tasks.ops.evaluate import aggregate, by_language, load_gold, score


@task(name="retrieve-gold", cache_policy=NONE, persist_result=False)
def retrieve_all(settings: Settings, choice: embedding.EmbedderChoice, questions: list[str], k: int,
                 version: str | None, docs_lang: str | None) -> list[list[Hit]]:
    """As the answer flow retrieves: questions not in English searched in their translation."""
    return Retriever(settings, choice).search(searched_as(settings, questions), k, version, docs_lang)


@task(name="answer-gold", cache_policy=NONE, persist_result=False)
def answer_all(settings: Settings, items: list[dict], hits: list[list[Hit]]) -> list[dict]:
    """Ask the model with the retrieved sources, in the language the answer flow would detect;
    does the answer cite a gold document?"""
    sources = [numbered_sources(h[: settings.top_k]) for h in hits]
    asked = [(i["question"], s, language.detect(i["question"])) for i, s in zip(items, sources)]
    results = asyncio.run(Generator(settings).answer_all(asked))
    checked = []
    for item, srcs, result in zip(items, sources, results):
        cited = [] if isinstance(result, Exception) else [srcs[n - 1].doc_path for n in result.cited]
        checked.append({"id": item["id"], "lang": item["lang"],
                        "cites_gold": any(doc in item["gold_sources"] for doc in cited),
                        "error": str(result) if isinstance(result, Exception) else None})
    return checked


@flow(name="evaluate-retrieval")
def evaluate_retrieval(gold: str | None = None, k: int = 10, version: str | None = None,
                       answers: bool = False, collection: str | None = None,
                       docs_lang: str | None = None) -> EvaluationSummary:
    """Doc-level recall@1/3/5/10 and MRR@10 of the index served as ``collection`` (default
    DOCSRAG_COLLECTION) on a gold file (JSON lines; default DOCSRAG_EVAL_GOLD)."""
    settings = settings_for_run(collection=collection)
    gold = gold or settings.eval_gold
    if not gold:
        # The deployment runs after every ingest; without a gold set that is a no-op, not a failure.
        reason = "no gold set: pass gold= or set DOCSRAG_EVAL_GOLD on the worker to a JSON lines file"
        get_run_logger().warning("Skipped: %s", reason)
        return EvaluationSummary(skipped=reason)
    items = load_gold(Path(gold))
    choice = embedding.resolve(settings)  # the embedders the served index is searched with, resolved once
    hits = retrieve_all(settings, choice, [i["question"] for i in items], k, version, docs_lang)
    rows = [score(item, h, not covered(h, settings.min_relevance, settings.weak_relevance))
            for item, h in zip(items, hits)]
    figures, languages = aggregate(rows), by_language(rows)
    if answers:
        answerable = [(i, h) for i, h in zip(items, hits) if i["gold_sources"]]
        checked = answer_all(settings, [i for i, _ in answerable], [h for _, h in answerable])
        figures.update(_answer_figures(checked))
        for lang, part in languages.items():
            part.update(_answer_figures([c for c in checked if c["lang"] == lang]))
    figures["by_language"] = languages
    _report(figures, rows, gold)
    get_run_logger().info("recall@5 %s, MRR@10 %s on %s questions", figures["recall@5"], figures["mrr@10"],
                          figures["questions"])
    return EvaluationSummary(gold, {k: v for k, v in figures.items() if k != "by_language"}, languages)


def _answer_figures(checked: list[dict]) -> dict:
    return {"answers_citing_gold": round(sum(c["cites_gold"] for c in checked) / (len(checked) or 1), 4),
            "answer_errors": sum(c["error"] is not None for c in checked)}


def _report(figures: dict, rows: list[dict], gold: str) -> None:
    """One column for all questions, one per language; the misses say which language each was in."""
    languages = figures["by_language"]
    metrics = [name for name in figures if name != "by_language"]
    lines = [f"# Retrieval on `{gold}`", "", "| metric | all | " + " | ".join(languages) + " |",
             "|---|---|" + "---|" * len(languages),
             *(f"| {name} | {figures[name]} | " + " | ".join(str(part.get(name, "–")) for part in languages.values())
               + " |" for name in metrics)]
    create_markdown_artifact(markdown="\n".join(lines), key="retrieval-evaluation",
                             description="Doc-level retrieval quality on the gold set, by language")
    misses = [{"question": r["question"], "lang": r["lang"], "expected": r["expected"], "rank": r["rank"],
               "retrieved": r["retrieved"]}
              for r in rows if (r["answerable"] and r["rank"] != 1) or (not r["answerable"] and not r["not_covered"])]
    create_table_artifact(table=misses or [{"question": "(no misses)"}], key="retrieval-misses",
                          description="Questions whose gold document was not ranked first")
