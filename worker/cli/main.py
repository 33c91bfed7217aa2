"""The ``pacs-ai`` command line.

Every command reads the same settings (``PACS_AI_*``). A configuration error is
one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
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


def _listener_config(settings: Settings, processes: int, fds: dict[str, int] | None = None) -> Any:
    from dicomnode.scp import ListenerConfig

    # Limits are per process: connections are spread over the processes that
    # share the port, so each one takes its share of the association slots.
    per_process = max(1, -(-settings.max_associations // processes))
    return ListenerConfig(
        ae_title=settings.ae_title,
        host=settings.host,
        port=settings.port,
        storage_root=settings.storage_path,
        database_url=settings.effective_database_url,
        allowed_calling_aets=settings.allowed_aets,
        max_pdu_size=settings.max_pdu_size,
        network_timeout=settings.network_timeout,
        maximum_associations=per_process,
        max_associations_per_host=min(settings.max_associations_per_host, per_process),
        association_timeout=settings.association_timeout,
        max_instance_bytes=settings.max_instance_bytes,
        allowed_hosts=settings.allowed_host_list,
        min_free_mb=settings.min_free_mb,
        tls_port=settings.tls_port,
        tls_cert=settings.listener_tls_cert,
        tls_key=settings.listener_tls_key,
        tls_ca=settings.listener_tls_ca,
        shared_accept=processes > 1,
        plain_fd=(fds or {}).get("plain"),
        tls_fd=(fds or {}).get("tls"),
        identity_keys=_identity_keys(settings),
    )


def _identity_keys(settings: Settings) -> Any:
    """The listener's keys for the studies it records (PACS_AI_SECRET_KEY_FILE; unset:
    the data dir's key, created when missing); a readable failure otherwise."""
    from dicomnode.identity import KeyFileError

    try:
        return _key_ring(settings).get()
    except KeyFileError as exc:
        raise SettingsError(str(exc)) from None


def cmd_listen(settings: Settings, args: argparse.Namespace) -> int:
    """The DICOM listener: PACS_AI_LISTENER_PROCESSES processes accept on the
    same listening sockets (made by the first, inherited by the others, the
    least busy one taking each new connection); the first one also runs the
    scheduler (assembler, reconciler, retention) and supervises the others."""
    from dicomnode.scp import StorageSCP
    from worker import metrics
    from worker.scheduling.celery_app import create_app
    from worker.scheduling.doorbell import Bell, RingingObserver, bell_address
    from worker.scheduling.scheduler import Scheduler

    processes = int(args.processes or settings.effective_listener_processes)
    helper = bool(args.no_scheduler)
    if helper and args.processes:
        _die_with_parent()
    _setup(settings, "listener")
    _check_schema(settings)
    _setup_metrics(settings, serve=not helper)
    # every stored instance rings the scheduler (in the first listener process)
    observer = RingingObserver(metrics, Bell(bell_address(settings.data_path)))
    fds = _parse_fds(args.listen_fds) if helper else None
    scp = StorageSCP(_listener_config(settings, processes, fds), observer=observer)
    try:
        scp.start()
    except ssl.SSLError as exc:
        raise CliError(
            f"cannot start DICOM TLS ({exc.reason or exc}); check PACS_AI_LISTENER_TLS_CERT, "
            "PACS_AI_LISTENER_TLS_KEY and PACS_AI_LISTENER_TLS_CA"
        ) from None
    except OSError as exc:
        raise CliError(
            f"cannot listen on {settings.host} port {settings.port} or TLS port "
            f"{settings.tls_port} ({exc.strerror}); check PACS_AI_HOST, PACS_AI_PORT "
            "and PACS_AI_TLS_PORT"
        ) from None
    scheduler = None if helper else Scheduler(settings, create_app(settings))
    if scheduler is not None:
        scheduler.start()
    stop = threading.Event()
    others = _ListenerProcesses(processes - 1 if not helper else 0, stop, scp.listening_fds())
    others.start()
    try:
        _wait_for_signal(stop)
    finally:
        others.stop()
        scp.stop()
        if scheduler is not None:
            scheduler.stop()
            scheduler.join(timeout=10)
    return 0


def _parse_fds(value: str | None) -> dict[str, int]:
    """``--listen-fds plain=5,tls=6`` (given by the first listener process)."""
    fds: dict[str, int] = {}
    for item in (value or "").split(","):
        name, _, fd = item.partition("=")
        if name in ("plain", "tls") and fd.isdigit():
            fds[name] = int(fd)
    return fds


