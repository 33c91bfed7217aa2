"""Patient data kept out of text: log lines, stored errors, API answers.

Two defences, used by the logging set-up (:mod:`worker.logging_setup`) and
wherever an exception becomes a stored error:

- **By origin.** A library's exception message may quote a header value
  (highdicom: ``'U' is not a valid PatientSexValues``; pydicom: ``Invalid value
  for VR DA: '...'``). :func:`describe` and :func:`format_traceback` keep the
  exception type, where it was raised and our own frames, never the message of
  an exception that is not one of ours.
- **By value.** While a job runs (:func:`scope`), the patient and study values
  of its source headers are remembered (:func:`remember`); :func:`scrub`
  replaces them in any text.

Standard library and pydicom only (the listener imports this module).
"""

from __future__ import annotations

import linecache
import re
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from types import TracebackType
from typing import Any

#: Top-level packages whose exception messages and log text we write ourselves.
OWN_PACKAGES = frozenset({"worker", "dicomnode", "db", "pacs_ai"})

#: What a remembered value is replaced with.
MASK = "***"

#: Header attributes that identify a patient (or lead to one); their values are
#: remembered while a job runs.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthName",
    "PatientMotherBirthName",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "MilitaryRank",
    "BranchOfService",
    "CountryOfResidence",
    "RegionOfResidence",
    "PatientComments",
    "Occupation",
    "AdditionalPatientHistory",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "AccessionNumber",
    "StudyID",
    "AdmissionID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "ConsultingPhysicianName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "PerformingPhysicianName",
    "OperatorsName",
    "RequestingPhysician",
    "ScheduledPerformingPhysicianName",
    "StudyDescription",
    "RequestedProcedureDescription",
    "DeviceSerialNumber",
)
#: Sequences whose items hold such values (other patient IDs, physicians' ids).
PHI_SEQUENCES = (
    "OtherPatientIDsSequence",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianIdentificationSequence",
    "PhysiciansOfRecordIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence",
    "RequestAttributesSequence",
)
#: Values shorter than this are not remembered (a sex code, "1", "CT" would mask
#: half of every line).
MIN_LENGTH = 4


class _Registry:
    __slots__ = ("_pattern", "values")

    def __init__(self) -> None:
        self.values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, values: Iterable[str]) -> None:
        before = len(self.values)
        for value in values:
            value = value.strip()
            if len(value) >= MIN_LENGTH:
                self.values.add(value)
        if len(self.values) != before:
            self._pattern = None

    def pattern(self) -> re.Pattern[str] | None:
        if self._pattern is None and self.values:
            ordered = sorted(self.values, key=len, reverse=True)  # longest first
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered), re.IGNORECASE)
        return self._pattern


_registry: ContextVar[_Registry | None] = ContextVar("pacs_ai_phi_values", default=None)


@contextmanager
def scope() -> Iterator[None]:
    """Values remembered inside the block are scrubbed from text until it ends.

    Nested scopes share the outermost one's values.
    """
    if _registry.get() is not None:
        yield
        return
    token = _registry.set(_Registry())
    try:
        yield
    finally:
        _registry.reset(token)


def remember_values(values: Iterable[str]) -> None:
    """Scrub these values from text for the rest of the current scope (no-op outside one)."""
    registry = _registry.get()
    if registry is not None:
        registry.add(values)


def phi_values(ds: Any) -> list[str]:
    """The identifying values of a dataset's header: whole values and, for person
    names, each name component and component group."""
    out: list[str] = []

    def add(elem: Any) -> None:
        if elem is None or elem.VR == "SQ":
            return
        values = elem.value if elem.VM > 1 else [elem.value]
        for value in values:
            if value is None:
                continue
            text = str(value)
            out.append(text)
            if elem.VR == "PN":
                for group in text.split("="):
                    out.append(group)
                    out.extend(part for part in re.split(r"[\^=]", group) if part)
                    out.append(" ".join(p for p in group.split("^") if p))

    def add_all(keyword: str) -> None:
        with suppress(Exception):  # an undecodable value: nothing to remember
            if keyword in PHI_SEQUENCES:
                for item in ds.get(keyword) or []:
                    for elem in item:
                        add(elem)
            else:
                if keyword in ds:
                    add(ds[keyword])

    for keyword in PHI_KEYWORDS + PHI_SEQUENCES:
        add_all(keyword)
    return out


