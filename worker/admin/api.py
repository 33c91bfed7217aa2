"""The admin HTTP API and the dashboard (FastAPI), served by ``pacs-ai api``.

Reads go through :mod:`db.queries`, the same functions as the CLI, so
``pacs-ai ... list --json`` and the API return the same objects. Lists are
paginated: ``limit`` (1-1000, default 50) and ``offset``; the answer is
``{"items": [...], "limit": L, "offset": O, "next_offset": O+L or null}``.

Access: with no token configured every endpoint is open (only allowed on a
loopback address, see :func:`check_bind`). With tokens configured, every
endpoint except ``/healthz`` and the dashboard's static page needs
``Authorization: Bearer <token>`` (401 otherwise); write endpoints need an admin
token (``PACS_AI_API_TOKEN``; 403 for a read-only one from
``PACS_AI_API_READ_TOKENS``). A configured token is either the token itself or
``sha256:<hex digest of the token>``.

With or without tokens, :mod:`worker.admin.webguard` answers 421 to a ``Host`` header
outside ``PACS_AI_API_ALLOWED_HOSTS`` (DNS rebinding) and 403 to a ``POST``
without a JSON body or with a foreign ``Origin`` (cross-site requests).
"""

# No `from __future__ import annotations`: FastAPI reads the annotations of the
# endpoints defined inside create_app (closures) at definition time.
import datetime as dt
import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from db import queries
from db.session import get_engine, session_scope
from dicomnode import identity
from worker import metrics
from worker.admin.audit import AuditMiddleware, note_studies
from worker.admin.tokens import Role, TokenCheck
from worker.admin.webguard import WebGuard, allowed_hosts
from worker.services import patients
from worker.services import studies as service
from worker.services.studies import DeliveryFilter, ResultFilter
from worker.settings import Settings, SettingsError

log = logging.getLogger(__name__)


MAX_LIMIT = 1000
DEFAULT_LIMIT = 50

_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


# -- access control ---------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host in {"localhost", "ip6-localhost"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings) -> None:
    """Refuse to serve without a token anywhere but on a loopback address."""
    if not settings.api_auth_enabled and not is_loopback(settings.api_host):
        raise SettingsError(
            f"refusing to serve the API on {settings.api_host} without a token: set "
            "PACS_AI_API_TOKEN (or PACS_AI_API_HOST=127.0.0.1 for local access only)"
        )


_bearer = HTTPBearer(auto_error=False, description="PACS_AI_API_TOKEN or a read-only token")


# -- helpers ----------------------------------------------------------------------


def _page(items: list[dict[str, Any]], limit: int, offset: int) -> dict[str, Any]:
    """``items`` was fetched with ``limit + 1`` to learn whether more follow."""
    more = len(items) > limit
    return {
        "items": items[:limit],
        "limit": limit,
        "offset": offset,
        "next_offset": offset + limit if more else None,
    }


