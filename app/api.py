"""`llmrec api`: recommendations over HTTP for the version behind the registry's `champion`
alias (FastAPI app factory + uvicorn runner).

Every route but /healthz needs an API key (X-API-Key or Authorization: Bearer); admin routes
need an admin key. Each request takes the served model once, at its start, so it finishes on
that model and its response names exactly one version, whatever the alias does meanwhile.
Errors are JSON bodies {"error": {"status", "message", "problems": [{field, rule, message}]}},
never a traceback. Metrics are Prometheus, merged across worker processes when
PROMETHEUS_MULTIPROC_DIR is set (the runner sets it before prometheus_client is imported).
"""

# No `from __future__ import annotations`: FastAPI reads the request models defined inside
# create_app from their annotations at run time.

import gc
import logging
import os
import time
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmrec.config import ApiConfig, Home
from llmrec.keys import KeyStore, keys_file
from llmrec.serving import POPULAR, PROFILE, ChampionFollower, ReloadOutcome, ServedModel

log = logging.getLogger("llmrec.api")

CONFIG_ENV = "LLMREC_API_CONFIG"
MAX_K = 1000
# auto_error=False: the check below answers 401 with its own JSON body for every case.
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False)
BEARER = HTTPBearer(auto_error=False)


class Metrics:
    """The service's Prometheus series, created once per process after the multiprocess
    directory (if any) is in the environment."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        labels = ["route", "method", "status"]
        self.requests = Counter("llmrec_api_requests_total", "Requests answered", labels)
        self.latency = Histogram("llmrec_api_request_seconds", "Time to answer a request", labels,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))
        self.served_version = Gauge("llmrec_api_served_version", "Model version served (0: none yet)",
                                    multiprocess_mode="all")
        self.reload_failing = Gauge("llmrec_api_reload_failing", "1 while the alias names a version that failed to "
                                    "load and an older one still serves", multiprocess_mode="all")
        self.reloads = Counter("llmrec_api_reloads_total", "Model loads after an alias or catalog change", ["outcome"])
        self.cold_start_users = Counter("llmrec_api_cold_start_users_total",
                                        "Users answered without rating history", ["scored_by"])
        self.cold_start_items = Gauge("llmrec_api_cold_start_items", "Served items scored from their text (arrived "
                                      "after the served version was trained)", multiprocess_mode="all")

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

    def record_outcome(self, outcome: ReloadOutcome, follower: ChampionFollower) -> None:
        if outcome.status in ("loaded", "failed"):
            self.reloads.labels(outcome.status).inc()
        current = follower.current
        self.served_version.set(int(current.version) if current and current.version.isdigit() else 0)
        self.reload_failing.set(1 if follower.last_error else 0)
        self.cold_start_items.set(current.cold_start_items if current else 0)


@lru_cache(maxsize=1)
def metrics() -> Metrics:
    return Metrics()


def after_check(outcome: ReloadOutcome, follower: ChampionFollower) -> None:
    """Metrics of every alias check; after a load, the heap (libraries and the new model,
    millions of objects) is moved out of the garbage collector's reach: a full collection
    over it stalls every request in flight for 100 ms and more, at random."""
    metrics().record_outcome(outcome, follower)
    if outcome.status == "loaded":
        gc.collect()
        gc.freeze()


class MetricsMiddleware:
    """Counts and times every HTTP request by route template (not raw path, so user ids do
    not become label values), method and status."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            labels = (getattr(route, "path", "unmatched"), scope["method"], str(status["code"]))
            m = metrics()
            m.requests.labels(*labels).inc()
            m.latency.labels(*labels).observe(time.perf_counter() - start)


def error_body(status: int, message: str, problems: list[dict] | None = None) -> dict:
    body = {"status": status, "message": message}
    if problems:
        body["problems"] = problems
    return {"error": body}


class Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=256)
    item_id: str = Field(min_length=1, max_length=256)


class ItemScore(BaseModel):
    item_id: str
    score: float


class UserRecommendations(BaseModel):
    user_id: str
    scored_by: str = Field(description="history (known user), profile (scored from the profile text) or popular")
    items: list[ItemScore]


class RecommendationsResponse(UserRecommendations):
    version: str


class BatchRecommendationsResponse(BaseModel):
    version: str
    results: list[UserRecommendations]


class ScoresResponse(BaseModel):
    version: str
    scores: list[float] = Field(description="One score per pair, in request order")


