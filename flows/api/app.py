"""``docsrag api``: the questions API and the page to ask on, over the queue and the index.

Every route under /v1 goes through the guard (``docsrag.tasks.service.guard``: bearer tokens, or loopback
only without them; a rate limit per caller) and answers a 4xx as JSON ``{error, reason}``. A
caller token sees only the questions it asked (another's is a 404, as if there were none); an
operator token, or the loopback user, sees every question and the stats. The work is the questions
service's (``docsrag.tasks.service.service``), the same the CLI calls; this module only speaks HTTP.
"""



import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from docsrag.flows.api import schema
from docsrag.flows.api.worker import AnswerHere
from docsrag.tasks.core.settings import Settings
from docsrag.tasks.index.store import StoreError
from docsrag.tasks.queue.questions import QuestionError
from docsrag.tasks.service.guard import Caller, Guard, Refused
from docsrag.tasks.service.guard import Request as Asked
from docsrag.tasks.service.service import NotServed, QuestionView, Service, UnknownQuestion

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
QuestionId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="the id POST /v1/questions returned")]
SERVED_TTL_S = 2.0  # a new collection served makes repeats stale within this
_ERRORS = {status: {"model": schema.Error, "description": HTTPStatus(status).phrase}
           for status in (401, 403, 413, 422, 429, 503)}
_UNPARSED = "There was an error parsing the body"
_NOT_FOUND = {404: {"model": schema.Error, "description": "no such question, or no docs served as asked"}}


def create_app(settings: Settings, service: Service | None = None, answer_here: bool = False) -> FastAPI:
    """``answer_here``: this process also answers the queue (flows/api/worker.py; Milvus Lite)."""
    service = service or Service(settings, announce=_announcer(), served_ttl_s=SERVED_TTL_S)
    worker = AnswerHere(service) if answer_here else None
    guard = Guard(settings)
    bearer = HTTPBearer(auto_error=False, description="a token of DOCSRAG_API_TOKENS (sees its own questions) or "
                                                      "DOCSRAG_API_OPERATOR_TOKENS (sees all, and the stats); "
                                                      "none set: loopback only")

    def admitted(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
        headers = request.headers
        return guard.admit(Asked(request.method, headers.get("authorization"),
                                 request.client.host if request.client else None, headers.get("host"),
                                 headers.get("origin")))

    Admitted = Annotated[Caller, Depends(admitted)]  # FastAPI runs it once per request, shared with the router's
    max_wait_s = settings.api_max_wait_s

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if worker:
            worker.start()
        yield
        if worker:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="docsrag questions API", version="1", lifespan=lifespan,
                  description="Ask questions about the served docs; answers cite numbered doc paths.")
    app.add_middleware(BodyCap, limit=settings.api_max_body_bytes)
    _add_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(admitted)], responses=_ERRORS)
    QuestionRequest = schema.question_request(settings.max_question_chars)

    @v1.post("/questions", status_code=202, response_model=schema.Submitted, responses=_NOT_FOUND,
             tags=["questions"])
    def submit(body: Annotated[QuestionRequest, Body()], caller: Admitted) -> schema.Submitted:
        """Queue a question, owned by the token that asks it. A repeat of one already answered from
        the served docs is answered at once; a version or language nothing serves is a 404 at once,
        naming what is served."""
        done = service.submit(body.question, version=body.version, docs_lang=body.lang, answer_in=body.answer_in,
                              priority=body.priority, client_key=body.client_key, owner=caller.owner)
        if worker and done.status == "pending":
            worker.wake()
        return schema.Submitted(id=done.id, status=done.status, repeat_of=done.repeat_of)

    @v1.get("/questions/{question_id}", response_model=schema.Question, responses=_NOT_FOUND, tags=["questions"])
    async def show(question_id: QuestionId, caller: Admitted,
                   wait: Annotated[float, Query(ge=0, allow_inf_nan=False, description=(
                       "seconds to wait for the answer (long-poll); a longer wait than the server's limit "
                       f"(DOCSRAG_API_MAX_WAIT_S, {max_wait_s:g} here) is cut to it"))] = 0,
                   ) -> schema.Question:
        """The question (the caller's own; an operator's: any), its status and, once answered, the
        answer with its numbered sources."""
        return _question(await service.wait_async(question_id, min(wait, max_wait_s), owner=caller.sees))

    @v1.post("/questions/{question_id}/feedback", status_code=201, response_model=schema.FeedbackRecorded,
              responses=_NOT_FOUND, tags=["questions"])
    def feedback(question_id: QuestionId, body: schema.FeedbackRequest, caller: Admitted) -> schema.FeedbackRecorded:
        """Was the answer helpful? (The asker's, or an operator's, say: one vote per question and
        token, a later vote replacing the earlier.) Not-helpful answers are listed among the coverage gaps."""
        service.add_feedback(question_id, body.helpful, body.comment, owner=caller.sees, voter=caller.owner)
        return schema.FeedbackRecorded(question_id=question_id, helpful=body.helpful)

    @v1.get("/search", response_model=schema.SearchResults, responses=_NOT_FOUND, tags=["index"])
    def search(q: Annotated[str, Query(min_length=1, max_length=settings.max_question_chars, pattern=r"\S")],
               k: Annotated[int, Query(ge=1, le=50)] = 5,
               version: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] = None,
               lang: Annotated[str | None, Query(pattern=r"^[a-z]{2,3}$")] = None) -> schema.SearchResults:
        """The hybrid search results `docsrag search` prints."""
        return schema.SearchResults(**service.search(q, k, version, lang).to_dict())

    @v1.get("/versions", response_model=schema.Versions, tags=["index"])
    def versions() -> schema.Versions:
        """What is served, per language of the docs: each version's alias, collection, rows and build
        time, what the main alias serves, and the rollback targets (`docsrag versions --json`)."""
        return schema.Versions(corpora=service.versions())

    @v1.get("/stats", response_model=schema.Stats, tags=["operations"])
    def stats(caller: Admitted) -> schema.Stats:
        """The queue's counts and pace, repeats answered, feedback totals and coverage gaps (all
        callers' questions: for operator tokens only)."""
        if not caller.operator:
            raise Refused(403, "the stats and coverage gaps are for the operator's tokens (DOCSRAG_API_OPERATOR_TOKENS)")
        return schema.Stats(**service.stats().to_dict())

    app.include_router(v1)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        """For the kubelet and compose: the process serves (it says nothing else, so it needs no token)."""
        return {"status": "ok"}

    page_html = PAGE.read_text(encoding="utf-8")
    page_headers = _page_headers(page_html)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        """The page is static (no data in it, outside the guard); its script sends the reader's token."""
        return HTMLResponse(page_html, headers=page_headers)

    return app