def _parent_death_signal() -> None:
    """Ask the kernel for SIGTERM when our parent dies (Linux; elsewhere a no-op)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _die_with_parent() -> None:
    """An extra listener process ends with the one that started it (Linux)."""
    parent = os.getppid()
    _parent_death_signal()
    if os.getppid() != parent:  # pragma: no cover - the parent died meanwhile
        raise SystemExit(0)


class _ListenerProcesses(threading.Thread):
    """The extra listener processes of ``pacs-ai listen``: started, restarted
    when one dies (at most once every 5 s each), stopped with the first."""

    def __init__(self, count: int, stop: threading.Event, fds: dict[str, int]) -> None:
        super().__init__(name="pacs-ai-listener-supervisor", daemon=True)
        self.count = count
        #: the listening sockets the extra processes accept on
        self.fds = fds
        self._stop_event = stop
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self._spawned_at: list[float] = [0.0] * count
        self._lock = threading.Lock()
        self._closing = False

    def _spawn(self, i: int) -> None:
        argv = [sys.executable, "-m", "worker.cli.main", "listen", "--no-scheduler"]
        argv += ["--processes", str(self.count + 1)]
        argv += ["--listen-fds", ",".join(f"{k}={v}" for k, v in self.fds.items())]
        proc = subprocess.Popen(argv, pass_fds=tuple(self.fds.values()))
        self._procs[i] = proc
        self._spawned_at[i] = time.monotonic()
        log.info("started listener process %d of %d (pid %d)", i + 2, self.count + 1, proc.pid)

    def run(self) -> None:
        if not self.count:
            return
        with self._lock:
            for i in range(self.count):
                self._spawn(i)
        while not self._stop_event.wait(0.5):
            with self._lock:
                if self._closing:
                    return
                for i, proc in enumerate(self._procs):
                    if proc is not None and proc.poll() is not None:
                        if time.monotonic() - self._spawned_at[i] < 5:
                            continue
                        log.error(
                            "listener process %d (pid %d) exited with status %s; restarting",
                            i + 2,
                            proc.pid,
                            proc.returncode,
                        )
                        self._spawn(i)

    def stop(self) -> None:
        with self._lock:
            self._closing = True
            procs = [p for p in self._procs if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from worker.scheduling.celery_app import DISPATCH_QUEUE, INFERENCE_QUEUE, create_app
    from worker.scheduling.tasks import register_tasks

    queue_list = [q.strip() for q in (args.queues or "").split(",") if q.strip()]
    unknown = set(queue_list) - {INFERENCE_QUEUE, DISPATCH_QUEUE}
    if unknown:
        raise CliError(
            f"unknown queue(s) {', '.join(sorted(unknown))}; "
            f"--queues takes {INFERENCE_QUEUE}, {DISPATCH_QUEUE} or both"
        )
    queue_list = queue_list or [INFERENCE_QUEUE, DISPATCH_QUEUE]
    dispatch_only = queue_list == [DISPATCH_QUEUE]
    _setup(settings, "dispatcher" if dispatch_only else "worker")
    if "delivery_max_attempts" in settings.model_fields_set:
        log.warning(
            "PACS_AI_DELIVERY_MAX_ATTEMPTS is ignored: transient delivery failures are "
            "retried until PACS_AI_DELIVERY_MAX_AGE_HOURS (%g h)",
            settings.delivery_max_age_hours,
        )
    _check_schema(settings)
    _setup_metrics(settings, serve=True)
    app = create_app(settings)
    register_tasks(app)
    default_concurrency = (
        settings.dispatch_concurrency if dispatch_only else settings.worker_concurrency
    )
    default_name = {
        INFERENCE_QUEUE: "pacs-ai-inference@%h",
        DISPATCH_QUEUE: "pacs-ai-dispatch@%h",
    }.get(",".join(queue_list), "pacs-ai@%h")
    argv = [
        "worker",
        "--queues",
        ",".join(queue_list),
        "--concurrency",
        str(args.concurrency or default_concurrency),
        "--loglevel",
        settings.log_level,
        "--without-gossip",
        "--without-mingle",
        "--hostname",
        args.hostname or default_name,
    ]
    if settings.is_filesystem_broker:
        argv.append("--without-heartbeat")
    app.worker_main(argv)
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """Embedded mode: migrate, then supervise a listener, an inference worker, a
    dispatch worker (its own process: a dead destination never holds up
    inference, nor a long job a delivery) and the API."""
    from worker import metrics
    from worker.admin.api import check_bind

    _setup(settings, "run")
    check_bind(settings)
    cmd_db_upgrade(settings, args)
    _identity_keys(settings)  # the embedded mode's key, created in the data dir if missing
    metrics.clear(settings.metrics_path)  # a fresh start for this node's counters
    base = [sys.executable, "-m", "worker.cli.main"]
    specs = {
        "listener": [*base, "listen"],
        "worker": [*base, "worker", "--queues", "inference"],
        "dispatcher": [*base, "worker", "--queues", "dispatch"],
        "api": [*base, "api"],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stop = threading.Event()

    def spawn(name: str) -> None:
        env = dict(os.environ)
        if name != "listener":
            # one process can serve PACS_AI_METRICS_PORT; the API serves them all anyway
            env.pop("PACS_AI_METRICS_PORT", None)
        # Each part in its own process group, so that a signal to ours (Ctrl-C in
        # a terminal, `kill -- -PGID`) reaches the parts only through us: Celery's
        # pool children hit directly by SIGTERM can leave their parent's warm
        # shutdown waiting forever. The part still ends when we die (SIGKILL).
        procs[name] = subprocess.Popen(
            specs[name], env=env, start_new_session=True, preexec_fn=_parent_death_signal
        )
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
    # each part stops on its own within a few seconds (a running job is left
    # to the lease and requeued); whatever is still there after the grace
    # period is killed, so a stop never takes longer than an init system waits
    started = time.monotonic()
    deadline = started + settings.stop_grace_seconds
    for name, proc in procs.items():
        try:
            rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            log.info("%s stopped (status %s) after %.1f s", name, rc, time.monotonic() - started)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s still running %.0f s after SIGTERM; killing it",
                name,
                settings.stop_grace_seconds,
            )
            proc.kill()
            proc.wait(5)
    log.info("pacs-ai stopped")
    return exit_code


def cmd_studies_list(settings: Settings, args: argparse.Namespace) -> int:
    _check_schema(settings)  # one readable line, not a traceback, on a missing schema
    from db.queries import list_studies
    from db.session import session_scope
    from dicomnode import identity

    ring = _key_ring(settings) if args.accession is not None or args.identifiers else None
    try:
        with session_scope(settings.effective_database_url) as session:
            if ring is None:
                rows = list_studies(session, limit=args.limit)
            else:
                rows = identity.list_studies(
                    session,
                    ring,
                    accession=args.accession,
                    reveal_identifiers=args.identifiers,
                    limit=args.limit,
                )
    except identity.KeyFileError as exc:
        raise CliError(str(exc)) from None
    for row in rows if args.identifiers and not args.json else ():
        found = row.get("identifiers") or {}
        row["patient_id"] = found.get("patient_id")
        row["accession_number"] = found.get("accession_number")
    _print_rows(
        rows,
        args.json,
        [
            "study_instance_uid",
            "patient",
            "modalities",
            "num_series",
            "num_instances",
            "status",
            "received_at",
            "pruned_at",
            *(["patient_id", "accession_number"] if args.identifiers else []),
        ],
    )
    if args.accession is not None and not rows:
        raise CliError("no study has this accession number")
    return 0


def _key_ring(settings: Settings) -> Any:
    """The secret key of patient linkage and identifiers (dicomnode/identity.py)."""
    from dicomnode.identity import KeyRing

    return KeyRing(
        settings.secret_key_path, settings.secret_key_is_default, settings.effective_database_url
    )


def cmd_audit_list(settings: Settings, args: argparse.Namespace) -> int:
    """The audit log, newest first (worker/admin/audit.py)."""
    _check_schema(settings)
    from db.queries import list_audit
    from db.session import session_scope

    with session_scope(settings.effective_database_url) as session:
        rows = list_audit(session, limit=args.limit, study_uid=args.study)
    _print_rows(
        rows, args.json, ["at", "interface", "actor", "source", "action", "studies", "outcome"]
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
    from worker.pipeline.registry import discover

    rows = [m.to_dict() for m in discover(settings.models_path)]
    _print_rows(rows, args.json, ["name", "version", "task", "enabled", "findings", "error"])
    return 0


def cmd_models_check(settings: Settings, args: argparse.Namespace) -> int:
    """Verify hashes, load each model, run a dummy input; non-zero if any is broken."""
    from worker.pipeline.inference import RuntimeOptions, check_model
    from worker.pipeline.registry import discover

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
    from worker.services.studies import ResultFilter, list_results

    where = ResultFilter(
        args.study,
        args.model,
        args.finding,
        args.present,
        args.since,
        args.until,
        args.min_probability,
    )
    rows = list_results(settings, where, args.limit)
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


def cmd_patients_trend(settings: Settings, args: argparse.Namespace) -> int:
    """One patient's nodule volumes over time, by the patient handle (a study's
    ``patient`` field): the same object as ``GET /api/patients/{patient}/trend``."""
    _check_schema(settings)  # one readable line, not a traceback, on a missing schema
    from worker.services.patients import patient_trend

    try:
        trend = patient_trend(settings, args.patient)
    except (ValueError, LookupError) as exc:
        raise CliError(str(exc)) from None
    if args.json:
        json.dump(trend, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    rows = [
        {"study_date": s["study_date"], "study_instance_uid": s["study_instance_uid"], **f}
        for s in trend["studies"]
        for f in s["findings"] or [{}]
    ]
    print(f"patient {trend['patient']}: {len(trend['studies'])} studies")
    _print_rows(
        rows,
        False,
        [
            "study_date",
            "study_instance_uid",
            "model",
            "finding",
            "volume_ml",
            "change_percent",
            "doubling_time_days",
        ],
    )
    return 0


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    """The admin API and dashboard (blocks until SIGINT/SIGTERM)."""
    from worker.admin.api import check_bind, serve

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
    from db.session import session_scope
    from worker.scheduling.celery_app import create_app
    from worker.services.studies import ReprocessRefused, reprocess_study

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
            done = reprocess_study(settings, app, uid)
        except LookupError:
            print(f"skipped study {uid}: not found", file=sys.stderr)
            continue
        except ReprocessRefused as exc:
            print(f"skipped {exc}", file=sys.stderr)
            continue
        queued[done.job_id] = uid
        note = "" if done.sent else " (broker unreachable: the reconciler will send it)"
        print(f"queued job {done.job_id} for study {uid}{note}")
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
                if status in {"done", "failed", "superseded"}:
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
    from worker.services.studies import DeliveryFilter, list_deliveries

    rows = list_deliveries(settings, DeliveryFilter(args.study, args.status, args.job), args.limit)
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


def cmd_deliveries_backlog(settings: Settings, args: argparse.Namespace) -> int:
    """Pending deliveries per destination; overdue: pending longer than
    PACS_AI_DELIVERY_ALERT_MINUTES. Exit status 1 when any is overdue (for checks)."""
    _check_schema(settings)
    from db.models import utcnow
    from db.queries import delivery_backlog
    from db.session import session_scope

    with session_scope(settings.effective_database_url) as session:
        rows = delivery_backlog(
            session,
            utcnow(),
            dt.timedelta(minutes=settings.delivery_alert_minutes),
            [d.name for d in settings.destination_list],
        )
    _print_rows(
        rows,
        args.json,
        ["destination", "pending", "overdue", "oldest_pending_at", "last_error"],
    )
    return EXIT_FAILURE if any(r["overdue"] for r in rows) else 0


def cmd_resend(settings: Settings, args: argparse.Namespace) -> int:
    """Make the deliveries of a study (or job) pending again and queue them."""
    _check_schema(settings)
    from worker.scheduling.celery_app import create_app
    from worker.services.studies import resend

    ids, sent = resend(settings, create_app(settings), study_uid=args.study, job_id=args.job)
    if not ids:
        raise CliError("no deliveries for this study or job")
    note = "" if sent == len(ids) else " (the broker is unreachable; the listener will queue them)"
    print(f"{len(ids)} deliveries pending again{note}")
    return 0


def cmd_complete(settings: Settings, args: argparse.Namespace) -> int:
    """Complete a study now: queue its job without waiting for the quiet period
    or the PACS's counts (the same as ``POST /api/studies/{uid}/complete``)."""
    _check_schema(settings)
    from worker.scheduling.celery_app import create_app
    from worker.scheduling.completion import NothingToComplete, complete_now

    _setup(settings, "cli")
    try:
        done = complete_now(settings, create_app(settings), args.study)
    except LookupError:
        raise CliError(f"no study {args.study}") from None
    except NothingToComplete as exc:
        raise CliError(str(exc)) from None
    note = "" if done.sent else " (broker unreachable: the reconciler will send it)"
    print(f"queued job {done.job_id} for study {args.study}{note}")
    return 0