class _ModelCache:
    """The registry, read again only when a file in the models folder changed
    (``discover`` hashes every ONNX file)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._key: tuple[Any, ...] | None = None
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def _stamp(self) -> tuple[Any, ...]:
        if not self.folder.is_dir():
            return ()
        return tuple(
            (p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(self.folder.iterdir())
        )

    def rows(self) -> list[dict[str, Any]]:
        from worker.pipeline.registry import discover

        with self._lock:
            key = self._stamp()
            if key != self._key:
                self._rows = [m.to_dict() for m in discover(self.folder)]
                self._key = key
            return list(self._rows)


def check_database(settings: Settings) -> str | None:
    """None when the database answers, else a short reason."""
    try:
        with get_engine(settings.effective_database_url).connect() as conn:
            queries.ping(conn)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return f"unreachable ({type(exc).__name__})"
    return None


def check_broker(settings: Settings) -> str | None:
    """None when the broker answers, else a short reason."""
    url = settings.effective_broker_url
    try:
        if settings.is_filesystem_broker:
            folder = settings.broker_folder / "out"
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                return f"broker folder {folder} is missing or not writable"
            return None
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
            try:
                client.ping()
            finally:
                client.close()
            return None
        from kombu import Connection

        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return f"unreachable ({type(exc).__name__})"
    return None


def storage_free_mb(settings: Settings) -> float:
    """Free space of the storage file system, in MiB (measured on the nearest
    existing folder while the storage is not created yet)."""
    from dicomnode.storage import free_mb

    path = settings.storage_path
    while not path.exists() and path != path.parent:
        path = path.parent
    return free_mb(path)


def storage_space(settings: Settings) -> dict[str, Any]:
    """Free space of the storage file system against ``PACS_AI_MIN_FREE_MB``."""
    free = storage_free_mb(settings)
    return {
        "free_mb": round(free, 1),
        "min_free_mb": settings.min_free_mb,
        "below_watermark": free < settings.min_free_mb,
    }


def check_storage(space: dict[str, Any] | None) -> str | None:
    """None when the storage has room, else a short reason."""
    if space is None:
        return "free space unreadable"
    if space["below_watermark"]:
        return (
            f"free space {space['free_mb']:.0f} MiB is below PACS_AI_MIN_FREE_MB="
            f"{space['min_free_mb']} MiB; new instances are refused"
        )
    return None


def _storage_space_or_none(settings: Settings) -> dict[str, Any] | None:
    try:
        return storage_space(settings)
    except OSError as exc:
        log.warning("cannot read the storage's free space (%s)", type(exc).__name__)
        return None


def _static(name: str) -> str:
    return resources.files("worker.admin").joinpath("static", name).read_text(encoding="utf-8")


# -- the application ----------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    tokens = TokenCheck(settings.api_admin_token_list, settings.api_read_token_list)
    key_ring = identity.KeyRing(
        settings.secret_key_path, settings.secret_key_is_default, settings.effective_database_url
    )
    models_cache = _ModelCache(settings.models_path)
    url = settings.effective_database_url
    celery_lock = threading.Lock()
    celery_holder: list[Any] = []

    def celery() -> Any:
        with celery_lock:
            if not celery_holder:
                from worker.scheduling.celery_app import create_app as create_celery

                celery_holder.append(create_celery(settings))
            return celery_holder[0]

    def role_of(credentials: HTTPAuthorizationCredentials | None) -> Role:
        role = tokens.role(credentials.credentials if credentials else None)
        if role is None:
            raise HTTPException(
                status_code=401,
                detail="a valid bearer token is required (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return role

    def reader(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Role:
        return role_of(credentials)

    def admin(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Role:
        role = role_of(credentials)
        if role != "admin":
            raise HTTPException(status_code=403, detail="this action needs an admin token")
        return role

    def backlog(session: Session) -> list[dict[str, Any]]:
        from db.models import utcnow

        return queries.delivery_backlog(
            session,
            utcnow(),
            dt.timedelta(minutes=settings.delivery_alert_minutes),
            [d.name for d in settings.destination_list],
        )

    def backlog_rows() -> list[dict[str, Any]]:
        with session_scope(url) as session:
            return backlog(session)

    @contextmanager
    def db() -> Iterator[Session]:
        try:
            with session_scope(url) as session:
                yield session
        except HTTPException:
            raise
        except Exception as exc:
            from sqlalchemy.exc import OperationalError

            if isinstance(exc, OperationalError):
                raise HTTPException(503, "database unreachable") from None
            raise

    app = FastAPI(
        title="pacs-ai",
        summary="Admin API of a pacs-ai DICOM AI node",
        description=(
            "Studies received, jobs, model results and deliveries. Lists take `limit` "
            "(1-1000, default 50) and `offset` and answer "
            '`{"items": [...], "limit", "offset", "next_offset"}` (`next_offset` is null '
            "on the last page). Every endpoint except `/healthz` needs a bearer token "
            "when tokens are configured; `POST` endpoints need an admin token."
        ),
        version="1",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    Read = Annotated[Role, Depends(reader)]
    Admin = Annotated[Role, Depends(admin)]
    Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="page size")]
    Offset = Annotated[int, Query(ge=0, description="items to skip")]

    app.add_middleware(
        WebGuard,
        allowed=allowed_hosts(settings.api_host, settings.api_allowed_host_list),
    )

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[..., Any]) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    app.add_middleware(AuditMiddleware, database_url=url, who=tokens.name)  # outermost

    # -- probes, metrics, schema --------------------------------------------------

    @app.get("/healthz", tags=["operations"], summary="the process is up (no token needed)")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="database and broker reachable, storage above its free-space watermark",
        responses={
            503: {
                "description": "database or broker unreachable, or the storage's free "
                "space below PACS_AI_MIN_FREE_MB"
            }
        },
    )
    def readyz(_: Read) -> JSONResponse:
        space = _storage_space_or_none(settings)
        checks = {
            "database": check_database(settings),
            "broker": check_broker(settings),
            "storage": check_storage(space),
        }
        ready = all(v is None for v in checks.values())
        body = {
            "status": "ready" if ready else "not ready",
            "checks": {k: v or "ok" for k, v in checks.items()},
            "storage": space,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics of this host")
    def metrics_endpoint(_: Read) -> Response:
        def storage_bytes() -> tuple[float, float]:
            mib = 1024 * 1024
            return storage_free_mb(settings) * mib, float(settings.min_free_mb * mib)

        def counts() -> dict[str, dict[str, int]]:
            from db.models import DeliveryStatus, JobStatus

            with session_scope(url) as session:
                found = queries.count_by_status(session)
            jobs = {s.value: 0 for s in JobStatus} | found.get("jobs", {})
            deliveries = {s.value: 0 for s in DeliveryStatus} | found.get("deliveries", {})
            return {"jobs": jobs, "deliveries": deliveries}

        body, content_type = metrics.exposition(
            [
                metrics.DatabaseCollector(counts),
                metrics.BacklogCollector(backlog_rows, settings.delivery_alert_minutes),
                metrics.StorageCollector(storage_bytes),
            ]
        )
        return Response(body, media_type=content_type)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_: Read) -> JSONResponse:
        return JSONResponse(app.openapi())

    # -- reads ------------------------------------------------------------------

    @app.get("/api/summary", tags=["dashboard"], summary="jobs and deliveries by status")
    def summary(_: Read) -> dict[str, Any]:
        with db() as session:
            return queries.count_by_status(session)

    @app.get("/api/studies", tags=["studies"], summary="received studies, newest first")
    def studies(
        role: Read,
        request: Request,
        limit: Limit = DEFAULT_LIMIT,
        offset: Offset = 0,
        accession: Annotated[
            str | None,
            Query(max_length=64, description="admin: the studies with this accession number"),
        ] = None,
        identifiers: Annotated[
            bool, Query(description="admin: each study's patient ID and accession number")
        ] = False,
    ) -> dict[str, Any]:
        if (accession is not None or identifiers) and role != "admin":
            raise HTTPException(403, "patient identifiers need an admin token")
        try:
            with db() as session:
                rows = identity.list_studies(
                    session,
                    key_ring,
                    accession=accession,
                    reveal_identifiers=identifiers,
                    limit=limit + 1,
                    offset=offset,
                )
        except identity.KeyFileError as exc:
            log.error("identifiers unavailable: %s", exc)
            raise HTTPException(503, "the secret key is unavailable (see the log)") from None
        if accession is not None:
            note_studies(request, [r["study_instance_uid"] for r in rows])
        return _page(rows, limit, offset)

    @app.get(
        "/api/studies/{study_uid}",
        tags=["studies"],
        summary="one study: its series, jobs, results and deliveries",
        responses={404: {"description": "no such study"}},
    )
    def study(
        study_uid: str,
        role: Read,
        identifiers: Annotated[
            bool, Query(description="admin: the study's patient ID and accession number")
        ] = False,
    ) -> dict[str, Any]:
        if identifiers and role != "admin":
            raise HTTPException(403, "patient identifiers need an admin token")
        with db() as session:
            try:
                found = identity.list_studies(
                    session,
                    key_ring,
                    study_uid=study_uid,
                    reveal_identifiers=identifiers,
                    limit=1,
                )
            except identity.KeyFileError as exc:
                log.error("identifiers unavailable: %s", exc)
                raise HTTPException(503, "the secret key is unavailable (see the log)") from None
            if not found:
                raise HTTPException(404, f"no study {study_uid}")
            out = found[0]
            out["series"] = queries.list_series(session, study_uid)
            out["jobs"] = queries.list_jobs(session, study_uid=study_uid)
            out["results"] = queries.list_results(session, study_uid=study_uid)
            out["deliveries"] = queries.list_deliveries(session, study_uid=study_uid)
        return out

    @app.get(
        "/api/patients/{patient}/trend",
        tags=["studies"],
        summary="one patient's nodule volumes over time, by the patient handle "
        "(a study's `patient`; no identifiers)",
        responses={
            400: {"description": "not a patient handle (8-64 lowercase hex), or ambiguous"},
            404: {"description": "no study has this patient handle"},
        },
    )
    def patient_trend(patient: str, _: Read, request: Request) -> dict[str, Any]:
        try:
            trend = patients.patient_trend(settings, patient)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        note_studies(request, [s["study_instance_uid"] for s in trend["studies"]])
        return trend

    @app.get("/api/jobs", tags=["jobs"], summary="jobs, newest first")
    def jobs(
        _: Read,
        status: Annotated[
            Literal["queued", "running", "done", "failed", "superseded"] | None,
            Query(description="job status"),
        ] = None,
        study: Annotated[str | None, Query(description="Study Instance UID")] = None,
        limit: Limit = DEFAULT_LIMIT,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        with db() as session:
            rows = queries.list_jobs(
                session, status=status, study_uid=study, limit=limit + 1, offset=offset
            )
        return _page(rows, limit, offset)

    @app.get("/api/results", tags=["results"], summary="model results, newest first")
    def results(
        _: Read,
        model: Annotated[str | None, Query(description="model name")] = None,
        finding: Annotated[
            str | None, Query(description="finding (code meaning), case-insensitive")
        ] = None,
        present: Annotated[bool | None, Query(description="true or false")] = None,
        min_probability: Annotated[
            float | None, Query(ge=0.0, le=1.0, description="classification probability >=")
        ] = None,
        since: Annotated[
            dt.datetime | None, Query(description="stored at or after (ISO 8601; UTC if no zone)")
        ] = None,
        until: Annotated[
            dt.datetime | None, Query(description="stored before (ISO 8601; UTC if no zone)")
        ] = None,
        study: Annotated[str | None, Query(description="Study Instance UID")] = None,
        limit: Limit = DEFAULT_LIMIT,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        where = ResultFilter(study, model, finding, present, since, until, min_probability)
        return _page(service.list_results(settings, where, limit + 1, offset), limit, offset)

    @app.get("/api/deliveries", tags=["deliveries"], summary="result deliveries, newest first")
    def deliveries(
        _: Read,
        status: Annotated[
            str | None, Query(description="pending, sent or failed", max_length=16)
        ] = None,
        study: Annotated[str | None, Query(description="Study Instance UID")] = None,
        limit: Limit = DEFAULT_LIMIT,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        where = DeliveryFilter(study, status)
        return _page(service.list_deliveries(settings, where, limit + 1, offset), limit, offset)

    @app.get(
        "/api/deliveries/backlog",
        tags=["deliveries"],
        summary="pending deliveries per destination, and those pending too long",
    )
    def deliveries_backlog(_: Read) -> dict[str, Any]:
        with db() as session:
            rows = backlog(session)
        return {
            "alert_minutes": settings.delivery_alert_minutes,
            "max_age_hours": settings.delivery_max_age_hours,
            "pending": sum(r["pending"] for r in rows),
            "overdue": sum(r["overdue"] for r in rows),
            "destinations": rows,
        }

    @app.get("/api/models", tags=["models"], summary="registered models and their versions")
    def models(_: Read) -> list[dict[str, Any]]:
        return models_cache.rows()

    # -- writes -------------------------------------------------------------------

    @app.post(
        "/api/studies/{study_uid}/reprocess",
        tags=["studies"],
        status_code=202,
        summary="run the study again with the current models (admin)",
        responses={
            404: {"description": "no such study"},
            409: {
                "description": "the study already has a queued or running job, or its "
                "files were pruned by retention"
            },
        },
    )
    def reprocess(study_uid: str, _: Admin) -> dict[str, Any]:
        try:
            done = service.reprocess_study(settings, celery(), study_uid)
        except LookupError:
            raise HTTPException(404, f"no study {study_uid}") from None
        except service.ReprocessRefused as exc:
            raise HTTPException(409, str(exc)) from None
        sent = done.sent
        log.info("study=%s reprocess requested: job %d queued", study_uid, done.job_id)
        with db() as session:
            row = queries.list_jobs(session, study_uid=study_uid, limit=1)[0]
        return {"job": row, "sent": sent}

    @app.post(
        "/api/studies/{study_uid}/resend",
        tags=["deliveries"],
        status_code=202,
        summary="send the study's result objects to their destinations again (admin)",
        responses={404: {"description": "the study has no deliveries"}},
    )
    def resend(study_uid: str, _: Admin) -> dict[str, Any]:
        ids, sent = service.resend(settings, celery(), study_uid=study_uid)
        if not ids:
            raise HTTPException(404, f"study {study_uid} has no deliveries")
        log.info("study=%s resend requested: %d deliveries pending again", study_uid, len(ids))
        return {"deliveries": ids, "sent": sent}

    @app.post(
        "/api/studies/{study_uid}/complete",
        tags=["studies"],
        status_code=202,
        summary="the study is complete now: queue its job without waiting for the quiet "
        "period (admin)",
        responses={
            404: {"description": "no such study"},
            409: {"description": "every instance of the study is covered by a job already"},
        },
    )
    def complete(study_uid: str, _: Admin) -> dict[str, Any]:
        from worker.scheduling.completion import NothingToComplete, complete_now

        try:
            done = complete_now(settings, celery(), study_uid)
        except LookupError:
            raise HTTPException(404, f"no study {study_uid}") from None
        except NothingToComplete as exc:
            raise HTTPException(409, str(exc)) from None
        with db() as session:
            row = queries.list_jobs(session, study_uid=study_uid, limit=1)[0]
        return {"job": row, "sent": done.sent}

    from worker.admin.stow_rs import stow_router  # STOW-RS in: POST /dicomweb/studies

    app.include_router(stow_router(settings, tokens))

    # -- dashboard ----------------------------------------------------------------

    def _asset(name: str, media_type: str) -> Response:
        return Response(
            _static(name),
            media_type=media_type,
            headers={"Content-Security-Policy": _CSP},
        )

    @app.get("/", include_in_schema=False)
    def dashboard() -> Response:
        # The page itself holds no data: it fetches everything with the token.
        return _asset("dashboard.html", "text/html; charset=utf-8")

    @app.get("/static/dashboard.js", include_in_schema=False)
    def dashboard_js() -> Response:
        return _asset("dashboard.js", "text/javascript; charset=utf-8")

    @app.get("/static/dashboard.css", include_in_schema=False)
    def dashboard_css() -> Response:
        return _asset("dashboard.css", "text/css; charset=utf-8")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    return app


def serve(settings: Settings) -> None:
    """Run the API with uvicorn until SIGINT/SIGTERM (blocks)."""
    import uvicorn

    check_bind(settings)
    app = create_app(settings)
    ssl: dict[str, Any] = {}
    if settings.api_tls_cert is not None and settings.api_tls_key is not None:
        ssl = {
            "ssl_certfile": str(settings.api_tls_cert.expanduser()),
            "ssl_keyfile": str(settings.api_tls_key.expanduser()),
        }
    scheme = "https" if ssl else "http"
    log.info(
        "API and dashboard on %s://%s:%d/ (%s)",
        scheme,
        settings.api_host,
        settings.api_port,
        "tokens required" if settings.api_auth_enabled else "no token: loopback only",
    )
    uvicorn.run(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # our handlers (logging_setup), text or JSON
        access_log=True,
        server_header=False,
        **ssl,
    )
