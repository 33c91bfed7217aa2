"""Model input recipes: the exact preprocessing shared by training and runtime.

A manifest's ``preprocessing`` dict (docs/MODELS.md) is turned into model
inputs here, and segmentation outputs are put back onto the original pixel
grid. ``scripts/build_demo_models.py`` trains through these same functions, so
what a model saw in training is what it sees in production. Pure functions of
numpy arrays (numpy, scipy, opencv); no I/O, no torch.

Axial slices (``mode: axial_slices``), per slice, in this order:

1. crop (``crop: "body"``): :func:`crop_box_body` finds the body (> -500 HU)
   and returns a square box around it with a 4 % margin, which may reach
   outside the image; outside pixels are air (-1000 HU). Without ``crop`` the
   whole slice is used (and resized to ``size`` whatever its aspect).
2. resize to ``size`` ([H, W]): area averaging when shrinking, bilinear when
   enlarging (pixel centres aligned, OpenCV convention).
3. denoise (optional, on HU at the model's size, so its parameters are in
   model pixels): ``{"method": "gaussian", "sigma": s}``, ``{"method":
   "median", "size": k}`` or ``{"method": "nlm", "h": hu, "template": 7,
   "search": 21}`` (OpenCV non-local means on 16-bit, L1 norm).
4. one channel per ``channels`` entry: ``{"window": [center, width]}`` maps
   ``center - width/2 .. center + width/2`` linearly onto 0..1 (clipped).
5. enhance (optional, per channel): ``{"method": "clahe", "clip_limit": c,
   "tiles": 8}``; ``clip_limit`` has scikit-image's meaning (fraction of a
   tile's pixels per bin, 256 bins).

Colour images (``mode: rgb_image``): optional ``crop: "center_square"``,
resize, optional denoise (gaussian or median, per channel), channels
(``{"component": "R" | "G" | "B" | "Y"}``, default R, G, B) scaled to 0..1
from 0..255 (floats are taken to be on the 0..255 scale too), optional CLAHE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

__all__ = [
    "BODY_THRESHOLD_HU",
    "Box",
    "RecipeError",
    "crop_box_body",
    "crop_resize",
    "full_box",
    "prepare_rgb",
    "prepare_slices",
    "restore_slices",
    "window",
]

Box = tuple[int, int, int, int]  # r0, r1, c0, c1 (half-open, may exceed the image)

BODY_THRESHOLD_HU = -500.0
AIR_HU = -1000.0
_PAD_FRACTION = 0.04


class RecipeError(ValueError):
    """The preprocessing dict is invalid; the message says what is wrong."""


# --------------------------------------------------------------------------- geometry


def full_box(shape: Sequence[int]) -> Box:
    return 0, int(shape[0]), 0, int(shape[1])


def crop_box_body(
    slice_hu: np.ndarray, threshold: float = BODY_THRESHOLD_HU, pad_fraction: float = _PAD_FRACTION
) -> Box:
    """Square box (r0, r1, c0, c1) around the body of one slice.

    The body is every connected region above ``threshold`` HU whose area is
    at least 10 % of the largest one (specks of noise or small objects are
    ignored). The box is centred on the body's bounding box, its side is the
    longer bounding-box side plus ``pad_fraction`` on each side (and 2 px),
    and it may extend past the image edges. A slice without body gives the
    centred square around the whole image.
    """
    img = np.asarray(slice_hu)
    rows, cols = img.shape
    mask = (img > threshold).astype(np.uint8)
    side_full = max(rows, cols)
    if not mask.any():
        return _square_box((rows - 1) / 2, (cols - 1) / 2, side_full)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.nonzero(areas >= max(0.1 * areas.max(), 4))[0] + 1
    if keep.size == 0:
        return _square_box((rows - 1) / 2, (cols - 1) / 2, side_full)
    r0 = int(stats[keep, cv2.CC_STAT_TOP].min())
    c0 = int(stats[keep, cv2.CC_STAT_LEFT].min())
    r1 = int((stats[keep, cv2.CC_STAT_TOP] + stats[keep, cv2.CC_STAT_HEIGHT]).max())
    c1 = int((stats[keep, cv2.CC_STAT_LEFT] + stats[keep, cv2.CC_STAT_WIDTH]).max())
    side = int(np.ceil(max(r1 - r0, c1 - c0) * (1 + 2 * pad_fraction))) + 2
    return _square_box((r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2, side)


def _square_box(center_r: float, center_c: float, side: int) -> Box:
    r0 = int(round(center_r - (side - 1) / 2))
    c0 = int(round(center_c - (side - 1) / 2))
    return r0, r0 + side, c0, c0 + side


def _crop(img: np.ndarray, box: Box, fill: float | Sequence[float]) -> np.ndarray:
    """img[r0:r1, c0:c1] with ``fill`` where the box leaves the image."""
    r0, r1, c0, c1 = box
    rows, cols = img.shape[:2]
    if r0 >= 0 and c0 >= 0 and r1 <= rows and c1 <= cols:
        return img[r0:r1, c0:c1]
    out = np.empty((r1 - r0, c1 - c0, *img.shape[2:]), dtype=img.dtype)
    out[...] = fill
    sr0, sr1, sc0, sc1 = max(r0, 0), min(r1, rows), max(c0, 0), min(c1, cols)
    if sr1 > sr0 and sc1 > sc0:
        out[sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0] = img[sr0:sr1, sc0:sc1]
    return out


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (H, W): area averaging when shrinking, bilinear otherwise."""
    h, w = size
    if img.shape[0] == h and img.shape[1] == w:
        return img
    shrink = img.shape[0] >= h and img.shape[1] >= w
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def crop_resize(
    img: np.ndarray, box: Box, size: Sequence[int], fill: float | Sequence[float] = AIR_HU
) -> np.ndarray:
    """Crop one 2D (or HWC) float image to ``box`` and resize it to ``size``
    exactly as :func:`prepare_slices` does (used for training targets too)."""
    arr = np.asarray(img, dtype=np.float32)
    return _resize(np.ascontiguousarray(_crop(arr, box, fill)), (int(size[0]), int(size[1])))


