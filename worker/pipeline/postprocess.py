"""Postprocessing of model outputs: label volumes, connected components, aggregation.

Pure functions over numpy arrays. Label arrays are indexed ``(slice, row, column)``
like :class:`worker.pipeline.volume.Volume` pixels, and ``spacing`` is
``(slice_mm, row_mm, col_mm)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "Component",
    "label_volume_ml",
    "soft_volume_ml",
    "open_mask",
    "bounding_box",
    "components",
    "max_diameter_mm",
    "classify",
    "AGGREGATIONS",
]

AGGREGATIONS = ("max", "mean", "top3_mean", "max_consistent")

#: Above this many boundary points the convex hull is used instead of all pairs.
_BRUTE_FORCE_POINTS = 2000


@dataclass(frozen=True)
class Component:
    """One 26-connected component of a label value."""

    label: int  # the label value
    index: int  # 1-based, components sorted by decreasing size
    voxel_count: int
    volume_ml: float
    max_diameter_mm: float
    centroid_voxel: tuple[float, float, float]  # (z, y, x) = (slice, row, column)
    centroid_mm: tuple[float, float, float] | None  # patient coordinates when geometry given
    bbox: tuple[int, int, int, int, int, int]  # (z0, y0, x0, z1, y1, x1), ends exclusive


def _as_3d(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim == 2:
        return arr[np.newaxis]
    if arr.ndim != 3:
        raise ValueError(f"labels must be 2D or 3D, got {arr.ndim}D")
    return arr


def _spacing(spacing: Sequence[float] | np.ndarray) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64)
    if s.shape != (3,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError("spacing must be three positive numbers (slice_mm, row_mm, col_mm)")
    return s


def label_volume_ml(labels: np.ndarray, value: int, spacing: Sequence[float] | np.ndarray) -> float:
    """Volume in millilitres of the voxels equal to ``value`` (voxel count x voxel size)."""
    s = _spacing(spacing)
    count = int(np.count_nonzero(_as_3d(labels) == value))
    return count * float(np.prod(s)) / 1000.0


def soft_volume_ml(
    probability: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float] | np.ndarray,
    scale: float = 1.0,
    dilate: int = 1,
) -> float:
    """Partial-volume-corrected volume (ml): the class probability summed over
    ``mask`` grown by ``dilate`` voxels (26-neighbourhood), times the voxel size.

    A model whose softmax estimates voxel occupancy (trained on soft targets)
    measures small structures on thick slices better this way than by counting
    argmax voxels. ``probability`` may be stored scaled (e.g. uint8 with
    ``scale=255``) to bound memory; the sum is done in float64. Only the mask's
    bounding box (plus the growth) is touched.
    """
    s = _spacing(spacing)
    m = _as_3d(mask)
    box = bounding_box(m, margin=max(int(dilate), 0))
    if box is None:
        return 0.0
    m = m[box].astype(np.uint8)
    if dilate > 0:
        # a 3x3x3 dilation is a separable maximum filter: much faster on big masks
        m = ndimage.maximum_filter(m, size=2 * int(dilate) + 1, mode="constant")
    total = float(np.sum(_as_3d(probability)[box], where=m.astype(bool), dtype=np.float64))
    return total / float(scale) * float(np.prod(s)) / 1000.0


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every True voxel, grown by
    ``margin`` voxels and clipped to the array; None for an empty mask."""
    m = np.asarray(mask)
    out = []
    for axis in range(m.ndim):
        other = tuple(a for a in range(m.ndim) if a != axis)
        hits = np.flatnonzero(m.any(axis=other))
        if hits.size == 0:
            return None
        lo = max(int(hits[0]) - margin, 0)
        hi = min(int(hits[-1]) + 1 + margin, m.shape[axis])
        out.append(slice(lo, hi))
    return tuple(out)


def _ball(spacing: np.ndarray, radius_mm: float) -> np.ndarray:
    """Boolean structuring element: the voxels whose centre is within
    ``radius_mm`` of the centre voxel, for anisotropic ``spacing``."""
    half = [int(np.floor(radius_mm / s + 1e-9)) for s in spacing]
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    dist2 = sum((g * s) ** 2 for g, s in zip(grids, spacing, strict=True))
    return np.asarray(dist2 <= radius_mm**2 + 1e-9)


