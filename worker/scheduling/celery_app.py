"""The Celery application, configured from :class:`worker.settings.Settings`.

Messages carry ids only (JSON), are acknowledged after the task ran
(``acks_late``) and go back to the queue if the worker process dies.
"""

from __future__ import annotations

import contextlib
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from worker.settings import Settings

INFERENCE_QUEUE = "inference"
DISPATCH_QUEUE = "dispatch"
PROCESS_JOB_TASK = "pacs_ai.process_job"
DISPATCH_TASK = "pacs_ai.dispatch"

#: seconds between two looks of a worker into the filesystem broker's folder
#: (kombu's default is 1 s, which a job and then its deliveries would each wait)
FILESYSTEM_POLL_SECONDS = 0.05


def _atomic_put(self: Any, queue: str, payload: Any, **kwargs: Any) -> None:
    """kombu's filesystem ``_put``, written whole before it can be seen.

    kombu creates the message file under its final name and then writes it; a
    consumer polling every 50 ms can take the file in between and read an empty
    or partial message (a JSONDecodeError that stops the worker's consumer).
    Here the message is written under a name no queue matches and renamed into
    place, so a reader sees all of it or nothing."""
    import os
    import uuid
    from time import monotonic

    from kombu.exceptions import ChannelError
    from kombu.utils.json import dumps

    name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
    final = os.path.join(self.data_folder_out, name)
    partial = os.path.join(self.data_folder_out, f"_{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(dumps(payload).encode())
        os.replace(partial, final)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise ChannelError(f"cannot add a message to {self.data_folder_out!r}") from exc


def _use_atomic_filesystem_put() -> None:
    from kombu.transport import filesystem

    filesystem.Channel._put = _atomic_put  # type: ignore[method-assign]


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    if settings.is_filesystem_broker:
        _use_atomic_filesystem_put()
        folder = settings.broker_folder
        for sub in ("out", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),  # kombu's default: ./control
            "store_processed": False,
            "polling_interval": FILESYSTEM_POLL_SECONDS,
        }
    # Redis: a message not acknowledged within this time is delivered again.
    return {"visibility_timeout": settings.task_time_limit + 60}


def create_app(settings: Settings) -> Celery:
    app = Celery("pacs_ai", broker=settings.effective_broker_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        task_default_queue=INFERENCE_QUEUE,
        task_routes={
            PROCESS_JOB_TASK: {"queue": INFERENCE_QUEUE},
            "pacs_ai.dispatch*": {"queue": DISPATCH_QUEUE},
        },
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=not settings.is_filesystem_broker,
        broker_heartbeat=0 if settings.is_filesystem_broker else 60,
    )
    app.conf.pacs_ai_settings = settings
    return app


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """A forked pool process must not reuse its parent's connection pools."""
    from db.session import dispose_all

    dispose_all()
