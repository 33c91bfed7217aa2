"""The ``pacs-ai`` command line.

Every command reads the same settings (``PACS_AI_*``). A configuration error is
one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from worker.settings import Settings, SettingsError, load_settings

log = logging.getLogger("pacs_ai")

EXIT_CONFIG = 2
EXIT_FAILURE = 1


class CliError(Exception):
    """A readable one-line failure of a command."""


# -- helpers ------------------------------------------------------------------


def _setup(settings: Settings, process_name: str) -> None:
    from worker.logging_setup import configure_logging

    configure_logging(settings.log_level, settings.log_format, process_name)


def _setup_metrics(settings: Settings, serve: bool = False) -> None:
    """Multiprocess metrics (before anything records one); with
    PACS_AI_METRICS_PORT, also this process's own /metrics endpoint."""
    from worker import metrics

    metrics.setup(settings.metrics_path)
    if serve and settings.metrics_port:
        try:
            metrics.serve(settings.metrics_port)
        except OSError as exc:
            raise CliError(
                f"cannot serve metrics on port {settings.metrics_port} ({exc.strerror}); "
                "check PACS_AI_METRICS_PORT"
            ) from None


def _check_schema(settings: Settings) -> None:
    """Refuse to start on a database that is unreachable or not migrated."""
    from alembic.migration import MigrationContext
    from sqlalchemy.exc import SQLAlchemyError

    from db.migrate import current_heads
    from db.session import get_engine

    try:
        with get_engine(settings.effective_database_url).connect() as conn:
            current = MigrationContext.configure(conn).get_current_heads()
    except SQLAlchemyError as exc:
        raise CliError(
            f"database unreachable ({type(exc).__name__}); check PACS_AI_DATABASE_URL"
        ) from None
    if set(current) != set(current_heads()):
        raise CliError("the database schema is not up to date; run `pacs-ai db upgrade`")


