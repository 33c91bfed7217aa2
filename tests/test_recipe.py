"""Model input recipes (pipeline/recipe.py) and soft volumes (pipeline/postprocess.py)."""

from __future__ import annotations

import numpy as np
import pytest

from worker.pipeline import postprocess, recipe
from worker.pipeline.recipe import RecipeError

CT_RECIPE = {
    "mode": "axial_slices",
    "crop": "body",
    "size": [128, 128],
    "channels": [{"window": [-600, 1500]}, {"window": [40, 400]}],
}


def chest_slice(
    rows: int = 300, cols: int = 260, offset: tuple[int, int] = (10, -15)
) -> np.ndarray:
    """Air around an off-centre elliptic body (40 HU) with one round lung (-850 HU)."""
    rr, cc = np.mgrid[:rows, :cols].astype(np.float32)
    cy, cx = rows / 2 + offset[0], cols / 2 + offset[1]
    img = np.full((rows, cols), -1000.0, np.float32)
    img[((rr - cy) / 90) ** 2 + ((cc - cx) / 110) ** 2 <= 1] = 40.0
    img[(rr - cy) ** 2 + (cc - cx - 40) ** 2 <= 45**2] = -850.0
    return img


def test_window_maps_center_and_width_onto_unit_range() -> None:
    values = np.array([-2000.0, -600.0 - 750.0, -600.0, -225.0, -600.0 + 750.0, 3000.0])
    out = recipe.window(values, -600.0, 1500.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 0.75, 1.0, 1.0], atol=1e-6)
    with pytest.raises(RecipeError, match="width"):
        recipe.window(values, 0.0, 0.0)


def test_body_crop_is_a_square_around_the_body() -> None:
    img = chest_slice()
    r0, r1, c0, c1 = recipe.crop_box_body(img)
    assert r1 - r0 == c1 - c0  # square
    body = np.argwhere(img > -500)
    assert r0 <= body[:, 0].min() and r1 > body[:, 0].max()
    assert c0 <= body[:, 1].min() and c1 > body[:, 1].max()
    # tight: the margin is a few per cent of the body's width (220 px)
    assert c1 - c0 < 220 * 1.15
    # noise specks do not widen the box
    specks = img.copy()
    specks[2, 2] = specks[-3, -3] = 500.0
    assert recipe.crop_box_body(specks) == (r0, r1, c0, c1)


def test_prepare_slices_shapes_channels_and_boxes() -> None:
    vol = np.stack([chest_slice(), chest_slice(offset=(-20, 5))])
    x, boxes = recipe.prepare_slices(vol, CT_RECIPE)
    assert x.shape == (2, 2, 128, 128) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert len(boxes) == 2 and boxes[0] != boxes[1]
    # lung window [-600, 1500]: air (-1000) 0.233, lung (-850) 0.333, tissue (40) 0.927
    assert x[0, 0, 0, 0] == pytest.approx(0.2333, abs=1e-3)
    row = x[0, 0, 64]
    assert row.min() == pytest.approx(0.2333, abs=0.01)
    assert np.any(np.abs(row - 0.3333) < 0.01) and row.max() == pytest.approx(0.9267, abs=0.01)


def test_resampling_round_trip_restores_a_mask_on_the_original_grid() -> None:
    """prepare (crop + resize) then restore (inverse) puts a structure back in place."""
    img = chest_slice()
    lung = img < -500
    _x, boxes = recipe.prepare_slices(img[None], CT_RECIPE)
    # the "model output": probabilities of (background, lung) on the model grid
    p_lung = recipe.crop_resize(
        (lung & (img > -900)).astype(np.float32), boxes[0], CT_RECIPE["size"], 0.0
    )
    probs = np.stack([1.0 - p_lung, p_lung])[None]
    restored = recipe.restore_slices(probs, boxes, img.shape, fill=[1.0, 0.0])
    assert restored.shape == (1, 2, *img.shape)
    back = restored[0].argmax(axis=0) == 1
    truth = (img > -900) & (img < -500)
    dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.97
    assert abs(int(back.sum()) - int(truth.sum())) / truth.sum() < 0.03
    # soft volumes survive resampling: probability mass equals the area
    assert restored[0, 1].sum() == pytest.approx(truth.sum(), rel=0.02)
    assert (back & (img == -1000.0)).sum() <= 0.01 * truth.sum()  # none in the air


def test_restore_labels_nearest_and_default_fill() -> None:
    labels = np.zeros((1, 1, 4, 4), np.uint8)
    labels[0, 0, 1:3, 1:3] = 2
    out = recipe.restore_slices(labels, [(2, 10, 2, 10)], (12, 12))
    assert out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 2}
    assert out[0, 0, :2].max() == 0  # outside the box: background
    assert (out[0, 0] == 2).sum() == 16  # 2x2 scaled by 2 in each direction
    with pytest.raises(RecipeError):
        recipe.restore_slices(labels, [], (12, 12))