def remember(ds: Any) -> None:
    """Remember the identifying values of a source header (see :func:`phi_values`)."""
    if _registry.get() is not None:
        remember_values(phi_values(ds))


def scrub(text: str) -> str:
    """``text`` with every remembered value of the current scope masked."""
    registry = _registry.get()
    pattern = registry.pattern() if registry is not None else None
    if pattern is None or not text:
        return text
    return pattern.sub(MASK, text)


def scrub_json(value: Any) -> Any:
    """:func:`scrub` on every string of a JSON-like value (a job summary)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: scrub_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_json(v) for v in value]
    return value


def is_own_module(name: str | None) -> bool:
    return bool(name) and str(name).split(".", 1)[0] in OWN_PACKAGES


def is_own_exception(exc: BaseException) -> bool:
    """Ours: its messages are written to name no patient data."""
    return is_own_module(type(exc).__module__)


def _raised_in(tb: TracebackType | None) -> str | None:
    module = None
    for frame, _ in traceback.walk_tb(tb):
        module = frame.f_globals.get("__name__")
    return str(module) if module else None


def describe(exc: BaseException) -> str:
    """A one-line account of an exception that is safe to store or log: our own
    exceptions' messages (scrubbed), or a library exception's type and where it
    was raised (``ValueError in highdicom.base``), never its message."""
    if is_own_exception(exc):
        return scrub(str(exc))
    where = _raised_in(exc.__traceback__)
    return f"{type(exc).__name__} in {where}" if where else type(exc).__name__


def _frames(tb: TracebackType | None) -> list[str]:
    lines: list[str] = []
    foreign: list[str] = []

    def flush() -> None:
        if foreign:
            modules = ", ".join(dict.fromkeys(foreign))
            count = len(foreign)
            lines.append(f"  [{count} frame{'s' if count > 1 else ''} in {modules}]")
            foreign.clear()

    for frame, lineno in traceback.walk_tb(tb):
        module = str(frame.f_globals.get("__name__") or "?")
        if not is_own_module(module):
            foreign.append(module)
            continue
        flush()
        code = frame.f_code
        lines.append(f'  File "{code.co_filename}", line {lineno}, in {code.co_name}')
        source = linecache.getline(code.co_filename, lineno).strip()
        if source:
            lines.append(f"    {source}")
    flush()
    return lines


def format_traceback(exc: BaseException) -> str:
    """A traceback without patient data: our frames in full, library frames
    summarised, our exceptions' messages scrubbed, library exceptions' messages
    left out. Follows ``__cause__`` and ``__context__`` as Python does."""
    chain: list[tuple[BaseException, str | None]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link: str | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, "cause"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "context"
        else:
            current = None
    out: list[str] = []
    for index in range(len(chain) - 1, -1, -1):
        item, link = chain[index]
        out.append("Traceback (most recent call last):")
        out.extend(_frames(item.__traceback__))
        name = type(item).__qualname__
        module = type(item).__module__
        if module not in ("builtins", "__main__"):
            name = f"{module}.{name}"
        if is_own_exception(item):
            message = scrub(str(item))
            out.append(f"{name}: {message}" if message else name)
        else:
            out.append(f"{name} (message withheld: it may hold patient data)")
        if index > 0:  # ``item`` was the cause or context of the next one
            out.append(
                "\nThe above exception was the direct cause of the following exception:\n"
                if link == "cause"
                else "\nDuring handling of the above exception, another exception occurred:\n"
            )
    return "\n".join(out)


__all__ = [
    "MASK",
    "OWN_PACKAGES",
    "describe",
    "format_traceback",
    "is_own_exception",
    "is_own_module",
    "phi_values",
    "remember",
    "remember_values",
    "scope",
    "scrub",
    "scrub_json",
]
