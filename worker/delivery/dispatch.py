"""Delivering result objects: the dispatch task's work and its scheduling.

The database drives delivery. A delivery row is ``pending`` until an attempt
succeeds (``sent``), fails permanently, or fails transiently when the delivery
is older than ``PACS_AI_DELIVERY_MAX_AGE_HOURS`` (``failed``; its age counts
from ``created_at``, which a manual resend restarts). The number of attempts
never ends a delivery (``PACS_AI_DELIVERY_MAX_ATTEMPTS`` is ignored): a
destination down for days still gets every object once it is back. After a
transient failure the next attempt is due after an exponential back-off
(``PACS_AI_DELIVERY_RETRY_BASE`` * 2^(attempts-1), at most
``PACS_AI_DELIVERY_RETRY_MAX`` seconds, and never after the delivery's maximum
age, so the last attempt comes right at it); the scheduler in the listener sends
due deliveries to the ``dispatch`` queue, served by its own worker process
(``pacs-ai worker --queues dispatch``), so nothing is lost when the PACS, the
broker or a worker is down and a dead destination never holds up inference. An
attempt claims its row with a lease, so two messages for the same row never
send it twice at once. Each destination sends by its own protocol
(``dest.send``: C-STORE, STOW-RS ..., ``dicomnode/protocols/``); dispatch only
applies the outcomes.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from celery import Celery

from db.models import DeliveryStatus, utcnow
from db.queries import delivery_destinations, first_results_of_studies
from db.repo import claim_delivery, due_deliveries, finish_delivery, mark_deliveries_enqueued
from db.session import session_scope
from dicomnode.protocols import Destination, SendContext, SendResult
from worker import metrics
from worker.scheduling.celery_app import DISPATCH_QUEUE, DISPATCH_TASK
from worker.settings import Settings

log = logging.getLogger(__name__)

_apps: dict[int, Celery] = {}


def use_app(settings: Settings, app: Celery) -> None:
    """Send with ``app`` (the worker's own) for these settings."""
    _apps[id(settings)] = app


def _app(settings: Settings) -> Celery:
    """A Celery app for sending (one per settings object and process)."""
    key = id(settings)
    app = _apps.get(key)
    if app is None:
        from worker.scheduling.celery_app import create_app

        app = _apps[key] = create_app(settings)
    return app


def backoff_seconds(attempts: int, settings: Settings) -> float:
    """Delay before the next attempt after ``attempts`` failed ones."""
    exponent = min(max(0, attempts - 1), 60)  # 2^60 * base exceeds any maximum
    return float(min(settings.delivery_retry_max, settings.delivery_retry_base * 2**exponent))


def give_up_at(created_at: dt.datetime, settings: Settings) -> dt.datetime:
    """When transient failures of a delivery created at ``created_at`` stop being retried."""
    return created_at + dt.timedelta(hours=settings.delivery_max_age_hours)


def next_retry_at(
    created_at: dt.datetime, attempts: int, now: dt.datetime, settings: Settings
) -> dt.datetime | None:
    """After a transient failure: when to try again, or None to give up (too old).

    The back-off is capped by ``PACS_AI_DELIVERY_RETRY_MAX``, and the last
    attempt is due when the delivery reaches ``PACS_AI_DELIVERY_MAX_AGE_HOURS``.
    """
    deadline = give_up_at(created_at, settings)
    if now >= deadline:
        return None
    return min(now + dt.timedelta(seconds=backoff_seconds(attempts, settings)), deadline)


def enqueue_deliveries(settings: Settings, ids: list[int], app: Celery | None = None) -> int:
    """Send delivery ids to the dispatch queue, one message per destination.

    Returns how many ids were sent; those not sent stay due for the scheduler."""
    if not ids:
        return 0
    with session_scope(settings.effective_database_url) as session:
        rows = delivery_destinations(session, ids)
    by_dest: dict[str, list[int]] = defaultdict(list)
    for delivery_id, destination in rows:
        by_dest[str(destination)].append(int(delivery_id))
    return _send(settings, app or _app(settings), by_dest)


def _send(settings: Settings, app: Celery, by_dest: dict[str, list[int]]) -> int:
    sent = 0
    for destination, group in by_dest.items():
        try:
            app.send_task(DISPATCH_TASK, args=[group], queue=DISPATCH_QUEUE)
        except Exception as exc:
            log.warning(
                "deliveries to %s could not be sent to the broker (%s); will retry",
                destination,
                type(exc).__name__,
            )
            continue
        with session_scope(settings.effective_database_url) as session:
            mark_deliveries_enqueued(session, group)
        sent += len(group)
    return sent


def dispatch_due_once(settings: Settings, app: Celery, now: dt.datetime | None = None) -> int:
    """Send every due pending delivery that has no live message (the scheduler)."""
    now = now or utcnow()
    resend_before = now - dt.timedelta(seconds=settings.requeue_after_seconds)
    with session_scope(settings.effective_database_url) as session:
        due = due_deliveries(session, now, resend_before)
    if not due:
        return 0
    by_dest: dict[str, list[int]] = defaultdict(list)
    for delivery_id, destination in due:
        by_dest[destination].append(delivery_id)
    return _send(settings, app, by_dest)


@dataclass(frozen=True, slots=True)
class _Claimed:
    id: int
    destination: str
    rel_path: str
    sop_instance_uid: str
    attempts: int
    created_at: dt.datetime


def dispatch_deliveries(ids: list[int], settings: Settings) -> dict[str, int]:
    """One attempt for each due pending delivery in ``ids``; returns counts by outcome."""
    url = settings.effective_database_url
    lease = settings.dispatch_timeout * (len(ids) + 2)
    claimed: list[_Claimed] = []
    with session_scope(url) as session:
        for delivery_id in ids:
            row = claim_delivery(session, int(delivery_id), lease)
            if row is not None:
                claimed.append(
                    _Claimed(
                        row.id,
                        row.destination,
                        row.rel_path,
                        row.sop_instance_uid,
                        row.attempts,
                        row.created_at,
                    )
                )
    counts = {"sent": 0, "retry": 0, "failed": 0, "skipped": len(ids) - len(claimed)}
    destinations = {d.name: d for d in settings.destination_list}
    by_dest: dict[str, list[_Claimed]] = defaultdict(list)
    for item in claimed:
        by_dest[item.destination].append(item)
    for name, items in by_dest.items():
        dest = destinations.get(name)
        started = time.monotonic()
        if dest is None:
            results = [
                SendResult("permanent", f"destination {name} is no longer configured")
            ] * len(items)
        else:
            results = _send_to(dest, items, settings)
        per_item = (time.monotonic() - started) / len(items)
        with session_scope(url) as session:
            sent_ids = []
            for item, result in zip(items, results, strict=True):
                outcome = _record(session, item, result, settings)
                counts[outcome] += 1
                metrics.record_dispatch(outcome, per_item)
                if outcome == "sent":
                    sent_ids.append(item.id)
            if sent_ids and metrics.enabled():
                _record_delivered_latency(session, sent_ids)
    if claimed:
        log.info(
            "dispatch: %d sent, %d to retry, %d failed, %d skipped",
            counts["sent"],
            counts["retry"],
            counts["failed"],
            counts["skipped"],
        )
    return counts


def _record_delivered_latency(session: Any, delivery_ids: list[int]) -> None:
    """End to end, last received instance -> results at this destination: once per
    job and destination batch, for the study's first job after its last instance
    (not for a reprocessed study)."""
    now = utcnow()
    for last_at in first_results_of_studies(session, delivery_ids):
        metrics.record_study_latency("delivered", (now - last_at).total_seconds())


def send_context(settings: Settings) -> SendContext:
    """What every destination's ``send`` needs from the settings."""
    return SendContext(
        calling_ae=settings.ae_title,
        timeout=settings.dispatch_timeout,
        tls_ca_file=settings.tls_ca_file,
        tls_cert_file=settings.tls_cert_file,
        tls_key_file=settings.tls_key_file,
        dicomweb_token=settings.dicomweb_token,
    )


def _send_to(dest: Destination, items: list[_Claimed], settings: Settings) -> list[SendResult]:
    """Send the items' files by the destination's own protocol (never raises)."""
    paths = [settings.outbox_path / item.rel_path for item in items]
    try:
        results = dest.send(paths, send_context(settings))
    except Exception as exc:  # a protocol bug: retry later rather than keep the lease
        log.exception("sending to %s failed unexpectedly", dest.name)
        return [SendResult("transient", f"send failed ({type(exc).__name__})")] * len(items)
    if len(results) != len(items):
        log.error("%s returned %d results for %d files", dest.name, len(results), len(items))
        return [SendResult("transient", "send returned no result for every file")] * len(items)
    return results


def _record(session: Any, item: _Claimed, result: SendResult, settings: Settings) -> str:
    if result.outcome == "sent":
        finish_delivery(session, item.id, DeliveryStatus.SENT)
        log.info("delivery %d sop=%s sent to %s", item.id, item.sop_instance_uid, item.destination)
        return "sent"
    now = utcnow()
    retry_at = (
        next_retry_at(item.created_at, item.attempts, now, settings)
        if result.outcome == "transient"
        else None
    )
    if retry_at is not None:
        finish_delivery(
            session, item.id, DeliveryStatus.PENDING, error=result.message, retry_at=retry_at
        )
        log.warning(
            "delivery %d to %s: %s; attempt %d, next in %.0f s",
            item.id,
            item.destination,
            result.message,
            item.attempts,
            (retry_at - now).total_seconds(),
        )
        return "retry"
    error = result.message
    if result.outcome == "transient":
        hours = (now - item.created_at).total_seconds() / 3600
        error = (
            f"{error} (gave up after {item.attempts} attempts over {hours:.1f} h: "
            f"older than PACS_AI_DELIVERY_MAX_AGE_HOURS={settings.delivery_max_age_hours:g})"
        )
    finish_delivery(session, item.id, DeliveryStatus.FAILED, error=error)
    log.warning("delivery %d to %s failed: %s", item.id, item.destination, error)
    return "failed"
