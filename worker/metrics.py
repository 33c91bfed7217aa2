"""Prometheus metrics, shared by every pacs-ai process of a host.

prometheus-client runs in *multiprocess mode*: each process (listener, API,
every Celery pool process) writes its samples into memory-mapped files in
``PACS_AI_METRICS_DIR`` (default ``<data dir>/metrics``), and ``GET /metrics``
of the API sums them. An entry point calls :func:`setup` before anything
records a sample; until then (unit tests, library use) every ``record_*``
function is a no-op. Library code never imports prometheus_client itself.

``pacs-ai run`` empties the folder when it starts. Processes started one by one
(``listen``, ``worker``, ``api``) keep what is there: counters then continue
across restarts, which Prometheus handles either way.

Workers on other hosts do not share the folder: set ``PACS_AI_METRICS_PORT``
there and ``pacs-ai worker`` / ``pacs-ai listen`` serve their own ``/metrics``.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"

#: seconds; from a fraction of a second (a small study) to an hour (a queue backlog)
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass
class _Metrics:
    instances: Any
    duplicates: Any
    received_bytes: Any
    associations: Any
    cstore_failures: Any
    jobs_finished: Any
    queue_wait: Any
    job_duration: Any
    model_stage: Any
    decode: Any
    dispatch: Any
    deliveries: Any
    study_latency: Any
    pruned_studies: Any
    pruned_bytes: Any


_lock = threading.Lock()
_metrics: _Metrics | None = None
_directory: Path | None = None


def setup(directory: Path, clear: bool = False) -> None:
    """Turn on multiprocess metrics for this process (and its forked children).

    Idempotent. ``clear`` empties the folder first (``pacs-ai run`` at start).
    """
    global _metrics, _directory
    with _lock:
        if clear and directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        os.environ[ENV] = str(directory)
        if _metrics is not None and _directory == directory:
            return
        from prometheus_client import values

        # prometheus_client chooses its value class when it is first imported;
        # choose again now that the folder is known, whatever imported it first.
        values.ValueClass = values.get_value_class()
        _directory = directory
        _metrics = _create()


def clear(directory: Path) -> None:
    """Empty the folder (``pacs-ai run`` before it starts its processes)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)


def _create() -> _Metrics:
    from prometheus_client import Counter, Histogram

    # registry=None: these are read through the multiprocess files, never the
    # default registry (so set-up may run again, e.g. in tests).
    return _Metrics(
        instances=Counter(
            "pacs_ai_instances_received_total",
            "DICOM instances received and stored (new)",
            registry=None,
        ),
        duplicates=Counter(
            "pacs_ai_instances_duplicate_total",
            "DICOM instances received again (already stored; answered success, ignored)",
            registry=None,
        ),
        received_bytes=Counter(
            "pacs_ai_received_bytes_total",
            "bytes of DICOM instances received and stored",
            registry=None,
        ),
        associations=Counter(
            "pacs_ai_associations_total",
            "DICOM associations by result",
            ["result"],
            registry=None,
        ),
        cstore_failures=Counter(
            "pacs_ai_cstore_failures_total",
            "C-STORE requests answered with a failure, by DICOM status",
            ["status"],
            registry=None,
        ),
        jobs_finished=Counter(
            "pacs_ai_jobs_finished_total",
            "jobs that finished, by final status",
            ["status"],
            registry=None,
        ),
        queue_wait=Histogram(
            "pacs_ai_job_queue_wait_seconds",
            "time from a job's creation to the start of its run",
            buckets=_BUCKETS,
            registry=None,
        ),
        job_duration=Histogram(
            "pacs_ai_job_duration_seconds",
            "time a job ran, by final status",
            ["status"],
            buckets=_BUCKETS,
            registry=None,
        ),
        model_stage=Histogram(
            "pacs_ai_model_stage_seconds",
            "time of one model on one series, by stage (preprocess, inference, postprocess)",
            ["model", "stage"],
            buckets=_BUCKETS,
            registry=None,
        ),
        decode=Histogram(
            "pacs_ai_series_decode_seconds",
            "time to read and decode the series of one job",
            buckets=_BUCKETS,
            registry=None,
        ),
        dispatch=Histogram(
            "pacs_ai_dispatch_seconds",
            "time of one delivery attempt (C-STORE of one result object), by outcome: "
            "sent, retry (transient failure), failed",
            ["status"],
            buckets=_BUCKETS,
            registry=None,
        ),
        deliveries=Counter(
            "pacs_ai_deliveries_total",
            "delivery attempts, by outcome: sent, retry, failed",
            ["status"],
            registry=None,
        ),
        study_latency=Histogram(
            "pacs_ai_study_latency_seconds",
            "end to end: from a study's last received instance to its results being "
            "stored (stage=results) and delivered to a destination (stage=delivered)",
            ["stage"],
            buckets=_BUCKETS,
            registry=None,
        ),
        pruned_studies=Counter(
            "pacs_ai_pruned_studies_total",
            "studies whose stored files retention deleted (PACS_AI_RETENTION_HOURS)",
            registry=None,
        ),
        pruned_bytes=Counter(
            "pacs_ai_pruned_bytes_total",
            "bytes of instance files and outbox objects deleted by retention",
            registry=None,
        ),
    )


