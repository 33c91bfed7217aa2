"""Retention: deleting the stored files of studies that are finished with.

With ``PACS_AI_RETENTION_HOURS`` > 0, a study whose latest job is done, whose
deliveries are all sent, and which has had no new instance, job or delivery
for that long (the policy is :func:`db.queries.retention_conditions`) loses its
stored instance files and its outbox objects; its database rows and results
stay, and ``studies.pruned_at`` says when. A pruned study cannot be reprocessed.

The listener's scheduler runs :func:`prune_once` every :func:`prune_interval`
seconds; ``pacs-ai prune`` runs it on demand. The study is marked pruned (and
committed) before any file goes, so a reprocess never starts on half a study.

Only paths taken from the database (``instances.rel_path``, ``deliveries.rel_path``)
or derived from a hash of the Study Instance UID are deleted, and each is
checked to stay under its root after resolving links. This module runs in the
listener process: it never imports onnxruntime, highdicom or the pipeline.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from db.models import utcnow
from db.queries import prunable_studies, study_instance_files, study_outbox_files
from db.repo import mark_pruned, prune_audit
from db.session import session_scope
from dicomnode.uids import uid_digest
from worker import metrics
from worker.settings import Settings

log = logging.getLogger(__name__)

#: studies pruned by one scheduler run at most (the assembler waits meanwhile)
SCHEDULER_BATCH = 20


@dataclass(frozen=True, slots=True)
class PrunedStudy:
    """What pruning one study removed (or, in a dry run, would remove)."""

    study_instance_uid: str
    files: int
    bytes: int
    errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "files": self.files,
            "bytes": self.bytes,
            "errors": self.errors,
        }


def prune_interval(settings: Settings) -> float:
    """Seconds between two scheduler runs: a tenth of the retention period, at
    most 10 minutes, at least 30 seconds."""
    return max(30.0, min(600.0, settings.retention_hours * 3600.0 / 10.0))


def retention_cutoff(settings: Settings, now: dt.datetime) -> dt.datetime:
    return now - dt.timedelta(hours=settings.retention_hours)


def safe_path(root: Path, rel_path: str) -> Path | None:
    """``root / rel_path`` with links resolved, or None when that is not strictly
    inside ``root`` (an absolute path, ``..``, a link leading out)."""
    if not rel_path or os.path.isabs(rel_path):
        return None
    base = root.resolve()
    path = (base / rel_path).resolve()
    if path == base or not path.is_relative_to(base):
        return None
    return path


def outbox_study_dir(study_uid: str) -> str:
    """The outbox folder of a study's result objects, relative to the outbox
    (the layout of :func:`worker.results.report.outbox_rel_path`)."""
    return uid_digest(study_uid)[:32]


def _study_files(
    session: Session, study_id: int, study_uid: str, settings: Settings, now: dt.datetime
) -> list[tuple[Path, Path]]:
    """(root, file) of everything retention deletes for a study: its instances
    (received until ``now``) and its outbox objects. Unsafe paths are left out."""
    storage = settings.storage_path
    outbox = settings.outbox_path
    wanted: list[tuple[Path, str]] = [
        (storage, rel) for rel, _size in study_instance_files(session, study_id, now)
    ]
    wanted += [(outbox, rel) for rel in study_outbox_files(session, study_id)]
    folder = safe_path(outbox, outbox_study_dir(study_uid))
    if folder is not None and folder.is_dir():
        # objects built for no destination have no delivery row; the folder is the study's
        wanted += [
            (outbox, f"{outbox_study_dir(study_uid)}/{entry.name}")
            for entry in sorted(folder.iterdir())
            if entry.name.endswith(".dcm") and not entry.name.startswith(".")
        ]
    out: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for root, rel in wanted:
        path = safe_path(root, rel)
        if path is None:
            log.warning("study=%s: a stored path leaves its root; not deleted", study_uid)
            continue
        if path not in seen:
            seen.add(path)
            out.append((root.resolve(), path))
    return out


def _size(path: Path) -> int | None:
    """The size of a regular file, None when it is missing or not a file."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _remove_empty_parents(path: Path, root: Path) -> None:
    parent = path.parent
    while parent != root and parent.is_relative_to(root):
        try:
            parent.rmdir()
        except OSError:  # not empty (or gone): stop climbing
            return
        parent = parent.parent


def _delete(files: list[tuple[Path, Path]], study_uid: str) -> tuple[int, int, int]:
    """Delete the files; return (files deleted, bytes freed, failures)."""
    removed = freed = errors = 0
    for root, path in files:
        size = _size(path)
        if size is None:
            continue  # already gone, or not a regular file
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors += 1
            log.warning("study=%s: a file could not be deleted (%s)", study_uid, exc.strerror)
            continue
        removed += 1
        freed += size
        _remove_empty_parents(path, root)
    return removed, freed, errors


def prune_once(
    settings: Settings,
    now: dt.datetime | None = None,
    dry_run: bool = False,
    limit: int | None = None,
) -> list[PrunedStudy]:
    """Prune every study the retention policy allows (at most ``limit``); with
    ``dry_run`` only say what would go. Nothing happens with retention off."""
    if settings.retention_hours <= 0:
        return []
    now = now or utcnow()
    cutoff = retention_cutoff(settings, now)
    url = settings.effective_database_url
    with session_scope(url) as session:
        candidates = prunable_studies(session, cutoff, limit)
    out: list[PrunedStudy] = []
    for study_id, study_uid in candidates:
        with session_scope(url) as session:
            # not dry: mark it pruned first; False when a job, delivery or
            # instance came in meanwhile
            if not (dry_run or mark_pruned(session, study_id, cutoff, now)):
                continue
            files = _study_files(session, study_id, study_uid, settings, now)
        # committed: the study is pruned; now its files go
        if dry_run:
            sizes = [s for s in (_size(p) for _root, p in files) if s is not None]
            out.append(PrunedStudy(study_uid, len(sizes), sum(sizes)))
            continue
        removed, freed, errors = _delete(files, study_uid)
        metrics.record_pruned(freed)
        log.info(
            "study=%s pruned by retention: %d files, %d bytes deleted%s",
            study_uid,
            removed,
            freed,
            f", {errors} could not be deleted" if errors else "",
        )
        out.append(PrunedStudy(study_uid, removed, freed, errors))
    return out


#: seconds between two prunings of the audit log by the scheduler
AUDIT_PRUNE_EVERY = 3600.0


def prune_audit_once(settings: Settings, now: dt.datetime | None = None) -> int:
    """Delete the audit records older than PACS_AI_AUDIT_RETENTION_DAYS (0: kept
    for ever, nothing happens); how many went."""
    if settings.audit_retention_days <= 0:
        return 0
    cutoff = (now or utcnow()) - dt.timedelta(days=settings.audit_retention_days)
    with session_scope(settings.effective_database_url) as session:
        removed = prune_audit(session, cutoff)
    if removed:
        log.info(
            "audit log: %d records older than %g days deleted",
            removed,
            settings.audit_retention_days,
        )
    return removed
