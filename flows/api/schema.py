"""The HTTP API's request and response bodies: the OpenAPI schema a product integrates from."""

from __future__ import annotations

from dataclasses import fields as dataclass_fields
from typing import Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model

from docsrag.tasks.core import records
from docsrag.tasks.core.records import MAX_CLIENT_KEY_CHARS, MAX_PRIORITY
from docsrag.tasks.index import served
from docsrag.tasks.queue import feedback
from docsrag.tasks.queue.feedback import MAX_COMMENT_CHARS
from docsrag.tasks.service import coverage
from docsrag.tasks.service.service import QuestionView, ServiceStats

Lang = Field(None, pattern=r"^[a-z]{2,3}$", description="ISO 639-1 code, e.g. 'ko'")
Status = Literal["pending", "claimed", "answered", "failed", "dead"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422, not silently ignored


class QuestionBase(Strict):
    question: str
    version: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                                description="docs version (e.g. 2.5.x); default the newest")
    lang: str | None = Field(None, pattern=r"^[a-z]{2,3}$",
                             description="answer from the localized docs in this language (default English)")
    answer_in: str | None = Field(None, pattern=r"^[a-z]{2,3}$",
                                  description="language to answer in (default: the question's)")
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY,
                          description="each level counts as five minutes of waiting")
    client_key: str | None = Field(None, min_length=1, max_length=MAX_CLIENT_KEY_CHARS,
                                   description="idempotency key, per token: the same token submitting it again "
                                               "gets its first question back")


def question_request(max_chars: int) -> type[QuestionBase]:
    """The request body with this deployment's question length cap in its schema."""
    return create_model("QuestionRequest", __base__=QuestionBase,
                        question=(str, Field(min_length=1, max_length=max_chars, pattern=r"\S",
                                             description="the question, in any language")))


class Submitted(BaseModel):
    id: int
    status: Status
    repeat_of: int | None = Field(None, description="answered at submit from this question's answer")


def _model_of(record: type, fields: tuple[str, ...], name: str | None = None, **types: object) -> type[BaseModel]:
    """A response model with the named fields of a record, their types read off the record (a
    property's from its return annotation; or given in ``types``, which may add fields): the API says
    what the pipeline stores and shows, declared once."""
    hints = _properties(record) | get_type_hints(record) | types
    chosen = (*fields, *(field for field in types if field not in fields))
    return create_model(name or record.__name__, **{field: (hints[field], ...) for field in chosen})


def _properties(record: type) -> dict[str, object]:
    return {name: get_type_hints(value.fget)["return"] for name, value in vars(record).items()
            if isinstance(value, property)}


def _fields(record: type, *left_out: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclass_fields(record) if f.name not in left_out)


Source = _model_of(records.Source, records.Source.CITED)
Hit = _model_of(records.Hit, records.Hit.SHOWN)


class Timings(BaseModel):
    created_at: str | None = Field(description="ISO 8601 with its UTC offset (+00:00)")
    answered_at: str | None = Field(description="ISO 8601 with its UTC offset (+00:00)")
    latency_ms: int | None = Field(None, description="the model's time to answer (0: answered from a repeat)")


TIMED = ("created_at", "answered_at", "latency_ms")  # a question's times, grouped under ``timings``
# A question as a reader sees it (the service's QuestionView), less its reasoning (never served)
# and with its times grouped; the statuses and sources typed as the API states them.
SHOWN_QUESTION = tuple(f.name for f in dataclass_fields(QuestionView) if f.name not in (*TIMED, "reasoning"))
Question = _model_of(QuestionView, SHOWN_QUESTION, "Question", status=Status, sources=list[Source],
                     usage=dict[str, int] | None, timings=Timings)


class SearchResults(BaseModel):
    query: str
    searched_as: str | None = None
    note: str | None = None  # "searched as asked: no LLM to translate" for a question not in English
    results: list[Hit]


class Versions(BaseModel):
    """What `docsrag versions --json` prints: per language of the docs, its versions and what each alias serves."""

    corpora: list[served.ServedCorpus]


class FeedbackRequest(Strict):
    helpful: bool
    comment: str | None = Field(None, max_length=MAX_COMMENT_CHARS)


class FeedbackRecorded(BaseModel):
    question_id: int
    helpful: bool


FeedbackTotals = _model_of(feedback.FeedbackTotals, _fields(feedback.FeedbackTotals))
CoverageGap = _model_of(coverage.CoverageGap, coverage.CoverageGap.SHOWN)
TranslationGaps = _model_of(coverage.TranslationGaps, _fields(coverage.TranslationGaps))
# The service's stats as ServiceStats serialises them: the queue's own figures flattened in first.
Stats = _model_of(ServiceStats, (*_fields(records.QueueStats), *_fields(ServiceStats, "queue")), "Stats",
                  **get_type_hints(records.QueueStats), feedback=FeedbackTotals, coverage_gaps=list[CoverageGap],
                  translation_gaps=TranslationGaps)


class Error(BaseModel):
    error: str = Field(description="the HTTP status's name")
    reason: str = Field(description="what was wrong, in a sentence")