def create_app(config: ApiConfig, follower: ChampionFollower | None = None) -> FastAPI:
    home = Home(config.home)
    keys = KeyStore(keys_file(home.root))
    if follower is None:
        follower = ChampionFollower(home, config.registered_model, config.compression, on_outcome=after_check)
    elif follower.on_outcome is None:
        follower.on_outcome = after_check

    class BatchRecommendationsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user_ids: list[str] = Field(min_length=1, max_length=config.max_users)
        k: int = Field(10, ge=1, le=MAX_K)
        exclude_rated: bool = True

    class ScoresRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        pairs: list[Pair] = Field(min_length=1, max_length=config.max_pairs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not keys.list():
            log.warning("no API keys in %s: every route but /healthz answers 401; create one with "
                        "`llmrec api-key create --name NAME --scope read`", keys.path)
        follower.start(config.poll_seconds)
        yield
        follower.stop()

    # The documentation routes need a key like every route but /healthz, so they are added
    # below; /docs embeds the schema, since the browser would not send a key for a second fetch.
    app = FastAPI(title="llmrec recommendations", version="1", lifespan=lifespan, docs_url=None, openapi_url=None,
                  description="Top-K recommendations and scores from the registry's champion version.")
    app.state.follower = follower
    app.add_middleware(MetricsMiddleware)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        problems = [{"field": ".".join(str(part) for part in e["loc"]), "rule": e["type"], "message": e["msg"]}
                    for e in error.errors()]
        return JSONResponse(error_body(422, "invalid request", problems), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return JSONResponse(error_body(error.status_code, str(error.detail)), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body(500, "internal error (logged by the server)"), status_code=500)

    def require(scope: str):
        # async: a key check is a hash and a dict lookup; a sync dependency would hop to the
        # thread pool on every request, and threads contending for the GIL stretch the tail.
        async def check_key(header_key: str | None = Security(API_KEY_HEADER),
                      bearer: HTTPAuthorizationCredentials | None = Security(BEARER)):
            key = header_key or (bearer.credentials if bearer is not None else None)
            if not key:
                raise HTTPException(401, "missing API key: send X-API-Key or Authorization: Bearer",
                                    headers={"WWW-Authenticate": "Bearer"})
            entry = keys.verify(key)
            if entry is None:
                raise HTTPException(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
            if not entry.allows(scope):
                raise HTTPException(403, f"API key {entry.name!r} has scope {entry.scope!r}; this route needs {scope!r}")
            return entry

        return Depends(check_key)

    def served() -> ServedModel:
        model = follower.current
        if model is None:
            raise HTTPException(503, "no model is served yet: the registry has no loadable version aliased "
                                f"'champion' for {config.registered_model!r}")
        return model

    def user_result(rec) -> dict:
        if rec.scored_by in (PROFILE, POPULAR):
            metrics().cold_start_users.labels(rec.scored_by).inc()
        return {"user_id": rec.user_id, "scored_by": rec.scored_by,
                "items": [{"item_id": i, "score": s} for i, s in zip(rec.items, rec.scores)]}

    @app.get("/healthz", tags=["operations"])
    async def healthz():
        """Alive (no key needed)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], dependencies=[require("read")])
    async def readyz():
        """Ready when a model is loaded; says which version, and whether a newer one failed to load."""
        model = follower.current
        body = {"ready": model is not None, "version": model.version if model else None,
                "champion_alias": follower.alias_version, "reload_error": follower.last_error,
                "cold_start_items": model.cold_start_items if model else 0}
        return JSONResponse(body, status_code=200 if model is not None else 503)

    @app.get("/metrics", tags=["operations"], dependencies=[require("read")])
    async def metrics_route():
        """Prometheus metrics of all worker processes."""
        payload, content_type = metrics().render()
        return Response(payload, media_type=content_type)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[require("read")])
    async def openapi_schema():
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[require("read")])
    async def docs():
        page = get_swagger_ui_html(openapi_url="", title=app.title, swagger_ui_parameters={"spec": app.openapi()})
        return HTMLResponse(page.body)

    @app.get("/v1/users/{user_id}/recommendations", response_model=RecommendationsResponse,
             tags=["recommendations"], dependencies=[require("read")])
    async def recommend_user(user_id: str, k: int = Query(10, ge=1, le=MAX_K),
                             exclude_rated: bool = Query(True, description="Skip items the user already rated")):
        """The user's top K over the whole catalog."""
        model = served()
        rec = model.recommend([user_id], k, exclude_rated)[0]
        return JSONResponse({"version": model.version, **user_result(rec)})

    @app.post("/v1/recommendations", response_model=BatchRecommendationsResponse, tags=["recommendations"],
              dependencies=[require("read")])
    async def recommend_batch(body: BatchRecommendationsRequest):
        """Top K for each of a batch of users."""
        model = served()
        recs = model.recommend(body.user_ids, body.k, body.exclude_rated)
        return JSONResponse({"version": model.version, "results": [user_result(r) for r in recs]})

    @app.post("/v1/scores", response_model=ScoresResponse, tags=["recommendations"], dependencies=[require("read")])
    async def scores(body: ScoresRequest):
        """Predicted score of each (user_id, item_id) pair."""
        model = served()
        values = model.predict([p.user_id for p in body.pairs], [p.item_id for p in body.pairs])
        return JSONResponse({"version": model.version, "scores": [float(v) for v in values]})

    @app.post("/v1/admin/reload", tags=["operations"], dependencies=[require("admin")])
    def reload():
        """Check the champion alias now (and retry a version that failed to load)."""
        outcome = follower.check(force=True)
        model = follower.current
        body = {"outcome": outcome.status, "champion_alias": outcome.version,
                "version": model.version if model else None, "reload_error": outcome.error}
        return JSONResponse(body, status_code=200 if outcome.status != "failed" else 502)

    return app


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker process, configured by the runner through the environment."""
    import torch

    config = ApiConfig.model_validate_json(os.environ[CONFIG_ENV])
    # A request's work is one small matrix product: an intra-op thread pool only adds wake-up
    # latency (100 pairs took 145 ms with 2 threads on a busy 2-core machine, 2 ms with 1).
    torch.set_num_threads(1)
    return create_app(config)


def run(config: ApiConfig, access_log: bool = False) -> None:
    """Serve until interrupted: `config.workers` uvicorn worker processes, metrics merged."""
    import shutil
    import tempfile

    import uvicorn

    metrics_dir = Path(tempfile.mkdtemp(prefix="llmrec-api-metrics-"))
    # Before prometheus_client is imported anywhere: its value class is chosen at import.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    os.environ[CONFIG_ENV] = config.model_dump_json()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        uvicorn.run("app.api:app_from_env", factory=True, host=config.host, port=config.port,
                    workers=config.workers, access_log=access_log, log_level="info")
    finally:
        # Per-process counter files of this run only; a new run starts from zero.
        shutil.rmtree(metrics_dir, ignore_errors=True)