def enabled() -> bool:
    return _metrics is not None


def _safe(action: Callable[[_Metrics], None]) -> None:
    """Metrics never break the work they measure."""
    m = _metrics
    if m is None:
        return
    try:
        action(m)
    except Exception as exc:  # noqa: BLE001 - a full disk must not fail a C-STORE
        log.debug("metrics update failed (%s)", type(exc).__name__)


# -- listener ------------------------------------------------------------------


def record_association(accepted: bool) -> None:
    _safe(lambda m: m.associations.labels("accepted" if accepted else "rejected").inc())


def record_instance(size_bytes: int, duplicate: bool) -> None:
    def act(m: _Metrics) -> None:
        if duplicate:
            m.duplicates.inc()
        else:
            m.instances.inc()
            m.received_bytes.inc(size_bytes)

    _safe(act)


def record_cstore_failure(status: int) -> None:
    _safe(lambda m: m.cstore_failures.labels(f"0x{status:04X}").inc())


# -- worker --------------------------------------------------------------------


def record_job_started(queue_wait_s: float) -> None:
    _safe(lambda m: m.queue_wait.observe(max(0.0, queue_wait_s)))


def record_job_finished(status: str, duration_s: float) -> None:
    def act(m: _Metrics) -> None:
        m.jobs_finished.labels(status).inc()
        m.job_duration.labels(status).observe(max(0.0, duration_s))

    _safe(act)


def record_model_timings(model: str, timings: dict[str, float]) -> None:
    """``timings`` as the pipeline keeps them: ``preprocess_s``, ``inference_s`` ..."""

    def act(m: _Metrics) -> None:
        for key, seconds in timings.items():
            m.model_stage.labels(model, key.removesuffix("_s")).observe(max(0.0, seconds))

    _safe(act)


def record_decode(seconds: float) -> None:
    _safe(lambda m: m.decode.observe(max(0.0, seconds)))


def record_study_latency(stage: str, seconds: float) -> None:
    _safe(lambda m: m.study_latency.labels(stage).observe(max(0.0, seconds)))


def record_dispatch(status: str, seconds: float) -> None:
    def act(m: _Metrics) -> None:
        m.dispatch.labels(status).observe(max(0.0, seconds))
        m.deliveries.labels(status).inc()

    _safe(act)


# -- retention -----------------------------------------------------------------


def record_pruned(size_bytes: int) -> None:
    """One study pruned by retention, ``size_bytes`` freed."""

    def act(m: _Metrics) -> None:
        m.pruned_studies.inc()
        m.pruned_bytes.inc(max(0, size_bytes))

    _safe(act)


