"""Priors: a nodule result compared with the same patient's earlier study.

Called once per job by the pipeline (:func:`worker.pipeline.run.process_study`)
after the job's results are committed and before its result objects are built,
so the SR carries the comparison too. ``PACS_AI_PRIORS``:

- ``off``: nothing is compared;
- ``local`` (default): the prior is the most recent study of the same patient
  (the keyed patient hash of :mod:`dicomnode.identity`) with an earlier
  StudyDate that has results of the same model and finding;
- ``pacs``: as ``local``, but first the PACS (``PACS_AI_PACS``) is asked
  (C-FIND, STUDY level, by PatientID and IssuerOfPatientID, CT in the study,
  dated before this study). When it holds a more recent earlier study than any
  pacs-ai processed, that study is fetched (C-MOVE to pacs-ai's own AE title,
  so the listener stores and records it), processed **in this job** (its job
  is made and run inline, or, when another worker took it, waited for), and
  then compared; all within ``PACS_AI_PRIOR_WAIT_SECONDS``. Running it inline
  means a single worker process never waits on itself. Past that budget this
  job goes on without it, and the comparison is made when the prior's own job
  stores its results (below). A study fetched as a prior looks for its own
  priors locally only (no chain of fetches).

Every focal segmentation result (a nodule finding: its measurements list
``components``) gains ``measurements.prior``: ``null`` when the patient has
no earlier study with results (or the study has no patient key or date), else
``{"study_instance_uid", "study_date" (ISO), "volume_ml", "change_percent",
"doubling_time_days", "interval_days", "matched_by"}``. The compared nodule is
this study's largest; in the prior it is the one whose centroid (patient
coordinates, mm) lies nearest, if within :data:`MATCH_MM`; when the prior has
one nodule only, or none lies that near (two exams are not registered: the
table position may differ), the prior's largest (``matched_by``: ``centroid``
or ``largest``). ``change_percent`` = 100·(V - V0)/V0 and the volume doubling
time VDT = Δt·ln 2 / ln(V/V0) in days, Δt between the StudyDates; VDT is null
when the volume did not grow (and both are null when the prior had no nodule).

Results stored out of order are caught up: after a study's comparison every
later study of the patient is compared again with its own latest prior, so a
prior that arrives (or finishes) after its follow-up still reaches the
follow-up's stored result (its SR, already sent, is not rebuilt).

This module runs in the worker; it imports the database, the identity keys and
the prior query, never the web framework.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from db import queries
from db.repo import (
    create_job_if_stable,
    mark_prior_fetch,
    set_result_measurements,
    supersede_older_jobs,
)
from db.session import session_scope
from worker.settings import Settings

if TYPE_CHECKING:  # the API reads the pure helpers: no pipeline (numpy) in its process
    from worker.pipeline.kinds.base import ResultRecord

#: runs a study's job (the pipeline's process_study, passed in by its caller)
Processor = Callable[..., Any]

log = logging.getLogger(__name__)

#: the farthest (mm) a prior nodule's centroid may lie from the current one's to match
MATCH_MM = 30.0
#: job statuses after which a prior's results will not change any more
_FINISHED = {"done", "failed", "superseded"}


# -- the comparison (pure) ----------------------------------------------------------


def is_nodule_result(row: Mapping[str, Any]) -> bool:
    """A focal segmentation result: its measurements list its components."""
    measurements = row.get("measurements")
    return (
        row.get("kind") == "segmentation"
        and isinstance(measurements, Mapping)
        and "components" in measurements
    )


def _components(measurements: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found = measurements.get("components") or []
    return [c for c in found if isinstance(c, Mapping) and c.get("volume_ml") is not None]


def _largest(components: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return max(components, key=lambda c: float(c["volume_ml"]), default=None)


def largest_component(measurements: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """A nodule result's largest component (the one its prior is compared for)."""
    return _largest(_components(measurements))


def largest_volume_ml(measurements: Mapping[str, Any]) -> float:
    """The volume (ml) of a nodule result's largest component; 0.0 when it lists
    none (as :func:`compare` counts it)."""
    largest = largest_component(measurements)
    return float(largest["volume_ml"]) if largest is not None else 0.0


def _centroid(component: Mapping[str, Any]) -> tuple[float, float, float] | None:
    value = component.get("centroid_mm")
    if not isinstance(value, list | tuple) or len(value) != 3:
        return None
    try:
        return (float(value[0]), float(value[1]), float(value[2]))
    except (TypeError, ValueError):
        return None


def match_nodule(
    current: Mapping[str, Any] | None, prior: Sequence[Mapping[str, Any]]
) -> tuple[Mapping[str, Any] | None, str | None]:
    """The prior's component matching ``current`` (this study's largest nodule)
    and how: ``centroid`` (nearest within :data:`MATCH_MM`) or ``largest``."""
    if not prior:
        return None, None
    if current is not None and len(prior) > 1:
        here = _centroid(current)
        if here is not None:
            scored = [
                (math.dist(here, there), i)
                for i, c in enumerate(prior)
                if (there := _centroid(c)) is not None
            ]
            if scored:
                distance, index = min(scored)
                if distance <= MATCH_MM:
                    return prior[index], "centroid"
    return _largest(prior), "largest"


