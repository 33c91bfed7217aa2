"""De-identified export of a study: its received images and pacs-ai's objects.

``pacs-ai export --study UID --deidentify DIR`` (and any other front door) calls
:func:`export_study`: the study's stored images (the rows of ``instances``, from
the storage) and the SR, SEGs, saliency maps and key images pacs-ai built for it
(the rows of ``deliveries``, from the outbox) are de-identified together by the
PS3.15 Annex E Basic Application Level Confidentiality Profile
(:mod:`dicomnode.deid`), so every reference between them (SEG -> images, SR ->
SEG, images and maps, maps -> images) points at the new UIDs, and written to
``DIR`` with a ``manifest.json``.

Paths come from the database rows (relative to the storage or the outbox, and
checked to stay inside it) and the output names from a counter: never from a
dataset value. The manifest names the profile, the options and every file (its
new UIDs, SOP class, kind, size and SHA-256); it holds no original UID, no hash
of one and no other value of the source headers.

Left out, and counted in the manifest: instances that are not images (a received
SR or document may hold free text the profile cannot clean), images whose pixel
data may show burned-in patient data (Burned In Annotation YES; Clean Pixel Data
is not offered), our own objects sent back to the listener (the outbox has them),
files retention already deleted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from db.queries import export_sources
from db.session import session_scope
from dicomnode.constants import OWN_MANUFACTURER
from dicomnode.deid import TABLE_RELEASE, Deidentifier, Options
from dicomnode.uids import validate_uid
from worker.settings import Settings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: output folder of each kind of object
FOLDERS = {"image": "images", "sr": "sr", "seg": "seg", "map": "maps", "ki": "key-images"}
_PIXELS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class ExportError(Exception):
    """The export cannot be made (the message names no patient data)."""


@dataclass(frozen=True)
class Source:
    """One object to export: where it is and what it is."""

    path: Path
    kind: str  # image, sr, seg, map, ki


@dataclass(frozen=True)
class ExportedFile:
    path: str  # relative to the export folder
    kind: str
    sop_class_uid: str
    study_instance_uid: str  # the new UIDs
    series_instance_uid: str
    sop_instance_uid: str
    bytes: int
    sha256: str


@dataclass
class ExportReport:
    directory: Path
    options: Options
    files: list[ExportedFile] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    def manifest(self) -> dict[str, Any]:
        return {
            "format": "pacs-ai de-identified export",
            "version": 1,
            "created_utc": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            "profile": {
                "name": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
                "table": f"PS3.15 Table E.1-1 ({TABLE_RELEASE}, dicom-anonymizer)",
                "codes": [
                    {"value": v, "scheme": "DCM", "meaning": m} for v, m in self.options.codes()
                ],
                "method": self.options.method(),
            },
            "options": {
                "retain_longitudinal_temporal_information_full_dates": self.options.retain_dates,
                "clean_descriptors": self.options.clean_descriptors,
                "clean_pixel_data": False,
                "retain_uids": False,
                "retain_patient_characteristics": False,
                "retain_device_identity": False,
                "retain_safe_private": False,
            },
            "uid_mapping": "omitted: new UIDs are derived under a random key that is not kept",
            "counts": dict(sorted(Counter(f.kind for f in self.files).items())),
            "skipped": dict(sorted(self.skipped.items())),
            "files": [asdict(f) for f in self.files],
        }


def _inside(root: Path, rel: str) -> Path | None:
    """``root / rel`` when it stays inside ``root`` (a row's path, checked)."""
    path = (root / rel).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def study_sources(settings: Settings, study_uid: str) -> tuple[list[Source], Counter[str]]:
    """The study's objects to export, and what was left out (by reason)."""
    skipped: Counter[str] = Counter()
    with session_scope(settings.effective_database_url) as session:
        found = export_sources(session, study_uid)
    if found is None:
        raise ExportError(f"no study {study_uid}")
    instances, objects = found
    out: list[Source] = []
    for rel, ours in instances:
        path = _inside(settings.storage_path, str(rel))
        if ours:
            skipped["our object sent back to the listener (exported from the outbox)"] += 1
        elif path is None:
            skipped["path outside the storage"] += 1
        else:
            out.append(Source(path, "image"))
    seen: set[Path] = set()
    for rel, kind in objects:
        path = _inside(settings.outbox_path, str(rel))
        if path is None:
            skipped["path outside the outbox"] += 1
        elif path not in seen:
            seen.add(path)
            out.append(Source(path, str(kind) if str(kind) in FOLDERS else "image"))
    return out, skipped


def _why_not(ds: Dataset, source: Source, study_uid: str) -> str | None:
    """Why an object is left out (None: exported)."""
    if str(ds.get("StudyInstanceUID", "")) != study_uid:
        return "another study's object"
    if source.kind == "image":
        if not any(k in ds for k in _PIXELS):
            return "not an image (documents and reports are not exported)"
        burned = str(ds.get("BurnedInAnnotation", "")).upper() == "YES"
        if burned and str(ds.get("Manufacturer", "")) != OWN_MANUFACTURER:
            return "burned-in annotation (Clean Pixel Data is not offered)"
    return None


def _read(
    sources: list[Source], skipped: Counter[str], headers_only: bool
) -> Iterator[tuple[Source, Dataset]]:
    for source in sources:
        try:
            # headers: large values (pixel data) stay on disk, but their presence shows
            yield source, dcmread(source.path, defer_size=4096 if headers_only else None)
        except FileNotFoundError:
            if headers_only:
                skipped["file missing (pruned by retention?)"] += 1
        except (InvalidDicomError, OSError, ValueError):
            if headers_only:
                skipped["unreadable file"] += 1


def export_study(
    settings: Settings, study_uid: str, directory: Path, options: Options
) -> ExportReport:
    """Write the de-identified study into ``directory`` (new or empty) with its
    manifest; returns what was written and left out."""
    study_uid = validate_uid(study_uid, "Study Instance UID")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ExportError(f"{directory} exists and is not an empty folder")
    sources, skipped = study_sources(settings, study_uid)
    deid = Deidentifier(options)
    # first every header: the set's identifying values are cleaned wherever text is kept
    wanted: list[Source] = []
    for source, header in _read(sources, skipped, headers_only=True):
        reason = _why_not(header, source, study_uid)
        if reason is not None:
            skipped[reason] += 1
            continue
        deid.learn([header])
        wanted.append(source)
    if not wanted:
        raise ExportError(f"study {study_uid} has nothing to export")
    report = ExportReport(directory, options, skipped=skipped)
    directory.mkdir(parents=True, exist_ok=True)
    numbers: Counter[str] = Counter()
    for source, ds in _read(wanted, Counter(), headers_only=False):
        out = deid.apply(ds)
        numbers[source.kind] += 1
        rel = f"{FOLDERS[source.kind]}/{numbers[source.kind]:05d}.dcm"
        target = directory / rel
        target.parent.mkdir(exist_ok=True)
        out.save_as(target, enforce_file_format=True)
        data = target.read_bytes()
        report.files.append(
            ExportedFile(
                path=rel,
                kind=source.kind,
                sop_class_uid=str(out.SOPClassUID),
                study_instance_uid=str(out.StudyInstanceUID),
                series_instance_uid=str(out.SeriesInstanceUID),
                sop_instance_uid=str(out.SOPInstanceUID),
                bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    manifest = directory / MANIFEST
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(report.manifest(), indent=2) + "\n")
    os.replace(tmp, manifest)
    log.info(
        "exported study %s de-identified: %d files, %d left out",
        study_uid,
        len(report.files),
        sum(skipped.values()),
    )
    return report


__all__ = ["MANIFEST", "ExportError", "ExportReport", "ExportedFile", "export_study"]