def cmd_prune(settings: Settings, args: argparse.Namespace) -> int:
    """Delete the stored files of studies past PACS_AI_RETENTION_HOURS (the
    listener also does it periodically); --dry-run only lists them."""
    _check_schema(settings)
    from worker.scheduling.retention import prune_audit_once, prune_once

    _setup(settings, "cli")
    if not args.dry_run:
        _setup_metrics(settings)
    pruned = prune_once(settings, dry_run=args.dry_run)
    audit_removed = 0 if args.dry_run else prune_audit_once(settings)
    files = sum(p.files for p in pruned)
    size = sum(p.bytes for p in pruned)
    if args.json:
        body = {
            "dry_run": args.dry_run,
            "retention_hours": settings.retention_hours,
            "studies": [p.to_dict() for p in pruned],
            "files": files,
            "bytes": size,
            "audit_records_deleted": audit_removed,
        }
        json.dump(body, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if audit_removed:
        print(
            f"deleted {audit_removed} audit records older than "
            f"PACS_AI_AUDIT_RETENTION_DAYS={settings.audit_retention_days:g}"
        )
    if settings.retention_hours <= 0:
        print("retention is off (PACS_AI_RETENTION_HOURS=0): nothing is pruned")
        return 0
    verb = "would prune" if args.dry_run else "pruned"
    for p in pruned:
        note = f", {p.errors} could not be deleted" if p.errors else ""
        print(f"{verb} study {p.study_instance_uid}: {p.files} files, {p.bytes} bytes{note}")
    print(
        f"{verb} {len(pruned)} studies: {files} files, {size / 1024**2:.1f} MiB "
        f"(PACS_AI_RETENTION_HOURS={settings.retention_hours:g})"
    )
    return 0


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    """Write a study's images and pacs-ai's objects de-identified (PS3.15 Annex E
    Basic Application Level Confidentiality Profile) with a manifest."""
    _check_schema(settings)
    from dicomnode.deid import DeidError, Options
    from worker.results.export import ExportError, export_study

    options = Options(retain_dates=args.retain_dates, clean_descriptors=args.clean_descriptors)
    try:
        report = export_study(settings, args.study, Path(args.deidentify), options)
    except (ExportError, DeidError, ValueError) as exc:
        raise CliError(str(exc)) from None
    if args.json:
        json.dump(report.manifest(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(report.manifest()["counts"].items()))
    left = sum(report.skipped.values())
    print(f"exported {len(report.files)} files ({counts}) to {args.deidentify}, {left} left out")
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

    add(
        "run",
        cmd_run,
        "embedded mode: listener, inference and dispatch workers and API in one command",
    )
    li = add("listen", cmd_listen, "run the DICOM listener, study assembler and reconciler")
    li.add_argument(
        "--processes",
        type=int,
        help="listener processes sharing the port (PACS_AI_LISTENER_PROCESSES)",
    )
    li.add_argument("--listen-fds", help=argparse.SUPPRESS)  # from the first listener process
    li.add_argument(
        "--no-scheduler",
        action="store_true",
        help="listen only: no assembler, reconciler or retention here, no extra processes "
        "(another `pacs-ai listen` runs them)",
    )
    w = add("worker", cmd_worker, "run a Celery worker for the inference and dispatch queues")
    w.add_argument(
        "--concurrency",
        type=int,
        help="worker processes (PACS_AI_WORKER_CONCURRENCY; PACS_AI_DISPATCH_CONCURRENCY "
        "with --queues dispatch)",
    )
    w.add_argument(
        "--queues",
        help="comma-separated: inference, dispatch or both (the default); run one worker "
        "per queue so that a dead destination never holds up inference",
    )
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
    s.add_argument("--accession", metavar="A", help="only the studies with this accession number")
    s.add_argument(
        "--identifiers",
        action="store_true",
        help="show each study's patient ID and accession number (kept encrypted)",
    )
    audit = sub.add_parser("audit", help="the audit log").add_subparsers(
        dest="audit_command", required=True, metavar="COMMAND"
    )
    au = add("list", cmd_audit_list, "who read or changed what, newest first", audit)
    au.add_argument("--json", action="store_true", help="print a JSON array")
    au.add_argument("--study", help="only records about this Study Instance UID")
    au.add_argument("--limit", type=int, default=50, help="records to show (default 50)")

    jobs = sub.add_parser("jobs", help="processing jobs").add_subparsers(
        dest="jobs_command", required=True, metavar="COMMAND"
    )
    j = add("list", cmd_jobs_list, "list jobs, newest first", jobs)
    j.add_argument("--json", action="store_true", help="print a JSON array")
    j.add_argument("--status", choices=["queued", "running", "done", "failed", "superseded"])
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

    patients = sub.add_parser(
        "patients", help="a patient's studies, by its handle (no identifiers)"
    ).add_subparsers(dest="patients_command", required=True, metavar="COMMAND")
    pt = add(
        "trend",
        cmd_patients_trend,
        "a patient's nodule volumes, change and doubling time, oldest study first",
        patients,
    )
    pt.add_argument(
        "patient",
        metavar="PATIENT",
        help="the patient handle: a study's `patient` field (studies list --json), "
        "or at least its first 8 hex digits",
    )
    pt.add_argument("--json", action="store_true", help="print a JSON object")

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
    bl = add(
        "backlog",
        cmd_deliveries_backlog,
        "pending deliveries per destination (exit status 1 when some wait longer than "
        "PACS_AI_DELIVERY_ALERT_MINUTES)",
        deliveries,
    )
    bl.add_argument("--json", action="store_true", help="print a JSON array")
    rs = add("resend", cmd_resend, "send a study's (or job's) result objects again")
    target = rs.add_mutually_exclusive_group(required=True)
    target.add_argument("--study", help="Study Instance UID")
    target.add_argument("--job", type=int, help="job id")
    cp = add(
        "complete",
        cmd_complete,
        "complete a study now: queue its job without waiting for the quiet period",
    )
    cp.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    pr = add(
        "prune",
        cmd_prune,
        "delete the stored files of finished studies older than PACS_AI_RETENTION_HOURS",
    )
    pr.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    pr.add_argument("--json", action="store_true", help="print a JSON object")
    ex = add("export", cmd_export, "write a study de-identified (PS3.15 Annex E basic profile)")
    ex.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    ex.add_argument("--deidentify", required=True, metavar="DIR", help="new or empty folder")
    ex.add_argument(
        "--retain-dates",
        action="store_true",
        help="Retain Longitudinal Temporal Information (full dates) option",
    )
    ex.add_argument("--clean-descriptors", action="store_true", help="Clean Descriptors option")
    ex.add_argument("--json", action="store_true", help="print the manifest")
    return parser


def foreign_packages() -> list[str]:
    """Our top-level import names (``worker``, ``dicomnode``, ``db``) that resolve
    to another distribution's files: installed into a shared environment, a
    package of the same name would shadow ours or be shadowed by it."""
    import importlib

    home = Path(__file__).resolve().parents[2]
    out = []
    for name in ("dicomnode", "db"):
        module = importlib.import_module(name)
        where = Path(getattr(module, "__file__", "") or "").resolve()
        if where.parent.parent != home:
            out.append(f"{name} ({where.parent})")
    return out


#: long-running services; the API requests they serve are audited (worker/admin/audit.py)
SERVICE_COMMANDS = frozenset({"run", "listen", "worker", "api"})


def _exit_status(exc: BaseException) -> int:
    """The exit status :func:`main` gives a command that raised ``exc`` (audit log)."""
    if isinstance(exc, SettingsError):
        return EXIT_CONFIG
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    foreign = foreign_packages()
    if foreign:
        print(
            f"pacs-ai: {', '.join(foreign)} is not pacs-ai's own package; install pacs-ai "
            "into its own virtualenv (scripts/setup.sh does)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        settings = load_settings()
        if args.command in SERVICE_COMMANDS:  # they run for days: not audited as commands
            return int(args.func(settings, args))
        from worker.cli.audit import run_audited

        return run_audited(settings, args, argv, _exit_status)  # the command, then its record
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