def compare(
    current: Mapping[str, Any],
    current_date: dt.date,
    prior: Mapping[str, Any],
    prior_date: dt.date,
    prior_uid: str,
) -> dict[str, Any]:
    """``measurements.prior`` of a nodule result (``current``, its measurements)
    against the prior study's result of the same model and finding."""
    largest = largest_component(current)
    matched, how = match_nodule(largest, _components(prior))
    volume = largest_volume_ml(current)
    volume0 = float(matched["volume_ml"]) if matched is not None else 0.0
    days = (current_date - prior_date).days
    change = None
    doubling = None
    if volume0 > 0:
        change = round(100.0 * (volume - volume0) / volume0, 1)
        if volume > volume0 and days > 0:
            doubling = round(days * math.log(2) / math.log(volume / volume0), 1)
    return {
        "study_instance_uid": prior_uid,
        "study_date": prior_date.isoformat(),
        "volume_ml": round(volume0, 3),
        "change_percent": change,
        "doubling_time_days": doubling,
        "interval_days": days,
        "matched_by": how,
    }


def _latest_before(history: Sequence[Mapping[str, Any]], date: dt.date) -> Mapping[str, Any] | None:
    """The most recent entry of a patient's history dated strictly before ``date``."""
    earlier = [h for h in history if h["study_date"] < date]
    return max(earlier, key=lambda h: (h["study_date"], h["study_id"]), default=None)


def prior_for(
    history: Sequence[Mapping[str, Any]], entry: Mapping[str, Any]
) -> dict[str, Any] | None:
    """``measurements.prior`` of one entry of a patient's history (rows of
    :func:`db.queries.patient_results`): against its latest earlier study."""
    prior = _latest_before(history, entry["study_date"])
    if prior is None:
        return None
    return compare(
        entry["measurements"],
        entry["study_date"],
        prior["measurements"],
        prior["study_date"],
        prior["study_instance_uid"],
    )


# -- the pipeline's call ------------------------------------------------------------


def attach_priors(
    settings: Settings,
    study_id: int,
    rows: Sequence[ResultRecord],
    processor: Processor | None = None,
) -> None:
    """Add ``measurements.prior`` to the job's nodule results: to ``rows`` (the
    job's result records, for its SR) and to the stored results; and compare the
    patient's later studies again. Never fails the job: a failure is logged and
    the comparison left out."""
    if settings.priors == "off":
        return
    nodules = [r for r in rows if is_nodule_result(r)]
    if not nodules:
        return
    try:
        _attach(settings, study_id, nodules, processor)
    except Exception as exc:  # noqa: BLE001 - a prior is an extra, never a job failure
        from worker.scheduling.jobs import is_transient

        if is_transient(exc):
            raise
        log.warning("priors of study id %d not compared (%s)", study_id, type(exc).__name__)


def _attach(
    settings: Settings,
    study_id: int,
    nodules: Sequence[ResultRecord],
    processor: Processor | None,
) -> None:
    url = settings.effective_database_url
    with session_scope(url) as session:
        link = queries.study_link(session, study_id)
    if link is None:
        return
    if not link["patient_key"] or link["study_date"] is None:
        for row in nodules:
            row["measurements"]["prior"] = None
        _store(settings, study_id, nodules, {})
        return
    if settings.priors == "pacs" and link["prior_of"] is None and processor is not None:
        fetch_from_pacs(settings, study_id, link, nodules, processor)
    values: dict[tuple[str, str], dict[str, Any] | None] = {}
    with session_scope(url) as session:
        for row in nodules:
            key = (str(row["model"]), str(row["finding_code_value"]))
            history = queries.patient_results(session, link["patient_key"], *key)
            # this study as stored now (its rows were committed before this call)
            own = {"study_id": study_id, "study_date": link["study_date"]}
            value = prior_for(
                history,
                {**own, "measurements": row["measurements"]},
            )
            row["measurements"]["prior"] = value
            values[key] = value
            _catch_up(session, history, link["study_date"])
    _store(settings, study_id, nodules, values)
    for row in nodules:
        prior = row["measurements"]["prior"]
        if prior is not None:
            log.info(
                "study id %d: %s compared with prior study=%s (%d days): %s %%, VDT %s days",
                study_id,
                row.get("finding"),
                prior["study_instance_uid"],
                prior["interval_days"],
                prior["change_percent"],
                prior["doubling_time_days"],
            )


def _store(
    settings: Settings,
    study_id: int,
    nodules: Sequence[ResultRecord],
    values: Mapping[tuple[str, str], dict[str, Any] | None],
) -> None:
    """Write this study's comparisons into its stored results."""
    with session_scope(settings.effective_database_url) as session:
        for row in nodules:
            key = (str(row["model"]), str(row["finding_code_value"]))
            for stored in queries.study_results(session, study_id, *key):
                measurements = {**stored["measurements"], "prior": values.get(key)}
                if measurements != stored["measurements"]:
                    set_result_measurements(session, stored["result_id"], measurements)


