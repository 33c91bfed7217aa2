"""Series selection: per model, the matching series; never localizers, derived,
SR/SEG or our own results."""

from __future__ import annotations

from dataclasses import replace

from worker.pipeline.registry import Routing
from worker.pipeline.selection import SeriesCandidate, select_series, skip_reason

CT = SeriesCandidate(
    series_instance_uid="1.2.3.1",
    modality="CT",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    body_part="CHEST",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    num_slices=120,
    description="Thorax 1.0 B30f",
    is_axial=True,
    has_pixels=True,
    produced_by_us=False,
)
RULE = Routing(modalities=["CT"], image_types=["ORIGINAL", "PRIMARY"], min_slices=20)


def test_prefers_original_axial_with_most_slices() -> None:
    thin = replace(CT, series_instance_uid="1.2.3.2", num_slices=300)
    coronal = replace(CT, series_instance_uid="1.2.3.3", num_slices=500, is_axial=False)
    choice, rejected = select_series([CT, coronal, thin], RULE)
    assert choice is not None and choice.series_instance_uid == "1.2.3.2"
    assert rejected == {}


def test_skips_what_must_never_be_processed() -> None:
    localizer = replace(
        CT,
        series_instance_uid="9.1",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        num_slices=900,
    )
    derived = replace(
        CT, series_instance_uid="9.2", image_type=("DERIVED", "SECONDARY"), num_slices=900
    )
    ours = replace(CT, series_instance_uid="9.3", produced_by_us=True, num_slices=900)
    sr = replace(CT, series_instance_uid="9.4", modality="SR", has_pixels=False)
    seg = replace(CT, series_instance_uid="9.5", modality="SEG", num_slices=900)
    choice, rejected = select_series([localizer, derived, ours, sr, seg, CT], RULE)
    assert choice == CT
    assert rejected == {
        "9.1": "localizer",
        "9.2": "derived images",
        "9.3": "produced by pacs-ai",
        "9.4": "not an image series (SR)",
        "9.5": "not an image series (SEG)",
    }
    assert skip_reason(CT) is None


def test_rule_fields_each_reject_with_a_reason() -> None:
    assert select_series([replace(CT, modality="MR")], RULE)[0] is None
    assert select_series([replace(CT, num_slices=5)], RULE)[1] == {
        "1.2.3.1": "5 slices, fewer than 20"
    }
    body = Routing(modalities=["CT"], body_parts=["CHEST", "LUNG"])
    assert select_series([replace(CT, body_part="HEAD")], body)[0] is None
    assert select_series([replace(CT, body_part="lung")], body)[0] is not None
    desc = Routing(description_pattern=r"(?i)thorax|chest")
    assert select_series([CT], desc)[0] == CT
    assert select_series([replace(CT, description="Abdomen")], desc)[0] is None
    sop = Routing(sop_classes=["1.2.840.10008.5.1.4.1.1.77.1.1"])
    assert select_series([CT], sop)[0] is None


def test_colour_models_get_colour_series_and_greyscale_models_the_rest() -> None:
    anything = Routing(modalities=[], image_types=[], min_slices=1)
    photo = replace(CT, series_instance_uid="5.1", modality="XC", num_slices=1, is_colour=True)
    choice, rejected = select_series([CT, photo], anything, colour=True)
    assert choice is not None and choice.series_instance_uid == "5.1"
    assert rejected == {CT.series_instance_uid: "greyscale images; the model expects colour"}
    choice, rejected = select_series([CT, photo], anything, colour=False)
    assert choice is not None and choice.series_instance_uid == CT.series_instance_uid
    assert rejected == {"5.1": "colour images; the model expects greyscale"}
    # without a preference either will do
    choice, _ = select_series([photo], anything)
    assert choice is not None
