"""worker.pipeline.postprocess: volumes, components, diameters, centroids, aggregation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from worker.pipeline.postprocess import classify, components, label_volume_ml, max_diameter_mm


def sphere(
    radius_mm: float,
    spacing: Sequence[float],
    centre_mm: Sequence[float],
    shape: Sequence[int],
) -> np.ndarray:
    """Voxels whose centre lies within the sphere (z, y, x in mm from voxel 0)."""
    z, y, x = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = (
        (z * spacing[0] - centre_mm[0]) ** 2
        + (y * spacing[1] - centre_mm[1]) ** 2
        + (x * spacing[2] - centre_mm[2]) ** 2
    )
    return d2 <= radius_mm**2


SPACINGS = [(1.0, 1.0, 1.0), (2.5, 0.7, 0.7), (5.0, 0.8, 0.6), (1.25, 0.9, 0.5)]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("radius", [8.0, 20.0])
def test_sphere_volume_and_diameter(spacing: tuple[float, float, float], radius: float) -> None:
    shape = tuple(int(2 * radius / s) + 8 for s in spacing)
    centre = tuple((n / 2 - 0.3) * s for n, s in zip(shape, spacing, strict=True))
    mask = sphere(radius, spacing, centre, shape).astype(np.uint8) * 3
    expected_ml = 4 / 3 * math.pi * radius**3 / 1000
    # coarse slices (5 mm for an 8 mm radius) are the hard case
    tol = 0.06 if radius / spacing[0] < 2 else 0.03
    assert label_volume_ml(mask, 3, spacing) == pytest.approx(expected_ml, rel=tol)
    comps = components(mask, 3, spacing)
    assert len(comps) == 1
    c = comps[0]
    assert c.label == 3 and c.index == 1
    assert c.volume_ml == pytest.approx(expected_ml, rel=tol)
    assert c.max_diameter_mm == pytest.approx(2 * radius, rel=0.04)
    assert c.max_diameter_mm <= 2 * radius + 1e-9  # centre to centre never exceeds it
    assert c.centroid_mm is None
    np.testing.assert_allclose(np.array(c.centroid_voxel) * spacing, centre, atol=0.05 * radius)


def test_large_sphere_uses_the_hull_and_stays_exact() -> None:
    spacing = (1.0, 0.7, 0.7)
    radius = 30.0
    shape = tuple(int(2 * radius / s) + 6 for s in spacing)
    centre = tuple(n / 2 * s for n, s in zip(shape, spacing, strict=True))
    mask = sphere(radius, spacing, centre, shape)
    d = max_diameter_mm(mask, spacing)
    assert d == pytest.approx(2 * radius, rel=0.01)
    # brute force over the same boundary points gives the same answer
    from scipy import ndimage

    boundary = mask & ~ndimage.binary_erosion(mask)
    pts = np.argwhere(boundary)[::7] * np.array(spacing)
    sub = max(float(np.sqrt(((pts[i] - pts) ** 2).sum(axis=1)).max()) for i in range(len(pts)))
    assert d >= sub - 1e-9


def test_box_diameter_is_its_diagonal() -> None:
    mask = np.zeros((6, 10, 12), dtype=np.uint8)
    mask[1:4, 2:8, 3:11] = 1  # 3 x 6 x 8 voxels
    spacing = (2.0, 0.5, 0.25)
    extent = np.array([2, 5, 7]) * spacing
    assert max_diameter_mm(mask, spacing) == pytest.approx(float(np.linalg.norm(extent)))
    assert label_volume_ml(mask, 1, spacing) == pytest.approx(3 * 6 * 8 * 0.25 / 1000)


def test_flat_and_tiny_components() -> None:
    spacing = (3.0, 1.0, 1.0)
    mask = np.zeros((3, 60, 60), dtype=np.uint8)
    yy, xx = np.ogrid[:60, :60]
    mask[1] = (yy - 30) ** 2 + (xx - 30) ** 2 <= 25**2  # a single-slice disc (coplanar)
    assert max_diameter_mm(mask, spacing) == pytest.approx(50, rel=0.02)
    single = np.zeros((3, 3, 3), dtype=np.uint8)
    single[1, 1, 1] = 1
    assert max_diameter_mm(single, spacing) == 0.0
    line = np.zeros((1, 1, 4000), dtype=np.uint8)
    line[0, 0, 10:3010] = 1  # many collinear boundary points
    assert max_diameter_mm(line, (1, 1, 0.5)) == pytest.approx(2999 * 0.5)
    assert max_diameter_mm(np.zeros((2, 2, 2)), spacing) == 0.0


def test_two_components_sorted_with_centroids_in_mm() -> None:
    spacing = (2.0, 0.5, 0.5)
    shape = (40, 120, 120)
    big = sphere(12.0, spacing, (30.0, 20.0, 20.0), shape)
    small = sphere(5.0, spacing, (50.0, 45.0, 40.0), shape)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[big] = 1
    labels[small] = 1
    labels[0, 0, 0] = 1  # a stray voxel
    labels[5, 100, 100] = 2  # another label value is ignored
    origin = np.array([-100.0, 50.0, 20.0])
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, 0.0, -1.0])  # coronal
    normal = np.cross(row_dir, col_dir)
    comps = components(labels, 1, spacing, origin, row_dir, col_dir, normal, min_voxels=5)
    assert len(comps) == 2
    a, b = comps
    assert a.index == 1 and b.index == 2 and a.voxel_count > b.voxel_count
    assert a.volume_ml == pytest.approx(4 / 3 * math.pi * 12**3 / 1000, rel=0.03)
    assert b.volume_ml == pytest.approx(4 / 3 * math.pi * 5**3 / 1000, rel=0.06)
    assert a.max_diameter_mm == pytest.approx(24, rel=0.04)
    assert b.max_diameter_mm == pytest.approx(10, rel=0.06)
    # centre (z=30, y=20, x=20) mm from voxel 0 -> origin + 30*normal + 20*col + 20*row
    expected = origin + 30.0 * normal + 20.0 * col_dir + 20.0 * row_dir
    assert a.centroid_mm is not None
    np.testing.assert_allclose(a.centroid_mm, expected, atol=0.05)
    z0, y0, x0, z1, y1, x1 = a.bbox
    assert labels[z0:z1, y0:y1, x0:x1].sum() >= a.voxel_count
    assert (z1 - z0) * spacing[0] == pytest.approx(24 + spacing[0], abs=2 * spacing[0])
    # without min_voxels the stray voxel is a third component
    assert len(components(labels, 1, spacing)) == 3
    assert components(labels, 7, spacing) == []


def test_26_connectivity() -> None:
    labels = np.zeros((3, 3, 3), dtype=np.uint8)
    labels[0, 0, 0] = 1
    labels[1, 1, 1] = 1  # touches only by a corner
    labels[2, 2, 2] = 1
    assert len(components(labels, 1, (1, 1, 1))) == 1


def test_2d_labels_and_bad_spacing() -> None:
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[2:5, 2:5] = 1
    (c,) = components(labels, 1, (1.0, 2.0, 2.0))
    assert c.voxel_count == 9 and c.volume_ml == pytest.approx(9 * 4 / 1000)
    with pytest.raises(ValueError):
        label_volume_ml(labels, 1, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError):
        label_volume_ml(labels, 1, (1.0, 1.0))


@pytest.mark.parametrize(
    "aggregation, expected",
    [("max", 0.9), ("mean", 0.35), ("top3_mean", (0.9 + 0.6 + 0.25) / 3)],
)
def test_classify(aggregation: str, expected: float) -> None:
    probs = [0.1, 0.9, 0.2, 0.05, 0.6, 0.25]
    prob, present = classify(probs, aggregation, 0.5)
    assert prob == pytest.approx(expected)
    assert present == (expected >= 0.5)


def test_classify_edge_cases() -> None:
    assert classify([0.7, 0.4], "top3_mean", 0.55) == (pytest.approx(0.55), True)
    assert classify(np.array([[0.3], [0.2]]), "max", 0.5) == (pytest.approx(0.3), False)
    with pytest.raises(ValueError):
        classify([], "max", 0.5)
    with pytest.raises(ValueError):
        classify([0.1, float("nan")], "mean", 0.5)
    with pytest.raises(ValueError):
        classify([0.1], "median", 0.5)


def test_max_consistent_ignores_single_thin_slice_false_positives() -> None:
    clean = np.zeros(300)
    clean[[40, 41, 150]] = 0.99  # a pair and a single slice: vessel crossings on 1 mm slices
    nodule = np.zeros(300)
    nodule[100:108] = 0.98  # a 10 mm nodule seen on 8 consecutive 1 mm slices
    nodule[100] = 0.7
    for p, spacing, expected in (
        (clean, 1.0, False),
        (nodule, 1.0, True),
        (clean, 0.625, False),
        (nodule, 0.625, True),
    ):
        prob, present = classify(p, "max_consistent", 0.5, slice_spacing_mm=spacing)
        assert present is expected, (spacing, prob)
    # the window is in millimetres: a 2-slice finding on 5 mm slices is kept
    thick = np.zeros(40)
    thick[20] = 0.9
    assert classify(thick, "max_consistent", 0.5, slice_spacing_mm=5.0) == (0.9, True)
    # without geometry (a single image) it is the maximum
    assert classify([0.8], "max_consistent", 0.5) == (0.8, True)
    assert classify(clean, "max_consistent", 0.5, window_mm=0.5, slice_spacing_mm=1.0)[1]


def test_opening_cuts_an_attached_vessel_off_a_nodule() -> None:
    from worker.pipeline.postprocess import open_mask

    spacing = (1.0, 0.7, 0.7)
    z, y, x = np.mgrid[:40, :60, :60].astype(float)
    zz, yy, xx = z * spacing[0], y * spacing[1], x * spacing[2]
    ball = (zz - 20) ** 2 + (yy - 21) ** 2 + (xx - 21) ** 2 <= 6.0**2  # a 12 mm nodule
    vessel = ((zz - 20) ** 2 + (yy - 21) ** 2 <= 1.2**2) & (xx > 21) & (xx < 40)  # 2.4 mm tube
    merged = ball | vessel
    assert max_diameter_mm(merged, spacing) > 20
    opened = open_mask(merged, spacing, 2.0)
    assert label_volume_ml(opened, 1, spacing) == pytest.approx(
        label_volume_ml(ball, 1, spacing), rel=0.03
    )
    assert max_diameter_mm(opened, spacing) == pytest.approx(12.0, abs=1.5)
    # a tube alone disappears; thick slices use an in-plane disc
    assert not open_mask(vessel, spacing, 2.0).any()
    assert open_mask(ball, (5.0, 0.7, 0.7), 2.0).sum() > 0