def _catch_up(session: Any, history: Sequence[Mapping[str, Any]], after: dt.date) -> None:
    """Compare the patient's studies dated after ``after`` again (their prior may
    be the study just processed)."""
    for entry in history:
        if entry["study_date"] <= after:
            continue
        value = prior_for(history, entry)
        if entry["measurements"].get("prior") != value:
            set_result_measurements(
                session, entry["result_id"], {**entry["measurements"], "prior": value}
            )


# -- PACS_AI_PRIORS=pacs ------------------------------------------------------------


def fetch_from_pacs(
    settings: Settings,
    study_id: int,
    link: Mapping[str, Any],
    nodules: Sequence[ResultRecord],
    processor: Processor,
) -> None:
    """Fetch and process the patient's most recent earlier CT study from the PACS
    when pacs-ai has not processed one as recent (see the module docstring)."""
    from dicomnode import identity, prior_query
    from dicomnode.pacs_query import parse_peer

    deadline = time.monotonic() + settings.prior_wait_seconds
    url = settings.effective_database_url
    study_uid = str(link["study_instance_uid"])
    ring = identity.KeyRing(settings.secret_key_path, settings.secret_key_is_default, url)
    with session_scope(url) as session:
        sealed = queries.sealed_identifiers(session, [study_uid]).get(study_uid)
    if not sealed:
        return
    ids = ring.get().open(sealed, study_uid)
    peer = parse_peer(settings.pacs)
    up_to = link["study_date"] - dt.timedelta(days=1)
    ssl_context = None
    try:
        if peer.tls:  # tls://: the PACS_AI_TLS_* files, as for destinations
            from dicomnode.protocols.base import tls_context

            ssl_context = tls_context(
                settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file
            )
        remote = prior_query.find_prior_studies(
            peer,
            settings.ae_title,
            ids.patient_id,
            ids.issuer_of_patient_id,
            up_to,
            timeout=min(60.0, settings.prior_wait_seconds),
            ssl_context=ssl_context,
        )
    except prior_query.PriorQueryFailed as exc:
        log.warning("study=%s: prior not looked up on the PACS: %s", study_uid, exc)
        return
    remote = [r for r in remote if r.study_instance_uid != study_uid]
    if not remote:
        return
    newest = remote[0]
    with session_scope(url) as session:
        local = [
            h
            for row in nodules
            for h in queries.patient_results(
                session, link["patient_key"], str(row["model"]), str(row["finding_code_value"])
            )
            if h["study_date"] < link["study_date"]
        ]
    if any(h["study_date"] >= newest.study_date for h in local):
        return  # pacs-ai processed a prior at least as recent
    log.info(
        "study=%s: fetching prior study=%s (%s) from %s",
        study_uid,
        newest.study_instance_uid,
        newest.study_date.isoformat(),
        peer.name,
    )
    with session_scope(url) as session:
        mark_prior_fetch(session, newest.study_instance_uid, study_uid)
    try:
        moved = prior_query.move_study(
            peer,
            settings.ae_title,
            settings.ae_title,
            newest.study_instance_uid,
            timeout=max(5.0, deadline - time.monotonic()),
            ssl_context=ssl_context,
        )
    except prior_query.PriorQueryFailed as exc:
        log.warning("study=%s: prior not fetched: %s", study_uid, exc)
        return
    if not moved.ok:
        log.warning(
            "study=%s: prior study=%s not fetched (C-MOVE 0x%04X, %d failed)",
            study_uid,
            newest.study_instance_uid,
            moved.status,
            moved.failed,
        )
        return
    process_fetched(settings, newest.study_instance_uid, deadline, processor)


def process_fetched(
    settings: Settings, prior_uid: str, deadline: float, processor: Processor
) -> bool:
    """Have the fetched study processed before ``deadline`` (monotonic): make its
    job and run it here, or wait for the worker that took it. True when it
    finished in time."""
    from worker.scheduling.jobs import run_job

    url = settings.effective_database_url
    while time.monotonic() < deadline:
        with session_scope(url) as session:
            state = queries.study_state(session, prior_uid)
        if state is None or not state["num_instances"]:
            time.sleep(0.5)
            continue
        if state["needs_job"]:
            with session_scope(url) as session:
                job = create_job_if_stable(session, state["study_id"], state["last_instance_at"])
                if job is not None:
                    supersede_older_jobs(session, state["study_id"], job.id)
            continue  # look again: the job, or instances that arrived meanwhile
        status = state["job_status"]
        if status == "queued":
            run_job(int(state["job_id"]), settings, processor=processor)
            continue
        if status in _FINISHED:
            return status == "done"
        time.sleep(1.0)  # running in another worker
    log.warning(
        "prior study=%s not processed within PACS_AI_PRIOR_WAIT_SECONDS=%g; it is compared "
        "when its own job finishes",
        prior_uid,
        settings.prior_wait_seconds,
    )
    return False