@pytest.mark.parametrize("normalized", [True, False])
def test_restore_segmentation_matches_restoring_then_argmax(normalized: bool) -> None:
    """The fused restore gives the labels and uint8 probabilities of restoring
    every channel onto the grid and taking the argmax there, for boxes inside,
    across and outside the image."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (4, 3, 16, 16)).astype(np.float32)
    probs = np.exp(logits)
    if normalized:
        probs /= probs.sum(axis=1, keepdims=True)
    else:
        probs = 1 / (1 + np.exp(-logits))  # independent sigmoids: no sum to one
    boxes = [(2, 30, 4, 28), (-5, 20, -3, 41), (0, 40, 0, 40), (45, 60, 45, 60)]
    shape = (40, 40)
    reference = recipe.restore_slices(probs, boxes, shape, fill=[1.0, 0.0, 0.0])
    want_labels = np.argmax(reference, axis=1).astype(np.uint8)
    want_soft = np.rint(np.moveaxis(reference[:, 1:], 1, 0) * 255).astype(np.uint8)

    labels = np.zeros((4, *shape), np.uint8)
    soft = np.zeros((2, 4, *shape), np.uint8)
    recipe.restore_segmentation(probs, boxes, labels, soft, normalized=normalized)
    # float rounding may flip a pixel whose two top classes are equal
    assert np.mean(labels == want_labels) > 0.999
    assert np.abs(soft.astype(int) - want_soft).max() <= 1
    assert labels[3].max() == 0 and soft[:, 3].max() == 0  # box outside the image
    assert set(np.unique(labels)) == {0, 1, 2}
    with pytest.raises(RecipeError):
        recipe.restore_segmentation(probs, boxes[:2], labels)


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "gaussian", "sigma": 1.0},
        {"method": "median", "size": 3},
        {"method": "nlm", "h": 30.0},
    ],
)
def test_denoising_reduces_noise_and_keeps_the_mean(spec: dict) -> None:
    rng = np.random.default_rng(0)
    flat = np.full((1, 96, 96), 40.0, np.float32) + rng.normal(0, 20, (1, 96, 96)).astype(
        np.float32
    )
    plain = {"size": [96, 96], "channels": [{"window": [40, 400]}]}
    x0, _ = recipe.prepare_slices(flat, plain)
    x1, _ = recipe.prepare_slices(flat, {**plain, "denoise": spec})
    assert x1.std() < 0.6 * x0.std()
    assert x1.mean() == pytest.approx(x0.mean(), abs=0.01)


def test_clahe_increases_local_contrast_and_unknown_methods_fail() -> None:
    rr = np.linspace(0, 1, 64, dtype=np.float32)
    low_contrast = np.tile(0.45 + 0.1 * rr, (64, 1))[None] * 400.0 - 160.0  # HU in window
    plain = {"size": [64, 64], "channels": [{"window": [40, 400]}]}
    x0, _ = recipe.prepare_slices(low_contrast, plain)
    x1, _ = recipe.prepare_slices(
        low_contrast, {**plain, "enhance": {"method": "clahe", "clip_limit": 0.03}}
    )
    assert np.ptp(x1) > 1.3 * np.ptp(x0)
    assert x1.min() >= 0.0 and x1.max() <= 1.0
    with pytest.raises(RecipeError, match="denoise"):
        recipe.prepare_slices(low_contrast, {**plain, "denoise": {"method": "magic"}})
    with pytest.raises(RecipeError, match="enhance"):
        recipe.prepare_slices(low_contrast, {**plain, "enhance": {"method": "magic"}})
    with pytest.raises(RecipeError, match="size"):
        recipe.prepare_slices(low_contrast, {"size": [0, 64], "channels": plain["channels"]})


def test_prepare_rgb_channels_scale_and_luma() -> None:
    img = np.zeros((40, 60, 3), np.uint8)
    img[..., 0] = 255  # pure red
    x = recipe.prepare_rgb(img[None], {"size": [32, 32]})
    assert x.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(x[0, :, 16, 16], [1.0, 0.0, 0.0], atol=1e-6)
    y = recipe.prepare_rgb(img[None], {"size": [32, 32], "channels": [{"component": "Y"}]})
    assert y[0, 0, 16, 16] == pytest.approx(0.299, abs=1e-3)
    sq = recipe.prepare_rgb(img[None], {"size": [32, 32], "crop": "center_square"})
    assert sq.shape == (1, 3, 32, 32)
    with pytest.raises(RecipeError):
        recipe.prepare_rgb(img[None], {"size": [32, 32], "channels": [{"component": "Q"}]})


def test_soft_volume_counts_partial_occupancy() -> None:
    spacing = (2.0, 1.0, 1.0)  # 2 ul voxels
    prob = np.zeros((5, 10, 10), np.float32)
    prob[2, 4:6, 4:6] = 1.0  # 4 full voxels
    prob[1, 4:6, 4:6] = 0.5  # partial voxels next to them (not in the argmax mask)
    prob[0, 0, 0] = 0.4  # far-away noise, not counted
    mask = prob >= 0.5
    mask[1] = False
    soft = postprocess.soft_volume_ml(prob, mask, spacing)
    assert soft == pytest.approx((4 + 4 * 0.5) * 2.0 / 1000.0)
    # stored as uint8 (x255) gives the same within rounding
    soft_u8 = postprocess.soft_volume_ml(np.rint(prob * 255).astype(np.uint8), mask, spacing, 255)
    assert soft_u8 == pytest.approx(soft, rel=0.01)
    assert postprocess.soft_volume_ml(prob, np.zeros_like(mask), spacing) == 0.0


def test_channel_argmax_matches_numpy_including_ties() -> None:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 4, (5, 3, 16, 16)).astype(np.float32)  # many ties
    labels = np.zeros((5, 16, 16), np.uint8)
    # boxes covering the grid at the model size: the resize is the identity
    recipe.restore_segmentation(arr, [(0, 16, 0, 16)] * 5, labels)
    np.testing.assert_array_equal(labels, np.argmax(arr, axis=1))
