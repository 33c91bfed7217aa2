"""Celery tasks: thin wrappers that take ids only."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.signals import worker_ready

from worker.delivery.dispatch import dispatch_deliveries, use_app
from worker.pipeline.run import process_study
from worker.scheduling.celery_app import DISPATCH_TASK, PROCESS_JOB_TASK
from worker.scheduling.jobs import run_job
from worker.settings import Settings

log = logging.getLogger(__name__)

#: transient errors (database or broker down) are retried this often, ...
JOB_MAX_RETRIES = 60


def job_retry_delay(tries: int) -> float:
    """... after 5, 10, 15 ... up to 60 s: a 60 s outage is covered by the 5th
    retry, and a job waits at most about an hour in all."""
    return float(min(60, 5 * (tries + 1)))


def register_tasks(app: Celery) -> None:
    settings: Settings = app.conf.pacs_ai_settings

    @app.task(name=PROCESS_JOB_TASK, bind=True, max_retries=None)
    def process_job(self: Task, job_id: int) -> str:
        tries = int(self.request.retries or 0)
        task_id = self.request.id or ""
        try:
            return run_job(
                int(job_id),
                settings,
                processor=process_study,
                owner=f"{task_id}/{tries}" if task_id else None,
                # an earlier try left the lease held (it could not release it):
                # take it over without counting an attempt
                takeover_prefix=f"{task_id}/" if task_id else None,
            )
        except Exception as exc:  # transient only: run_job handles the rest
            if tries >= JOB_MAX_RETRIES:
                log.error(
                    "job %s: transient errors for %d tries (%s); the reconciler sends it "
                    "again once its lease has expired",
                    job_id,
                    tries + 1,
                    type(exc).__name__,
                )
                return "retries exhausted"
            delay = job_retry_delay(tries)
            log.warning(
                "job %s hit a transient error (%s); retrying in %.0f s",
                job_id,
                type(exc).__name__,
                delay,
            )
            raise self.retry(countdown=delay) from None

    use_app(settings, app)

    @app.task(name=DISPATCH_TASK, bind=True, max_retries=None)
    def dispatch(self: Task, delivery_ids: list[int]) -> dict[str, int]:
        """One attempt per delivery; back-off and retries are kept in the database."""
        try:
            return dispatch_deliveries([int(i) for i in delivery_ids], settings)
        except Exception as exc:  # database briefly down: the scheduler re-sends
            log.warning("dispatch hit an error (%s); deliveries stay pending", type(exc).__name__)
            return {}

    @worker_ready.connect(weak=False)
    def _reconcile_at_start(**_: Any) -> None:
        from worker.delivery.dispatch import dispatch_due_once
        from worker.scheduling.scheduler import reconcile_once

        try:
            reconcile_once(settings, app)
            dispatch_due_once(settings, app)
        except Exception as exc:  # never stop the worker for this
            log.warning("start-up reconcile failed (%s)", type(exc).__name__)
