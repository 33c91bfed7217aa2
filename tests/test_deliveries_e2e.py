"""Deliveries left unattended, with real processes (`pacs-ai run`: listener,
inference worker, dispatch worker, API):

- a destination down for longer than the old retry horizon (attempts far past
  PACS_AI_DELIVERY_MAX_ATTEMPTS, here 2) gets every object exactly once when it
  is back, with no manual resend; meanwhile the backlog shows in the API, the
  CLI, the ``pacs_ai_deliveries_overdue`` gauge and the dashboard (Chromium);
- a delivery older than PACS_AI_DELIVERY_MAX_AGE_HOURS ends ``failed``, and a
  resend from the dashboard (a JSON POST through the cross-site guard) starts
  its age again;
- a destination that hangs every attempt for PACS_AI_DISPATCH_TIMEOUT does not
  hold up inference: dispatch has its own worker process.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from db.models import Delivery, utcnow
from db.session import session_scope
from tests.conftest import (
    NodeFactory,
    canary_chest_ct,
    free_port,
    needs_demo_models,
    node_db_url,
    send_datasets,
    wait_for,
)
from tests.dicom_peers import RecordingSCP
from tests.factory import CANARY_ID, CANARY_NAME

pytestmark = [pytest.mark.integration, needs_demo_models]


def _metric(base: str, name: str, destination: str) -> float:
    text = httpx.get(base + "/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(f'{name}{{destination="{destination}"}} '):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {destination} not in /metrics")


def _backlog(base: str) -> dict[str, Any]:
    response = httpx.get(base + "/api/deliveries/backlog", timeout=30)
    assert response.status_code == 200, response.text
    return {d["destination"]: d for d in response.json()["destinations"]}


def test_destination_down_past_old_horizon_gets_everything(
    node_factory: NodeFactory, browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    datasets = canary_chest_ct(7_100_001)
    study_uid = str(datasets[0].StudyInstanceUID)
    late = RecordingSCP(free_port(), "LATE")
    dead_port = free_port()  # nothing ever listens there
    late_name, dead_name = f"LATE@127.0.0.1:{late.port}", f"DEAD@127.0.0.1:{dead_port}"
    node = node_factory(
        ort_threads=2,
        destinations=f"{late_name}/sr+seg,{dead_name}/sr",
        delivery_max_attempts=2,  # ignored now (it used to end the retries)
        delivery_retry_base=0.2,
        delivery_retry_max=1,
        delivery_alert_minutes=0.05,  # 3 s
        dispatch_timeout=5,
        dispatch_concurrency=1,
        log_format="text",
    )
    try:
        node.start_run(api=True)
        base = node.api_url
        assert set(send_datasets(node.port, datasets)) == {0}
        node.wait_jobs([study_uid], "done", timeout=180)

        # down far past what PACS_AI_DELIVERY_MAX_ATTEMPTS=2 allowed: still pending
        def retried_a_lot() -> list[dict[str, Any]] | None:
            rows = node.deliveries(to="LATE@")
            if len(rows) == 2 and all(r["attempts"] >= 6 for r in rows):
                return rows
            return None

        rows = wait_for(retried_a_lot, 90, 0.5, what="deliveries retried past 2 attempts")
        assert {r["status"] for r in rows} == {"pending"}
        assert all(r["last_error"] for r in rows)
        assert late.uids() == []

        # the backlog: API, CLI, metric (pending longer than 3 s)
        backlog = wait_for(
            lambda: (b := _backlog(base))[late_name]["overdue"] == 2 and b, 30, what="overdue"
        )
        assert backlog[late_name]["pending"] == 2
        assert backlog[late_name]["oldest_age_seconds"] >= 3
        assert backlog[late_name]["last_error"]
        assert backlog[dead_name]["overdue"] == 1
        cli = node.cli("deliveries", "backlog", "--json", check=False)
        assert cli.returncode == 1  # something is overdue
        assert {r["destination"]: r["overdue"] for r in json.loads(cli.stdout)} == {
            late_name: 2,
            dead_name: 1,
        }
        assert _metric(base, "pacs_ai_deliveries_overdue", late_name) == 2
        assert _metric(base, "pacs_ai_delivery_oldest_pending_seconds", late_name) >= 3

        # ... and on the dashboard
        wait = WebDriverWait(browser, 30)
        browser.get(base + "/")
        row = wait.until(
            ec.presence_of_element_located(
                (By.CSS_SELECTOR, f'#backlog tr[data-destination="{late_name}"]')
            )
        )
        cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        assert cells[0] == late_name and cells[1] == "2" and cells[2] == "2", cells
        section = browser.find_element(By.ID, "backlog-section")
        assert "alert" in (section.get_attribute("class") or "")
        assert "waiting longer than" in browser.find_element(By.ID, "backlog-hint").text

        # a delivery older than PACS_AI_DELIVERY_MAX_AGE_HOURS ends failed on its next attempt
        with session_scope(node_db_url(node)) as session:
            session.execute(
                update(Delivery)
                .where(Delivery.destination == dead_name)
                .values(created_at=utcnow() - dt.timedelta(hours=169))
            )
        (dead,) = wait_for(
            lambda: [r for r in node.deliveries(to="DEAD@") if r["status"] == "failed"] or None,
            30,
            0.5,
            what="the too old delivery failed",
        )
        assert "PACS_AI_DELIVERY_MAX_AGE_HOURS" in dead["last_error"]

        # the destination comes back: every object arrives once, no manual step
        late.start()
        sent = wait_for(
            lambda: (
                (r := node.deliveries(to="LATE@")) and all(d["status"] == "sent" for d in r) and r
            ),
            30,
            0.5,
            what="deliveries sent once the destination is back",
        )
        wait_for(lambda: len(late.uids()) >= 2, 10, what="objects at the destination")
        assert sorted(late.uids()) == sorted(r["sop_instance_uid"] for r in sent)
        backlog = _backlog(base)
        assert backlog[late_name]["pending"] == 0 and backlog[late_name]["overdue"] == 0
        assert _metric(base, "pacs_ai_deliveries_overdue", late_name) == 0

        # the dashboard's own POST still goes through the cross-site guard: resend
        # the failed delivery's study; its age starts again, so it is retried
        browser.refresh()
        resend = wait.until(
            ec.element_to_be_clickable((By.XPATH, "//table[@id='deliveries']//button"))
        )
        resend.click()
        toast = wait.until(ec.visibility_of_element_located((By.ID, "toast")))
        assert toast.text.startswith("Resend queued: 3 object(s)"), toast.text
        wait_for(lambda: len(late.uids()) == 4, 30, what="objects sent again")
        again = wait_for(
            lambda: [r for r in node.deliveries(to="DEAD@") if r["attempts"] >= 2] or None,
            30,
            0.5,
            what="the resent delivery retried",
        )
        assert again[0]["status"] == "pending"  # not failed at once: its age restarted
    finally:
        late.stop()
        node.stop_all()
    logs = node.logs()
    # the dispatch task ran in the dispatch worker process, not the inference one
    assert "dispatcher[" in logs and "dispatch: " in logs
    assert CANARY_NAME not in logs and CANARY_ID not in logs


class _Blackhole:
    """A TCP port that accepts connections (kernel backlog) and never answers:
    every C-STORE attempt to it waits PACS_AI_DISPATCH_TIMEOUT."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()  # resets the connections waiting in the backlog


