"""Series selection: which series of a study each model runs on.

Pure functions over header summaries; no pixel data is read here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from worker.pipeline.registry import Routing

# Objects that are never inputs: SR, SEG, presentation states, KOS, RT, waveforms ...
NON_IMAGE_MODALITIES = frozenset({"SR", "SEG", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG"})


@dataclass(frozen=True)
class SeriesCandidate:
    """What routing needs to know about one series (from its headers)."""

    series_instance_uid: str
    modality: str
    sop_class_uid: str
    body_part: str
    image_type: tuple[str, ...]
    num_slices: int
    description: str
    is_axial: bool
    has_pixels: bool
    produced_by_us: bool
    is_colour: bool = False


def skip_reason(series: SeriesCandidate) -> str | None:
    """Why a series is never processed by any model, or None."""
    if series.produced_by_us:
        return "produced by pacs-ai"
    if series.modality in NON_IMAGE_MODALITIES or not series.has_pixels:
        return f"not an image series ({series.modality or 'no modality'})"
    types = {t.upper() for t in series.image_type}
    if "LOCALIZER" in types:
        return "localizer"
    if "DERIVED" in types:
        return "derived images"
    return None


def matches(series: SeriesCandidate, rule: Routing, colour: bool | None = None) -> str | None:
    """None when ``series`` satisfies ``rule``; otherwise the first reason why not.

    ``colour``: True for a model that reads RGB images, False for one that
    reads greyscale slices, None when either will do.
    """
    reason = skip_reason(series)
    if reason:
        return reason
    if colour is not None and series.is_colour != colour:
        return (
            "greyscale images; the model expects colour"
            if colour
            else "colour images; the model expects greyscale"
        )
    if rule.modalities and series.modality.upper() not in {m.upper() for m in rule.modalities}:
        return f"modality {series.modality or '-'} not in {rule.modalities}"
    if rule.sop_classes and series.sop_class_uid not in rule.sop_classes:
        return "SOP class not routed to this model"
    if rule.body_parts and series.body_part.upper() not in {b.upper() for b in rule.body_parts}:
        return f"body part {series.body_part or '-'} not in {rule.body_parts}"
    types = {t.upper() for t in series.image_type}
    missing = [t for t in rule.image_types if t.upper() not in types]
    if missing:
        return f"image type lacks {missing}"
    if series.num_slices < rule.min_slices:
        return f"{series.num_slices} slices, fewer than {rule.min_slices}"
    if rule.description_pattern and not re.search(rule.description_pattern, series.description):
        return "series description does not match"
    return None


def select_series(
    candidates: Sequence[SeriesCandidate], rule: Routing, colour: bool | None = None
) -> tuple[SeriesCandidate | None, dict[str, str]]:
    """Pick the best matching series: original/primary, axial, most slices.

    Returns the choice (or None) and, per rejected series, the reason.
    """
    rejected: dict[str, str] = {}
    eligible = []
    for cand in candidates:
        reason = matches(cand, rule, colour)
        if reason is None:
            eligible.append(cand)
        else:
            rejected[cand.series_instance_uid] = reason

    def rank(c: SeriesCandidate) -> tuple[int, int, int, str]:
        types = {t.upper() for t in c.image_type}
        return (
            int({"ORIGINAL", "PRIMARY"} <= types),
            int(c.is_axial),
            c.num_slices,
            c.series_instance_uid,
        )

    if not eligible:
        return None, rejected
    return max(eligible, key=rank), rejected
