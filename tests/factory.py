"""Synthetic DICOM data for tests and benchmarks (generated, never shipped)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CANARY_NAME = "CANARY^Zyxwvut"
CANARY_ID = "CANARYID-98765"
CANARY_BIRTH = "19010203"


def ct_slice(
    study_uid: str,
    series_uid: str,
    index: int,
    rows: int = 64,
    cols: int = 64,
    spacing: float = 0.8,
    thickness: float = 2.5,
    patient_name: str = CANARY_NAME,
    patient_id: str = CANARY_ID,
    pixels: np.ndarray | None = None,
) -> Dataset:
    """One axial CT slice (signed 16 bit, rescale -1024)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    sop_uid = generate_uid()
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = series_uid + ".1" if len(series_uid) < 62 else generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = CANARY_BIRTH
    ds.PatientSex = "O"
    today = dt.date.today().strftime("%Y%m%d")
    ds.StudyDate = today
    ds.SeriesDate = today
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.Manufacturer = "pacs-ai tests"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "CHEST"
    ds.ImagePositionPatient = [-cols * spacing / 2, -rows * spacing / 2, -index * thickness]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = thickness
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    if pixels is None:
        rng = np.random.default_rng(index)
        pixels = (rng.normal(1024, 20, (rows, cols))).astype(np.int16)
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def write_ct_series(
    folder: Path, n: int, rows: int = 64, cols: int = 64, study_uid: str | None = None, **kw: object
) -> list[Path]:
    """Write an n-slice CT series as Part 10 files; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for i in range(n):
        ds = ct_slice(study_uid, series_uid, i, rows=rows, cols=cols, **kw)  # type: ignore[arg-type]
        path = folder / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