def test_dead_destination_does_not_hold_up_inference(node_factory: NodeFactory) -> None:
    first, second = canary_chest_ct(7_100_002), canary_chest_ct(7_100_003)
    hole = _Blackhole()
    name = f"HANG@127.0.0.1:{hole.port}"
    node = node_factory(
        ort_threads=2,
        destinations=f"{name}/sr",
        dispatch_timeout=240,
        worker_concurrency=1,
        dispatch_concurrency=1,
    )
    try:
        node.start_run(api=True)
        uid1 = str(first[0].StudyInstanceUID)
        assert set(send_datasets(node.port, first)) == {0}
        node.wait_jobs([uid1], "done", timeout=180)
        # the dispatch worker is stuck in its first attempt (no answer for 240 s)
        wait_for(
            lambda: [r for r in node.deliveries() if r["attempts"] == 1] or None,
            30,
            0.5,
            what="an attempt in flight",
        )
        started = utcnow()
        uid2 = str(second[0].StudyInstanceUID)
        assert set(send_datasets(node.port, second)) == {0}
        node.wait_jobs([uid2], "done", timeout=180)
        elapsed = (utcnow() - started).total_seconds()
        assert elapsed < 200, elapsed
        rows = {r["study_instance_uid"]: r for r in node.deliveries()}
        # the first study's attempt is still hanging: inference did not wait for it
        assert rows[uid1]["attempts"] == 1 and rows[uid1]["last_error"] is None
        assert rows[uid1]["status"] == "pending"
        assert rows[uid2]["status"] == "pending"
    finally:
        hole.close()
        node.stop_all()