# -- exposition ----------------------------------------------------------------


def registry(extra: Iterable[Any] = ()) -> Any:
    """A registry summing every process's files (plus ``extra`` collectors)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    reg = CollectorRegistry()
    if _directory is not None:
        MultiProcessCollector(reg, path=str(_directory))
    for collector in extra:
        reg.register(collector)
    return reg


def exposition(extra: Iterable[Any] = ()) -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry(extra)), CONTENT_TYPE_LATEST


def serve(port: int, host: str = "0.0.0.0") -> None:  # noqa: S104 - scraped over the network
    """Serve this host's metrics on ``port`` in a background thread (metrics only)."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host, registry=registry())
    log.info("metrics on http://%s:%d/metrics", host, port)


def gauge_family(name: str, documentation: str, label: str, counts: dict[str, int]) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(counts.items()):
        family.add_metric([key], value)
    return family


class StorageCollector:
    """Free space of the storage file system, read at scrape time:
    ``pacs_ai_storage_free_bytes`` and ``pacs_ai_storage_below_watermark`` (1 when
    it is under ``PACS_AI_MIN_FREE_MB``, the listener then refuses instances)."""

    def __init__(self, read: Callable[[], tuple[float, float]]) -> None:
        self._read = read  # -> (free bytes, watermark bytes)

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            free, watermark = self._read()
        except OSError as exc:
            log.warning("metrics: cannot read the storage's free space (%s)", type(exc).__name__)
            return
        yield GaugeMetricFamily(
            "pacs_ai_storage_free_bytes",
            "bytes available on the storage file system",
            value=free,
        )
        yield GaugeMetricFamily(
            "pacs_ai_storage_below_watermark",
            "1 when the storage's free space is below PACS_AI_MIN_FREE_MB, else 0",
            value=1.0 if free < watermark else 0.0,
        )


class DatabaseCollector:
    """Current counts read from the database at scrape time (jobs by status, ...)."""

    def __init__(self, read: Callable[[], dict[str, dict[str, int]]]) -> None:
        self._read = read

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Any]:
        try:
            counts = self._read()
        except Exception as exc:  # noqa: BLE001 - database down: scrape the rest
            log.warning("metrics: cannot read counts from the database (%s)", type(exc).__name__)
            return
        docs = {
            "jobs": "jobs in the database, by status",
            "deliveries": "deliveries in the database, by status",
        }
        for what, values in counts.items():
            yield gauge_family(
                f"pacs_ai_{what}", docs.get(what, f"{what} by status"), "status", values
            )


class BacklogCollector:
    """Pending deliveries per destination, read from the database at scrape time:
    ``pacs_ai_deliveries_overdue{destination}`` (pending longer than
    ``PACS_AI_DELIVERY_ALERT_MINUTES``) and
    ``pacs_ai_delivery_oldest_pending_seconds{destination}``."""

    def __init__(self, read: Callable[[], list[dict[str, Any]]], alert_minutes: float) -> None:
        self._read = read
        self._alert_minutes = alert_minutes

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            rows = self._read()
        except Exception as exc:  # noqa: BLE001 - database down: scrape the rest
            log.warning("metrics: cannot read the delivery backlog (%s)", type(exc).__name__)
            return
        overdue = GaugeMetricFamily(
            "pacs_ai_deliveries_overdue",
            f"deliveries pending for longer than {self._alert_minutes:g} minutes "
            "(PACS_AI_DELIVERY_ALERT_MINUTES), by destination",
            labels=["destination"],
        )
        oldest = GaugeMetricFamily(
            "pacs_ai_delivery_oldest_pending_seconds",
            "age of the oldest pending delivery, by destination (0: none pending)",
            labels=["destination"],
        )
        for row in rows:
            overdue.add_metric([row["destination"]], row["overdue"])
            oldest.add_metric([row["destination"]], row["oldest_age_seconds"] or 0.0)
        yield overdue
        yield oldest