def open_mask(
    mask: np.ndarray, spacing: Sequence[float] | np.ndarray, radius_mm: float
) -> np.ndarray:
    """Morphological opening of a 3D mask by a ball of ``radius_mm`` (in mm, so
    anisotropic voxels are handled), keeping the largest connected piece.

    Tubes thinner than the ball (vessels attached to a nodule) are cut off
    while a blob larger than the ball keeps its shape. Empty when nothing of
    the mask is as thick as the ball.
    """
    s = _spacing(spacing)
    m = _as_3d(mask).astype(bool)
    if radius_mm <= 0 or not m.any():
        return m
    ball = _ball(s, radius_mm)
    pad = [(h, h) for h in (np.asarray(ball.shape) // 2)]
    opened = ndimage.binary_opening(np.pad(m, pad), structure=ball)
    opened = opened[tuple(slice(p[0], p[0] + n) for p, n in zip(pad, m.shape, strict=True))]
    pieces, count = ndimage.label(opened, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return opened
    biggest = int(np.argmax(np.bincount(pieces.ravel())[1:])) + 1
    return np.asarray(pieces == biggest)


def max_diameter_mm(mask: np.ndarray, spacing: Sequence[float] | np.ndarray) -> float:
    """Largest distance (mm) between two voxel centres of a binary mask.

    Method: the farthest pair of points of a set is always a pair of vertices of
    its convex hull, and the hull vertices are boundary voxels. So the boundary
    voxels (mask minus its 6-connected erosion) are scaled to mm, their convex hull
    taken (scipy.spatial.ConvexHull, Qhull) when there are many, and the largest
    pairwise distance among the hull vertices (or all boundary points when few)
    computed in chunks: O(b log b) plus O(h^2) for b boundary and h hull points.

    Distances are centre to centre, so a voxelised sphere of radius r gives close
    to 2r (the voxels whose centre lies inside the sphere); a single voxel gives 0.
    """
    s = _spacing(spacing)
    m = _as_3d(mask).astype(bool)
    if not m.any():
        return 0.0
    boundary = m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(3, 1))
    points = np.argwhere(boundary).astype(np.float64) * s
    if len(points) < 2:
        return 0.0
    if len(points) > _BRUTE_FORCE_POINTS:
        points = _hull_vertices(points)
    return _max_pairwise(points)


def _hull_vertices(points: np.ndarray) -> np.ndarray:
    from scipy.spatial import ConvexHull, QhullError

    # Degenerate sets (all in one plane, e.g. a single-slice component) need the
    # hull of the plane; drop constant axes first, then fall back to joggling.
    varying = [i for i in range(3) if np.ptp(points[:, i]) > 0]
    if len(varying) <= 1:
        axis = varying[0] if varying else 0
        lo, hi = np.argmin(points[:, axis]), np.argmax(points[:, axis])
        return points[[lo, hi]]
    sub = points[:, varying]
    try:
        hull = ConvexHull(sub)
    except QhullError:
        try:
            hull = ConvexHull(sub, qhull_options="QJ")
        except QhullError:
            return points
    return points[np.unique(hull.vertices)]


def _max_pairwise(points: np.ndarray, chunk: int = 1024) -> float:
    best = 0.0
    for start in range(0, len(points), chunk):
        block = points[start : start + chunk]
        d2 = ((block[:, None, :] - points[None, start:, :]) ** 2).sum(axis=-1)
        best = max(best, float(d2.max()))
    return math.sqrt(best)


def components(
    labels: np.ndarray,
    value: int,
    spacing: Sequence[float] | np.ndarray,
    origin: Sequence[float] | np.ndarray | None = None,
    row_dir: Sequence[float] | np.ndarray | None = None,
    col_dir: Sequence[float] | np.ndarray | None = None,
    normal: Sequence[float] | np.ndarray | None = None,
    min_voxels: int = 1,
) -> list[Component]:
    """26-connected components of ``labels == value``, largest first.

    Components smaller than ``min_voxels`` are dropped. ``centroid_mm`` is given in
    patient coordinates when ``origin`` is (with the direction cosines of the volume;
    missing directions default to the patient axes), following
    :meth:`worker.pipeline.volume.Volume.voxel_to_patient`; otherwise it is None.
    """
    s = _spacing(spacing)
    full = _as_3d(labels) == value
    crop = bounding_box(full)
    if crop is None:
        return []
    mask = full[crop]
    base = np.array([sl.start for sl in crop], dtype=np.int64)
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)
    objects = ndimage.find_objects(labelled)
    geometry = None
    if origin is not None:
        geometry = (
            np.asarray(origin, dtype=np.float64),
            np.asarray(row_dir if row_dir is not None else (1.0, 0.0, 0.0), dtype=np.float64),
            np.asarray(col_dir if col_dir is not None else (0.0, 1.0, 0.0), dtype=np.float64),
            np.asarray(normal, dtype=np.float64)
            if normal is not None
            else np.cross(
                np.asarray(row_dir if row_dir is not None else (1.0, 0.0, 0.0), dtype=float),
                np.asarray(col_dir if col_dir is not None else (0.0, 1.0, 0.0), dtype=float),
            ),
        )
    voxel_ml = float(np.prod(s)) / 1000.0
    found: list[tuple[int, int, tuple[slice, ...]]] = []
    for i, sl in enumerate(objects, start=1):
        if sl is None or sizes[i] < max(1, min_voxels):
            continue
        found.append((int(sizes[i]), i, sl))
    found.sort(key=lambda t: (-t[0], t[1]))
    out: list[Component] = []
    for rank, (size, i, sl) in enumerate(found, start=1):
        sub = labelled[sl] == i
        idx = np.argwhere(sub).astype(np.float64)
        offset = np.array([sl[0].start, sl[1].start, sl[2].start], dtype=np.float64) + base
        c = idx.mean(axis=0) + offset
        centroid_mm = None
        if geometry is not None:
            o, r, col, n = geometry
            p = o + c[0] * s[0] * n + c[1] * s[1] * col + c[2] * s[2] * r
            centroid_mm = (float(p[0]), float(p[1]), float(p[2]))
        out.append(
            Component(
                label=int(value),
                index=rank,
                voxel_count=size,
                volume_ml=size * voxel_ml,
                max_diameter_mm=max_diameter_mm(sub, s),
                centroid_voxel=(float(c[0]), float(c[1]), float(c[2])),
                centroid_mm=centroid_mm,
                bbox=(
                    int(sl[0].start + base[0]),
                    int(sl[1].start + base[1]),
                    int(sl[2].start + base[2]),
                    int(sl[0].stop + base[0]),
                    int(sl[1].stop + base[1]),
                    int(sl[2].stop + base[2]),
                ),
            )
        )
    return out


def classify(
    probabilities_per_slice: Sequence[float] | np.ndarray,
    aggregation: str,
    threshold: float,
    slice_spacing_mm: float | None = None,
    window_mm: float = 3.0,
) -> tuple[float, bool]:
    """Aggregate per-slice probabilities into one (probability, present) decision.

    ``max``: the highest slice; ``mean``: the average; ``top3_mean``: the average
    of the three highest (all of them when fewer than three); ``max_consistent``:
    the highest, over slices, of the lowest probability among the slices within
    ``window_mm / 2`` of it (slices ordered along the normal, ``slice_spacing_mm``
    apart). A focal finding a few millimetres across is seen on every slice of
    such a window, while a false positive on one thin slice is not, so the study
    decision does not degrade as the number of thin slices grows. With slices
    thicker than half the window it equals ``max``. ``present`` is
    ``probability >= threshold``.
    """
    p = np.asarray(probabilities_per_slice, dtype=np.float64).ravel()
    if p.size == 0:
        raise ValueError("no probabilities to aggregate")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities contain NaN or infinity")
    if aggregation == "max":
        prob = float(p.max())
    elif aggregation == "mean":
        prob = float(p.mean())
    elif aggregation == "top3_mean":
        k = min(3, p.size)
        prob = float(np.sort(p)[-k:].mean())
    elif aggregation == "max_consistent":
        half = 0
        if slice_spacing_mm is not None and slice_spacing_mm > 0:
            half = int(np.floor(window_mm / 2.0 / slice_spacing_mm + 1e-6))
        if half == 0 or p.size == 1:
            prob = float(p.max())
        else:
            padded = np.pad(p, half, mode="edge")
            windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)
            prob = float(windows.min(axis=1).max())
    else:
        raise ValueError(f"unknown aggregation {aggregation!r} (one of {', '.join(AGGREGATIONS)})")
    return prob, prob >= threshold