def _wait_for_signal(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not stop.is_set():
        stop.wait(0.5)


def _print_rows(rows: list[dict[str, Any]], as_json: bool, columns: Sequence[str]) -> None:
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    if not rows:
        print("(none)")
        return
    table = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in table)) for i, col in enumerate(columns)]
    print("  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True)))
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


# -- commands -----------------------------------------------------------------


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    from db.migrate import upgrade

    try:
        upgrade(settings.effective_database_url)
    except Exception as exc:
        raise CliError(f"database upgrade failed ({type(exc).__name__}: {exc})") from None
    print("database schema is up to date")
    return 0


def cmd_listen(settings: Settings, args: argparse.Namespace) -> int:
    from dicomnode.scp import ListenerConfig, StorageSCP
    from worker import metrics
    from worker.celery_app import create_app
    from worker.scheduler import Scheduler

    _setup(settings, "listener")
    _check_schema(settings)
    _setup_metrics(settings, serve=True)
    scp = StorageSCP(
        ListenerConfig(
            ae_title=settings.ae_title,
            host=settings.host,
            port=settings.port,
            storage_root=settings.storage_path,
            database_url=settings.effective_database_url,
            allowed_calling_aets=settings.allowed_aets,
            max_pdu_size=settings.max_pdu_size,
            network_timeout=settings.network_timeout,
        ),
        observer=metrics,
    )
    try:
        scp.start()
    except OSError as exc:
        raise CliError(
            f"cannot listen on {settings.host}:{settings.port} ({exc.strerror}); "
            "check PACS_AI_HOST and PACS_AI_PORT"
        ) from None
    scheduler = Scheduler(settings, create_app(settings))
    scheduler.start()
    stop = threading.Event()
    try:
        _wait_for_signal(stop)
    finally:
        scp.stop()
        scheduler.stop()
        scheduler.join(timeout=10)
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from worker.celery_app import DISPATCH_QUEUE, INFERENCE_QUEUE, create_app
    from worker.tasks import register_tasks

    _setup(settings, "worker")
    _check_schema(settings)
    _setup_metrics(settings, serve=True)
    app = create_app(settings)
    register_tasks(app)
    queues = args.queues or f"{INFERENCE_QUEUE},{DISPATCH_QUEUE}"
    argv = [
        "worker",
        "--queues",
        queues,
        "--concurrency",
        str(args.concurrency or settings.worker_concurrency),
        "--loglevel",
        settings.log_level,
        "--without-gossip",
        "--without-mingle",
        "--hostname",
        args.hostname or "pacs-ai@%h",
    ]
    if settings.is_filesystem_broker:
        argv.append("--without-heartbeat")
    app.worker_main(argv)
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """Embedded mode: migrate, then supervise a listener and a worker process."""
    from worker import metrics
    from worker.api import check_bind

    _setup(settings, "run")
    check_bind(settings)
    cmd_db_upgrade(settings, args)
    metrics.clear(settings.metrics_path)  # a fresh start for this node's counters
    base = [sys.executable, "-m", "worker.cli"]
    specs = {
        "listener": [*base, "listen"],
        "worker": [*base, "worker"],
        "api": [*base, "api"],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stop = threading.Event()

    def spawn(name: str) -> None:
        procs[name] = subprocess.Popen(specs[name])
        log.info("started %s (pid %d)", name, procs[name].pid)

    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    for name in specs:
        spawn(name)
    log.info(
        "pacs-ai running: AE %s on %s:%d, dashboard on %s:%d, data in %s (Ctrl-C to stop)",
        settings.ae_title,
        settings.host,
        settings.port,
        settings.api_host,
        settings.api_port,
        settings.data_path,
    )
    failures: dict[str, list[float]] = {name: [] for name in specs}
    exit_code = 0
    while not stop.is_set():
        stop.wait(0.5)
        for name, proc in list(procs.items()):
            rc = proc.poll()
            if rc is None or stop.is_set():
                continue
            now = time.monotonic()
            failures[name] = [t for t in failures[name] if now - t < 60] + [now]
            if len(failures[name]) > 5 or rc == EXIT_CONFIG:
                log.error("%s keeps exiting (status %d); stopping", name, rc)
                exit_code = EXIT_FAILURE
                stop.set()
                break
            log.warning("%s exited with status %d; restarting it", name, rc)
            spawn(name)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    log.info("pacs-ai stopped")
    return exit_code


def cmd_studies_list(settings: Settings, args: argparse.Namespace) -> int:
    _check_schema(settings)  # one readable line, not a traceback, on a missing schema
    from db.queries import list_studies
    from db.session import session_scope

    with session_scope(settings.effective_database_url) as session:
        rows = list_studies(session, limit=args.limit)
    _print_rows(
        rows,
        args.json,
        [
            "study_instance_uid",
            "modalities",
            "num_series",
            "num_instances",
            "status",
            "received_at",
        ],
    )
    return 0


def cmd_jobs_list(settings: Settings, args: argparse.Namespace) -> int:
    _check_schema(settings)  # one readable line, not a traceback, on a missing schema
    from db.queries import list_jobs
    from db.session import session_scope

    with session_scope(settings.effective_database_url) as session:
        rows = list_jobs(session, status=args.status, study_uid=args.study, limit=args.limit)
    _print_rows(
        rows,
        args.json,
        ["id", "study_instance_uid", "status", "attempts", "created_at", "finished_at", "error"],
    )
    return 0


def cmd_models_list(settings: Settings, args: argparse.Namespace) -> int:
    from worker.registry import discover

    rows = [m.to_dict() for m in discover(settings.models_path)]
    _print_rows(rows, args.json, ["name", "version", "task", "enabled", "findings", "error"])
    return 0


def cmd_models_check(settings: Settings, args: argparse.Namespace) -> int:
    """Verify hashes, load each model, run a dummy input; non-zero if any is broken."""
    from worker.inference import RuntimeOptions, check_model
    from worker.registry import discover

    options = RuntimeOptions(threads=settings.ort_threads, providers=settings.ort_provider_list)
    models = discover(settings.models_path)
    if not models:
        print(f"no model manifests in {settings.models_path}", file=sys.stderr)
        return EXIT_FAILURE
    broken = 0
    for model in models:
        if not model.enabled:
            broken += 1
            print(f"FAIL {model.name}: {model.error}")
            continue
        try:
            report = check_model(model, options)
        except Exception as exc:
            broken += 1
            print(f"FAIL {model.name}: cannot run with onnxruntime ({type(exc).__name__}: {exc})")
            continue
        assert model.manifest is not None
        print(
            f"ok   {model.name} {model.manifest.version} ({model.manifest.task}): "
            f"inputs {report['inputs']} -> outputs {report['outputs']}"
        )
    if broken:
        print(f"{broken} of {len(models)} models are broken", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in {"true", "yes", "1"}:
        return True
    if lowered in {"false", "no", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not true or false")


def _parse_when(value: str) -> dt.datetime:
    """A date (``2025-03-01``, midnight UTC) or an ISO 8601 date and time (UTC if no zone)."""
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a date (YYYY-MM-DD) or ISO 8601 date and time"
        ) from None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


RESULT_CSV_COLUMNS = (
    "id",
    "job_id",
    "study_instance_uid",
    "series_instance_uid",
    "model",
    "model_version",
    "kind",
    "finding",
    "finding_code_value",
    "finding_code_scheme",
    "probability",
    "present",
    "measurements",
    "created_at",
)


def _print_results_csv(rows: list[dict[str, Any]]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(RESULT_CSV_COLUMNS)
    for row in rows:
        flat = {
            **row,
            "finding_code_value": row["finding_code"]["value"],
            "finding_code_scheme": row["finding_code"]["scheme"],
            "present": "" if row["present"] is None else str(row["present"]).lower(),
            "probability": "" if row["probability"] is None else row["probability"],
            "measurements": json.dumps(row["measurements"], sort_keys=True),
        }
        writer.writerow([flat.get(col, "") for col in RESULT_CSV_COLUMNS])


def cmd_results_list(settings: Settings, args: argparse.Namespace) -> int:
    _check_schema(settings)  # one readable line, not a traceback, on a missing schema
    from db.queries import list_results
    from db.session import session_scope

    with session_scope(settings.effective_database_url) as session:
        rows = list_results(
            session,
            study_uid=args.study,
            model=args.model,
            finding=args.finding,
            present=args.present,
            since=args.since,
            until=args.until,
            min_probability=args.min_probability,
            limit=args.limit,
        )
    if args.csv:
        _print_results_csv(rows)
        return 0
    _print_rows(
        rows,
        args.json,
        [
            "study_instance_uid",
            "model",
            "model_version",
            "kind",
            "finding",
            "probability",
            "present",
            "measurements",
        ],
    )
    return 0


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    """The admin API and dashboard (blocks until SIGINT/SIGTERM)."""
    from worker.api import check_bind, serve

    _setup(settings, "api")
    check_bind(settings)
    _setup_metrics(settings)
    try:
        serve(settings)
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind
        if exc.code:
            raise CliError(
                f"cannot serve the API on {settings.api_host}:{settings.api_port}; "
                "check PACS_AI_API_HOST and PACS_AI_API_PORT"
            ) from None
    return 0


class _Progress:
    """A progress bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total = total
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.finished = 0
        self.failed = 0

    def update(self, job_id: int, study_uid: str, status: str) -> None:
        self.finished += 1
        self.failed += status == "failed"
        if self.tty:
            width = 30
            filled = int(width * self.finished / max(self.total, 1))
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(
                f"\r[{bar}] {self.finished}/{self.total} finished, {self.failed} failed"
            )
            if self.finished == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(
                f"job {job_id} {status} study={study_uid} ({self.finished}/{self.total})\n"
            )
        self.stream.flush()


def cmd_reprocess(settings: Settings, args: argparse.Namespace) -> int:
    """Queue a new job for studies (after a model upgrade, or a failure) and, unless
    --no-wait, follow them until they finish."""
    _check_schema(settings)
    from db.queries import list_jobs, studies_with_results
    from db.repo import ReprocessRefused, create_reprocess_job
    from db.session import session_scope
    from worker.celery_app import create_app
    from worker.scheduler import send_job

    _setup(settings, "cli")
    url = settings.effective_database_url
    if args.model:
        with session_scope(url) as session:
            uids = studies_with_results(session, args.model, since=args.since)
        if not uids:
            print(f"no study has results of model {args.model}; nothing to reprocess")
            return 0
    else:
        uids = list(dict.fromkeys(args.study))
    app = create_app(settings)
    queued: dict[int, str] = {}
    for uid in uids:
        try:
            with session_scope(url) as session:
                job_id = create_reprocess_job(session, uid).id
        except LookupError:
            print(f"skipped study {uid}: not found", file=sys.stderr)
            continue
        except ReprocessRefused as exc:
            print(f"skipped {exc}", file=sys.stderr)
            continue
        sent = send_job(app, settings, job_id)  # after commit
        queued[job_id] = uid
        note = "" if sent else " (broker unreachable: the reconciler will send it)"
        print(f"queued job {job_id} for study {uid}{note}")
    if not queued:
        return EXIT_FAILURE
    if args.no_wait:
        return 0
    progress = _Progress(len(queued))
    pending = dict(queued)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while pending:
        time.sleep(1.0)
        with session_scope(url) as session:
            for job_id, uid in list(pending.items()):
                job = list_jobs(session, study_uid=uid, limit=None)
                status = next((j["status"] for j in job if j["id"] == job_id), "failed")
                if status in {"done", "failed"}:
                    del pending[job_id]
                    progress.update(job_id, uid, status)
        if deadline is not None and time.monotonic() > deadline and pending:
            raise CliError(
                f"{len(pending)} job(s) still unfinished after {args.timeout:.0f} s "
                f"({', '.join(str(j) for j in pending)}); they keep running"
            )
    print(f"{progress.finished - progress.failed} done, {progress.failed} failed")
    return EXIT_FAILURE if progress.failed else 0


def cmd_deliveries_list(settings: Settings, args: argparse.Namespace) -> int:
    _check_schema(settings)  # one readable line, not a traceback, on a missing schema
    from db.queries import list_deliveries
    from db.session import session_scope

    with session_scope(settings.effective_database_url) as session:
        rows = list_deliveries(
            session,
            study_uid=args.study,
            status=args.status,
            job_id=args.job,
            limit=args.limit,
        )
    _print_rows(
        rows,
        args.json,
        [
            "study_instance_uid",
            "kind",
            "sop_instance_uid",
            "destination",
            "status",
            "attempts",
            "sent_at",
            "last_error",
        ],
    )
    return 0


def cmd_resend(settings: Settings, args: argparse.Namespace) -> int:
    """Make the deliveries of a study (or job) pending again and queue them."""
    _check_schema(settings)
    from db.repo import reset_deliveries
    from db.session import session_scope
    from worker.celery_app import create_app
    from worker.dispatch import enqueue_deliveries

    with session_scope(settings.effective_database_url) as session:
        ids = reset_deliveries(session, study_uid=args.study, job_id=args.job)
    if not ids:
        raise CliError("no deliveries for this study or job")
    sent = enqueue_deliveries(settings, ids, create_app(settings))
    note = "" if sent == len(ids) else " (the broker is unreachable; the listener will queue them)"
    print(f"{len(ids)} deliveries pending again{note}")
    return 0


# -- parser -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-ai",
        description="pacs-ai: a DICOM AI node. Settings come from PACS_AI_* variables.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, func: Callable[[Settings, argparse.Namespace], int], help: str, parent: Any = sub
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    add("run", cmd_run, "embedded mode: listener, worker and reconciler in one command")
    add("listen", cmd_listen, "run the DICOM listener, study assembler and reconciler")
    w = add("worker", cmd_worker, "run a Celery worker for the inference and dispatch queues")
    w.add_argument("--concurrency", type=int, help="worker processes (PACS_AI_WORKER_CONCURRENCY)")
    w.add_argument("--queues", help="comma-separated queues (default: inference,dispatch)")
    w.add_argument("--hostname", help="Celery node name")

    db = sub.add_parser("db", help="database administration").add_subparsers(
        dest="db_command", required=True, metavar="COMMAND"
    )
    add("upgrade", cmd_db_upgrade, "create or migrate the database schema", db)

    studies = sub.add_parser("studies", help="received studies").add_subparsers(
        dest="studies_command", required=True, metavar="COMMAND"
    )
    s = add("list", cmd_studies_list, "list received studies, newest first", studies)
    s.add_argument("--json", action="store_true", help="print a JSON array")
    s.add_argument("--limit", type=int, default=None)

    jobs = sub.add_parser("jobs", help="processing jobs").add_subparsers(
        dest="jobs_command", required=True, metavar="COMMAND"
    )
    j = add("list", cmd_jobs_list, "list jobs, newest first", jobs)
    j.add_argument("--json", action="store_true", help="print a JSON array")
    j.add_argument("--status", choices=["queued", "running", "done", "failed"])
    j.add_argument("--study", help="only jobs of this Study Instance UID")
    j.add_argument("--limit", type=int, default=None)

    models = sub.add_parser("models", help="the model registry").add_subparsers(
        dest="models_command", required=True, metavar="COMMAND"
    )
    m = add("list", cmd_models_list, "list registered models (PACS_AI_MODELS_DIR)", models)
    m.add_argument("--json", action="store_true", help="print a JSON array")
    add("check", cmd_models_check, "verify hashes and run each model on a dummy input", models)

    results = sub.add_parser("results", help="model results").add_subparsers(
        dest="results_command", required=True, metavar="COMMAND"
    )
    r = add("list", cmd_results_list, "list findings and measurements, newest first", results)
    r.add_argument("--json", action="store_true", help="print a JSON array")
    r.add_argument("--study", help="only this Study Instance UID")
    r.add_argument("--model", help="only this model name")
    r.add_argument("--finding", help="only this finding (code meaning, e.g. 'Lung nodule')")
    r.add_argument("--present", type=_parse_bool, help="true or false")
    r.add_argument("--min-probability", type=float, help="classification probability at least")
    r.add_argument("--since", type=_parse_when, help="stored at or after (YYYY-MM-DD or ISO)")
    r.add_argument("--until", type=_parse_when, help="stored before (YYYY-MM-DD or ISO)")
    r.add_argument("--csv", action="store_true", help="print CSV (one row per result)")
    r.add_argument("--limit", type=int, default=None)

    add(
        "api",
        cmd_api,
        "serve the admin API and dashboard (PACS_AI_API_HOST:PACS_AI_API_PORT)",
    )
    rp = add("reprocess", cmd_reprocess, "run studies again with the current models")
    which = rp.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--study", action="append", metavar="UID", help="this Study Instance UID (repeatable)"
    )
    which.add_argument("--model", help="every study with results of this model")
    rp.add_argument(
        "--since", type=_parse_when, help="with --model: studies received at or after this date"
    )
    rp.add_argument("--no-wait", action="store_true", help="queue the jobs and return")
    rp.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")

    deliveries = sub.add_parser(
        "deliveries", help="result objects sent to destinations"
    ).add_subparsers(dest="deliveries_command", required=True, metavar="COMMAND")
    dl = add("list", cmd_deliveries_list, "list deliveries, newest first", deliveries)
    dl.add_argument("--json", action="store_true", help="print a JSON array")
    dl.add_argument("--study", help="only this Study Instance UID")
    dl.add_argument("--status", choices=["pending", "sent", "failed"])
    dl.add_argument("--job", type=int, help="only objects built by this job id")
    dl.add_argument("--limit", type=int, default=None)
    rs = add("resend", cmd_resend, "send a study's (or job's) result objects again")
    target = rs.add_mutually_exclusive_group(required=True)
    target.add_argument("--study", help="Study Instance UID")
    target.add_argument("--job", type=int, help="job id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        return int(args.func(settings, args))
    except SettingsError as exc:
        print(f"pacs-ai: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except CliError as exc:
        print(f"pacs-ai: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
