"""Study completeness: a pure, testable policy (cf. Orthanc ``StableAge``)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StudyState:
    """What the assembler knows about a study when it decides."""

    last_instance_at: dt.datetime
    needs_job: bool


def is_complete(now: dt.datetime, state: StudyState, stable_seconds: float) -> bool:
    """A study is complete when it has instances no job covers yet and no new
    instance arrived for ``stable_seconds``."""
    if not state.needs_job:
        return False
    return (now - state.last_instance_at).total_seconds() >= stable_seconds