def window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map [center - width/2, center + width/2] onto [0, 1], clipped."""
    if width <= 0:
        raise RecipeError(f"window width must be > 0 (got {width})")
    lo = center - width / 2.0
    out = (np.asarray(values, dtype=np.float32) - np.float32(lo)) * np.float32(1.0 / width)
    return np.clip(out, 0.0, 1.0, out=out)


# --------------------------------------------------------------------------- recipe parts


def _size(recipe: Mapping[str, Any]) -> tuple[int, int]:
    size = recipe.get("size")
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise RecipeError(f"preprocessing.size must be [H, W] positive integers (got {size!r})")
    return int(size[0]), int(size[1])


def _denoise_hu(img: np.ndarray, spec: Mapping[str, Any] | None) -> np.ndarray:
    if not spec:
        return img
    method = spec.get("method")
    if method == "gaussian":
        sigma = float(spec.get("sigma", 1.0))
        return cv2.GaussianBlur(
            img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT
        )
    if method == "median":
        size = int(spec.get("size", 3))
        return ndimage.median_filter(img, size=size, mode="reflect")
    if method == "nlm":
        h = float(spec.get("h", 20.0))
        u16 = np.clip(np.rint(img + 1024.0), 0, 65535).astype(np.uint16)
        out = cv2.fastNlMeansDenoising(
            u16,
            h=[h],
            templateWindowSize=int(spec.get("template", 7)),
            searchWindowSize=int(spec.get("search", 21)),
            normType=cv2.NORM_L1,
        )
        return out.astype(np.float32) - 1024.0
    raise RecipeError(f"unknown denoise method {method!r} (gaussian, median, nlm)")


def _denoise_rgb(img: np.ndarray, spec: Mapping[str, Any] | None) -> np.ndarray:
    if not spec:
        return img
    method = spec.get("method")
    if method == "gaussian":
        sigma = float(spec.get("sigma", 1.0))
        return cv2.GaussianBlur(
            img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT
        )
    if method == "median":
        size = int(spec.get("size", 3))
        return ndimage.median_filter(img, size=(size, size, 1), mode="reflect")
    raise RecipeError(f"unknown denoise method {method!r} for rgb_image (gaussian, median)")


def _enhance(channel01: np.ndarray, spec: Mapping[str, Any] | None) -> np.ndarray:
    """Per-channel contrast enhancement of a [0, 1] image."""
    if not spec:
        return channel01
    method = spec.get("method")
    if method != "clahe":
        raise RecipeError(f"unknown enhance method {method!r} (clahe)")
    clip = float(spec.get("clip_limit", 0.01))
    tiles = int(spec.get("tiles", 8))
    u8 = np.clip(np.rint(channel01 * 255.0), 0, 255).astype(np.uint8)
    clahe = cv2.createCLAHE(clipLimit=max(clip * 256.0, 1e-3), tileGridSize=(tiles, tiles))
    return clahe.apply(u8).astype(np.float32) * np.float32(1 / 255.0)


def _windows(recipe: Mapping[str, Any]) -> list[tuple[float, float]]:
    channels = recipe.get("channels")
    if not isinstance(channels, Sequence) or not channels:
        raise RecipeError("preprocessing.channels must list at least one channel")
    out = []
    for ch in channels:
        win = ch.get("window") if isinstance(ch, Mapping) else None
        if not isinstance(win, Sequence) or len(win) != 2:
            raise RecipeError(f"each channel needs a window [center, width] (got {ch!r})")
        out.append((float(win[0]), float(win[1])))
    return out


# --------------------------------------------------------------------------- public API


def prepare_slices(
    hu_slices: np.ndarray, recipe: Mapping[str, Any], boxes: Sequence[Box] | None = None
) -> tuple[np.ndarray, list[Box]]:
    """Axial slices in HU (n, rows, cols) -> model input (n, C, H, W) float32
    in [0, 1] and the crop box of each slice (for :func:`restore_slices`).

    ``boxes``: crop boxes already computed for these slices by
    :func:`crop_box_body` (with ``crop: "body"``), to share them between models."""
    vol = np.asarray(hu_slices)
    if vol.ndim == 2:
        vol = vol[None]
    if vol.ndim != 3:
        raise RecipeError(f"expected slices (n, rows, cols), got shape {vol.shape}")
    size = _size(recipe)
    windows = _windows(recipe)
    crop = recipe.get("crop")
    if crop not in (None, "body"):
        raise RecipeError(f"unknown crop {crop!r} for axial_slices (body or null)")
    denoise, enhance = recipe.get("denoise"), recipe.get("enhance")
    out = np.empty((vol.shape[0], len(windows), *size), np.float32)
    if boxes is not None and len(boxes) != vol.shape[0]:
        raise RecipeError(f"{len(boxes)} crop boxes for {vol.shape[0]} slices")
    out_boxes: list[Box] = []
    for i in range(vol.shape[0]):
        sl = np.asarray(vol[i], dtype=np.float32)
        if crop == "body":
            box = boxes[i] if boxes is not None else crop_box_body(sl)
        else:
            box = full_box(sl.shape)
        out_boxes.append(box)
        img = _denoise_hu(crop_resize(sl, box, size, AIR_HU), denoise)
        for c, (center, width) in enumerate(windows):
            out[i, c] = _enhance(window(img, center, width), enhance)
    return out, out_boxes


def restore_slices(
    prob_or_labels: np.ndarray,
    boxes: Sequence[Box],
    out_shape: Sequence[int],
    fill: float | Sequence[float] | None = None,
) -> np.ndarray:
    """Model outputs (n, C, H, W) -> (n, C, rows, cols) on the original grid.

    Float arrays (probabilities or logits) are resized bilinearly into each
    slice's crop box; integer arrays (labels) by nearest neighbour. Pixels
    outside the box get ``fill`` (one value or one per channel); by default
    background: for floats channel 0 takes the slice's maximum and the other
    channels their minimum, so an argmax there is 0 and probabilities add
    nothing; integers take 0. Memory is n x C x rows x cols: restore a batch
    at a time for long series.
    """
    arr = np.asarray(prob_or_labels)
    if arr.ndim != 4:
        raise RecipeError(f"expected (n, C, H, W), got shape {arr.shape}")
    n, nc = arr.shape[:2]
    if len(boxes) != n:
        raise RecipeError(f"{len(boxes)} boxes for {n} slices")
    rows, cols = int(out_shape[0]), int(out_shape[1])
    is_int = np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_
    out_dtype = arr.dtype if is_int else np.float32
    out = np.empty((n, nc, rows, cols), out_dtype)
    for i in range(n):
        r0, r1, c0, c1 = boxes[i]
        if fill is not None:
            fills = np.broadcast_to(np.asarray(fill, dtype=np.float64), (nc,))
        elif is_int:
            fills = np.zeros(nc)
        else:
            fills = np.array([arr[i, 0].max()] + [arr[i, c].min() for c in range(1, nc)])
        for c in range(nc):
            out[i, c] = fills[c]
        sr0, sr1, sc0, sc1 = max(r0, 0), min(r1, rows), max(c0, 0), min(c1, cols)
        if sr1 <= sr0 or sc1 <= sc0:
            continue
        hwc = np.ascontiguousarray(np.moveaxis(arr[i], 0, -1))
        if is_int:
            src = hwc.astype(np.int32) if hwc.dtype.itemsize > 2 or hwc.dtype == np.bool_ else hwc
            res = cv2.resize(src, (c1 - c0, r1 - r0), interpolation=cv2.INTER_NEAREST_EXACT)
        else:
            res = cv2.resize(
                hwc.astype(np.float32, copy=False),
                (c1 - c0, r1 - r0),
                interpolation=cv2.INTER_LINEAR,
            )
        if res.ndim == 2:
            res = res[..., None]
        part = res[sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0]
        out[i, :, sr0:sr1, sc0:sc1] = np.moveaxis(part, -1, 0).astype(out_dtype, copy=False)
    return out


def restore_segmentation(
    probs: np.ndarray,
    boxes: Sequence[Box],
    labels: np.ndarray,
    soft: np.ndarray | None = None,
    normalized: bool = False,
) -> None:
    """Segmentation probabilities (n, C, H, W; channel 0 background) back onto
    the original grid, straight into the job's arrays.

    ``labels`` (n, rows, cols), zero on entry, gets the argmax of the bilinearly
    restored probabilities (the first channel wins ties; background outside each
    slice's box), as ``argmax(restore_slices(probs, boxes, fill=[1, 0, ...]))``.
    ``soft`` (K, n, rows, cols) uint8, zero on entry, gets the probability of
    classes 1..K scaled to 0..255. Only the box of each slice is written, and no
    (n, C, rows, cols) float array is made: this is the segmentation models' hot
    path. ``normalized``: the channels sum to one (a softmax), so the background
    is restored as one minus the others (linear interpolation keeps the sum),
    one channel less to resize.
    """
    arr = np.asarray(probs, dtype=np.float32)
    if arr.ndim != 4:
        raise RecipeError(f"expected (n, C, H, W), got shape {arr.shape}")
    n, nc = arr.shape[:2]
    if len(boxes) != n or labels.shape[0] != n:
        raise RecipeError(f"{len(boxes)} boxes and {labels.shape[0]} label slices for {n} slices")
    if nc < 2:
        return  # background only
    rows, cols = labels.shape[1:3]
    first = 1 if normalized else 0
    for i in range(n):
        r0, r1, c0, c1 = boxes[i]
        sr0, sr1, sc0, sc1 = max(r0, 0), min(r1, rows), max(c0, 0), min(c1, cols)
        if sr1 <= sr0 or sc1 <= sc0:
            continue
        # one contiguous 2D resize per channel: faster than one interleaved
        # multi-channel image, and what follows reads contiguous memory
        restored = [
            cv2.resize(arr[i, c], (c1 - c0, r1 - r0), interpolation=cv2.INTER_LINEAR)[
                sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0
            ]
            for c in range(first, nc)
        ]
        if normalized:
            best = 1.0 - restored[0]
            for channel in restored[1:]:
                best -= channel
            channels = [(c + 1, ch) for c, ch in enumerate(restored)]
        else:
            best = restored[0].copy()
            channels = [(c + 1, ch) for c, ch in enumerate(restored[1:])]
        out = labels[i, sr0:sr1, sc0:sc1]
        for value, channel in channels:
            out[channel > best] = value
            np.maximum(best, channel, out=best)
        if soft is not None:
            for value, channel in channels[: soft.shape[0]]:
                scaled = np.rint(channel * 255.0)
                np.clip(scaled, 0, 255, out=scaled)
                soft[value - 1, i, sr0:sr1, sc0:sc1] = scaled


_COMPONENTS = {"R": 0, "G": 1, "B": 2}


def prepare_rgb(images: np.ndarray, recipe: Mapping[str, Any]) -> np.ndarray:
    """Colour images (n, rows, cols, 3) uint8 (or float on the 0..255 scale;
    (n, rows, cols) greyscale is replicated) -> (n, C, H, W) float32 in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim == 3 and arr.shape[-1] != 3:
        arr = arr[..., None]
    if arr.ndim == 3:  # a single colour image
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise RecipeError(f"expected images (n, rows, cols, 3), got shape {np.shape(images)}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    size = _size(recipe)
    crop = recipe.get("crop")
    if crop not in (None, "center_square"):
        raise RecipeError(f"unknown crop {crop!r} for rgb_image (center_square or null)")
    channels = recipe.get("channels") or [
        {"component": "R"},
        {"component": "G"},
        {"component": "B"},
    ]
    comps = []
    for ch in channels:
        comp = ch.get("component") if isinstance(ch, Mapping) else None
        if comp not in ("R", "G", "B", "Y"):
            raise RecipeError(f"rgb channel needs component R, G, B or Y (got {ch!r})")
        comps.append(comp)
    denoise, enhance = recipe.get("denoise"), recipe.get("enhance")
    out = np.empty((arr.shape[0], len(comps), *size), np.float32)
    for i in range(arr.shape[0]):
        img = np.asarray(arr[i], dtype=np.float32)
        if crop == "center_square":
            rows, cols = img.shape[:2]
            side = min(rows, cols)
            box = _square_box((rows - 1) / 2, (cols - 1) / 2, side)
        else:
            box = full_box(img.shape)
        img = crop_resize(img, box, size, 0.0)
        img = _denoise_rgb(img, denoise) * np.float32(1 / 255.0)
        np.clip(img, 0.0, 1.0, out=img)
        for c, comp in enumerate(comps):
            if comp == "Y":
                ch01 = 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]
            else:
                ch01 = img[..., _COMPONENTS[comp]]
            out[i, c] = _enhance(ch01, enhance)
    return out