def _page_headers(html: str) -> dict[str, str]:
    """A second line of defence behind escaping: only the page's own script runs (its hash), it
    talks to this origin only, and no other site may frame it."""
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; connect-src 'self'; "
              "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def _question(view: QuestionView) -> schema.Question:
    shown = view.to_dict()
    timings = schema.Timings(created_at=view.created_at, answered_at=view.answered_at, latency_ms=view.latency_ms)
    return schema.Question(**{k: v for k, v in shown.items() if k not in ("created_at", "answered_at", "latency_ms")},
                           timings=timings)


def _error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": HTTPStatus(status).phrase, "reason": reason}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Refused)
    async def refused(request, exc: Refused):
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else (
            {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
        return _error(exc.status, exc.reason, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return _error(422, "; ".join(_described(error) for error in exc.errors()[:5]))

    @app.exception_handler(QuestionError)
    async def bad_question(request, exc: QuestionError):
        return _error(422, str(exc))

    @app.exception_handler(UnknownQuestion)
    async def unknown(request, exc: UnknownQuestion):
        return _error(404, str(exc))

    @app.exception_handler(NotServed)
    async def not_served(request, exc: NotServed):
        return _error(404, str(exc))

    @app.exception_handler(StoreError)
    async def index_unavailable(request, exc: StoreError):
        # The detail names hosts and files: it goes to the operator's log, not to the caller.
        log.error("the index is unavailable: %s", exc)
        return _error(503, "the docs index is unavailable; try again later", {"Retry-After": "30"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == _UNPARSED:  # FastAPI's answer to a body not even UTF-8
            return _error(422, "the body is not valid JSON (UTF-8)")
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


def _described(error: dict) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()))
    if error.get("type") == "json_invalid":
        return "the body is not valid JSON"
    return f"{where}: {error.get('msg', 'invalid')}"


class BodyCap:
    """Refuses a body over ``limit`` bytes (413): at once when Content-Length says so, else as it arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            body = json.dumps({"error": "Content Too Large",
                               "reason": f"the body is over {self.limit} bytes (DOCSRAG_API_MAX_BODY_BYTES)"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            return await send({"type": "http.response.body", "body": body})
        received = 0

        async def capped():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # FastAPI re-raises an HTTPException met while reading the body
                raise HTTPException(413, f"the body is over {self.limit} bytes (DOCSRAG_API_MAX_BODY_BYTES)")
            return message

        return await self.app(scope, capped, send)


def _announcer():
    """With a Prefect server configured, a new question is announced as `docsrag ask` announces it."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return None
    from docsrag.flows.answer import announce_question

    return announce_question


def serve(settings: Settings, host: str, port: int, answer_here: bool = False) -> None:
    import uvicorn

    uvicorn.run(create_app(settings, answer_here=answer_here), host=host, port=port, log_level="info", access_log=False,
                proxy_headers=False)  # the client address decides loopback access: never taken from a header
