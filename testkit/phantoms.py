"""Synthetic data: a chest CT phantom family and endoscopy-like colour images.

Used to train the demo models (``scripts/build_demo_models.py``), to evaluate
them (``bench/eval_models.py``) and in tests. Pure numpy/scipy (opencv for
resizing), no I/O, deterministic for a given seed.

Chest CT phantom
================
Patient coordinates are DICOM LPS millimetres: x to the patient's left (image
columns), y posterior (image rows), z superior (slices). The volume arrays are
ordered by ascending z (index 0 is the most inferior slice); the DICOM series
made by :func:`phantom_to_datasets` numbers instances from the top down, as
scanners do, so a reader must sort by ImagePositionPatient.

Anatomy (all analytic shapes):

* body: an elliptic cylinder of soft tissue (~40 HU) with a ring of
  subcutaneous fat (~-100 HU); air (-1000 HU) outside;
* spine (vertebral body with a cortical rim ~700 HU, canal, posterior
  elements) and a small sternum, constant along z;
* two lungs: ellipsoids around -850 HU with a smooth parenchymal texture and a
  procedural vessel network (tubes of 1.5-3 mm; they belong to the lung label);
* optional spherical soft-tissue nodules (~40 HU, 6-30 mm diameter), fully
  inside one lung and inside the scanned slab.

Partial volume is rendered exactly along z (for each in-plane point the z
interval inside an ellipsoid or sphere is known in closed form and intersected
with the slice's slab) and by 4x4 supersampling in-plane where the occupancy
changes within a pixel. The z-invariant body is rendered at 4x resolution and
block-averaged. Truth volumes are computed analytically over the scanned slab
(from the bottom edge of the first slice to the top edge of the last), never
from the voxel grid. ``labels`` is the per-voxel argmax of the occupancies
(background, lung without nodule, nodule).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cv2
import numpy as np

__all__ = [
    "ChestGeometry",
    "EndoscopyImage",
    "Nodule",
    "Phantom",
    "RenderedSlice",
    "endoscopy_to_dataset",
    "generate_chest_ct",
    "generate_endoscopy_image",
    "phantom_to_datasets",
    "sample_geometry",
]

AIR_HU = -1000.0
_SS = 4  # in-plane supersampling factor at edges
_TYPICAL_THICKNESS = (0.625, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
_MATRICES = (256, 320, 384, 448, 512)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Nodule:
    center: tuple[float, float, float]  # x, y, z in mm (LPS)
    diameter_mm: float
    lung: int  # 0: right lung (negative x), 1: left lung
    hu: float = 40.0


@dataclass(frozen=True)
class _Ellipsoid:
    center: tuple[float, float, float]
    axes: tuple[float, float, float]  # semi-axes x, y, z

    def volume_in_slab(self, z0: float, z1: float) -> float:
        """Exact volume (mm^3) of the part with z0 <= z <= z1."""
        cx, cy, cz = self.center
        ax, ay, az = self.axes
        lo, hi = max(z0, cz - az), min(z1, cz + az)
        if hi <= lo:
            return 0.0

        def prim(z: float) -> float:
            u = z - cz
            return u - u**3 / (3.0 * az * az)

        return math.pi * ax * ay * (prim(hi) - prim(lo))

    def inplane_halfwidths(self, z0: float, z1: float) -> tuple[float, float] | None:
        """Largest in-plane semi-axes of the cross-sections within [z0, z1]."""
        cz, az = self.center[2], self.axes[2]
        if z1 < cz - az or z0 > cz + az:
            return None
        d = 0.0 if z0 <= cz <= z1 else min(abs(z0 - cz), abs(z1 - cz))
        s = math.sqrt(max(0.0, 1.0 - (d / az) ** 2))
        return self.axes[0] * s, self.axes[1] * s

    def zfrac(self, x: np.ndarray, y: np.ndarray, z0: float, z1: float) -> np.ndarray:
        """Fraction of the slab [z0, z1] inside the ellipsoid above each (x, y)."""
        cx, cy, cz = self.center
        ax, ay, az = self.axes
        q = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
        h = az * np.sqrt(np.maximum(1.0 - q, 0.0))
        ov = np.minimum(cz + h, z1) - np.maximum(cz - h, z0)
        return np.clip(ov / (z1 - z0), 0.0, 1.0).astype(np.float32)


class RenderedSlice(NamedTuple):
    hu: np.ndarray
    lung: np.ndarray | None
    nodule: np.ndarray | None
    labels: np.ndarray | None


@dataclass
class ChestGeometry:
    """Every parameter of one phantom; :meth:`render_slice` renders a slice."""

    seed: int
    rows: int
    cols: int
    row_mm: float
    col_mm: float
    thickness_mm: float
    slices: int
    z0_mm: float  # z of the first (most inferior) slice centre
    x0_mm: float  # x of column 0 centre
    y0_mm: float  # y of row 0 centre
    body_axes: tuple[float, float]
    body_center: tuple[float, float]
    fat_mm: float
    fat_hu: float
    tissue_hu: float
    lungs: tuple[_Ellipsoid, _Ellipsoid]
    lung_hu: tuple[float, float]
    texture_hu: float
    vessel_radius_mm: float
    vessel_wavelength_mm: float
    noise_sigma: float
    nodules: tuple[Nodule, ...]
    age_years: int | None
    sex: str | None
    _waves: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _base: np.ndarray | None = field(default=None, repr=False)

    # ------------------------------------------------------------ derived values
    @property
    def slice_spacing_mm(self) -> float:
        return self.thickness_mm

    @property
    def z_positions(self) -> np.ndarray:
        return self.z0_mm + np.arange(self.slices) * self.slice_spacing_mm

    @property
    def slab(self) -> tuple[float, float]:
        t = self.thickness_mm
        return self.z0_mm - t / 2, self.z0_mm + (self.slices - 1) * self.slice_spacing_mm + t / 2

    @property
    def x_coords(self) -> np.ndarray:
        return (self.x0_mm + np.arange(self.cols) * self.col_mm).astype(np.float64)

    @property
    def y_coords(self) -> np.ndarray:
        return (self.y0_mm + np.arange(self.rows) * self.row_mm).astype(np.float64)

    def truth(self) -> dict[str, Any]:
        z0, z1 = self.slab
        nods: list[dict[str, Any]] = []
        for n in self.nodules:
            r = n.diameter_mm / 2
            v = _Ellipsoid(n.center, (r, r, r)).volume_in_slab(z0, z1)
            nods.append(
                {
                    "center": list(n.center),
                    "diameter_mm": n.diameter_mm,
                    "volume_ml": v / 1000.0,
                    "lung": n.lung,
                }
            )
        nod_ml = sum(n["volume_ml"] for n in nods)
        lung_ml = sum(e.volume_in_slab(z0, z1) for e in self.lungs) / 1000.0 - nod_ml
        biggest = max(nods, key=lambda n: n["diameter_mm"]) if nods else None
        return {
            "lung_volume_ml": lung_ml,
            "nodule_volume_ml": nod_ml,
            "nodule_diameter_mm": biggest["diameter_mm"] if biggest else None,
            "nodule_center": biggest["center"] if biggest else None,
            "nodule_center_index": self.index_of(biggest["center"]) if biggest else None,
            "nodules": nods,
            "has_nodule": bool(nods),
        }

    def index_of(self, point: tuple[float, float, float] | list[float]) -> list[float]:
        """(slice, row, col) fractional index of an LPS point."""
        x, y, z = point
        return [
            (z - self.z0_mm) / self.slice_spacing_mm,
            (y - self.y0_mm) / self.row_mm,
            (x - self.x0_mm) / self.col_mm,
        ]

    # ------------------------------------------------------------ rendering
    def _base_image(self) -> np.ndarray:
        """z-invariant part (air, fat, tissue, spine, sternum), area-averaged:
        ellipses painted in order, each with its exact-ish pixel coverage."""
        if self._base is not None:
            return self._base
        xs = self.x_coords - self.body_center[0]
        ys = self.y_coords - self.body_center[1]
        a, b = self.body_axes
        ai, bi = a - self.fat_mm, b - self.fat_mm
        k = a / 155.0
        vy = 0.58 * bi  # vertebral body centre (posterior)
        rx, ry = 19.0 * k, 15.0 * k
        cy = vy + ry + 7.0 * k  # spinal canal
        sy = -bi + 9.0 * k  # sternum (anterior)
        shapes = [  # (cx, cy, semi-axis x, semi-axis y, HU), painted in order
            (0.0, 0.0, a, b, self.fat_hu),
            (0.0, 0.0, ai, bi, self.tissue_hu),
            (0.0, vy, rx, ry, 700.0),
            (0.0, vy, rx - 2.2, ry - 2.2, 280.0),
            (0.0, cy + 3.0 * k, 14.0 * k, 11.0 * k, 650.0),
            (0.0, cy, 6.0 * k, 6.0 * k, 15.0),
            (0.0, sy, 13.0 * k, 5.0 * k, 450.0),
        ]
        img = np.full((self.rows, self.cols), AIR_HU, np.float32)
        for ex, ey, sa, sb, hu in shapes:
            c0 = max(int(np.searchsorted(xs, ex - sa)) - 2, 0)
            c1 = min(int(np.searchsorted(xs, ex + sa)) + 2, self.cols)
            r0 = max(int(np.searchsorted(ys, ey - sb)) - 2, 0)
            r1 = min(int(np.searchsorted(ys, ey + sb)) + 2, self.rows)
            if r1 <= r0 or c1 <= c0:
                continue
            # an infinitely tall ellipsoid: z fraction 1 inside, 0 outside
            cyl = _Ellipsoid((ex, ey, 0.0), (sa, sb, 1e9))
            f = _occupancy(cyl, xs[c0:c1], ys[r0:r1], -0.5, 0.5, self.col_mm, self.row_mm)
            reg = img[r0:r1, c0:c1]
            reg += f * (np.float32(hu) - reg)
        self._base = img
        return img

    def _field_waves(self) -> dict[str, np.ndarray]:
        if self._waves:
            return self._waves
        rng = np.random.default_rng([self.seed, 7])
        out: dict[str, np.ndarray] = {}
        for name, n, lam in (
            ("g1", 6, self.vessel_wavelength_mm),
            ("g2", 6, self.vessel_wavelength_mm),
            ("tex", 5, 14.0),
        ):
            d = rng.normal(size=(n, 3))
            d /= np.linalg.norm(d, axis=1, keepdims=True)
            kk = 2 * np.pi / (lam * rng.uniform(0.7, 1.3, size=n))
            k = d * kk[:, None]
            amp = math.sqrt(2.0 / float(np.sum(kk**2)))  # unit rms gradient (mm/mm)
            phase = rng.uniform(0, 2 * np.pi, size=n)
            out[name] = np.concatenate([k, phase[:, None], np.full((n, 1), amp)], axis=1)
        self._waves = out
        return out

    @staticmethod
    def _field(w: np.ndarray, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        acc = np.zeros(np.broadcast_shapes(x.shape, y.shape), np.float32)
        for kx, ky, kz, ph, amp in w:
            acc += np.float32(amp) * np.cos(
                np.float32(kx) * x + np.float32(ky) * y + np.float32(kz * z + ph)
            )
        return acc

    def _lung_material(
        self, xs: np.ndarray, ys: np.ndarray, z0: float, z1: float, lung_hu: float
    ) -> np.ndarray:
        """HU of lung parenchyma + vessels on a grid, averaged over the slab."""
        waves = self._field_waves()
        # half resolution is plenty for structures of >= 1.5 mm
        xh, yh = xs[::2].astype(np.float32)[None, :], ys[::2].astype(np.float32)[:, None]
        nsub = int(min(4, max(1, math.ceil((z1 - z0) / 1.25))))
        vessel = np.zeros((yh.shape[0], xh.shape[1]), np.float32)
        r2 = np.float32(self.vessel_radius_mm**2)
        for i in range(nsub):
            z = z0 + (i + 0.5) * (z1 - z0) / nsub
            g1 = self._field(waves["g1"], xh, yh, z)
            g2 = self._field(waves["g2"], xh, yh, z)
            vessel += np.exp(-(g1 * g1 + g2 * g2) / r2)
        vessel /= nsub
        zc = 0.5 * (z0 + z1)
        tex = self._field(waves["tex"], xh, yh, zc) * np.float32(self.texture_hu / 7.0)
        half = np.stack([vessel, tex], axis=-1)
        full = np.asarray(
            cv2.resize(half, (len(xs), len(ys)), interpolation=cv2.INTER_LINEAR), np.float32
        )
        vessel_full, tex_full = full[..., 0], full[..., 1]
        return (lung_hu + tex_full + vessel_full * (self.tissue_hu - lung_hu)).astype(np.float32)

    def render_slice(
        self,
        k: int,
        rng: np.random.Generator | None = None,
        *,
        fractions: bool = False,
        labels: bool = False,
    ) -> RenderedSlice:
        """Slice k: HU (rows, cols) float32; with ``fractions`` the lung
        (without nodule) and nodule occupancies, with ``labels`` the uint8
        label image (argmax of background, lung, nodule occupancy). Noise is
        drawn from ``rng`` (no noise when None)."""
        zc = float(self.z_positions[k])
        z0, z1 = zc - self.thickness_mm / 2, zc + self.thickness_mm / 2
        img = self._base_image().copy()
        shape = (self.rows, self.cols)
        lung_f = np.zeros(shape, np.float32) if fractions else None
        nod_f = np.zeros(shape, np.float32) if fractions else None
        lab = np.zeros(shape, np.uint8) if labels else None
        xs_all, ys_all = self.x_coords, self.y_coords
        tissue = np.float32(self.tissue_hu)
        for li, ell in enumerate(self.lungs):
            box = self._box(ell, z0, z1)
            if box is None:
                continue
            r0, r1, c0, c1 = box
            xs, ys = xs_all[c0:c1], ys_all[r0:r1]
            frac = _occupancy(ell, xs, ys, z0, z1, self.col_mm, self.row_mm)
            if not frac.any():
                continue
            nod = np.zeros_like(frac)
            for n in self.nodules:
                if n.lung != li:
                    continue
                r = n.diameter_mm / 2
                sph = _Ellipsoid(n.center, (r, r, r))
                nbox = self._box(sph, z0, z1)
                if nbox is None:
                    continue
                nr0, nr1 = max(nbox[0], r0), min(nbox[1], r1)
                nc0, nc1 = max(nbox[2], c0), min(nbox[3], c1)
                if nr1 <= nr0 or nc1 <= nc0:
                    continue
                f = _occupancy(
                    sph, xs_all[nc0:nc1], ys_all[nr0:nr1], z0, z1, self.col_mm, self.row_mm
                )
                sub = nod[nr0 - r0 : nr1 - r0, nc0 - c0 : nc1 - c0]
                np.maximum(sub, f, out=sub)
            np.minimum(nod, frac, out=nod)
            mat = self._lung_material(xs, ys, z0, z1, float(self.lung_hu[li]))
            region = img[r0:r1, c0:c1]
            lf = frac - nod
            region *= 1.0 - frac
            region += lf * mat
            region += nod * tissue
            if lung_f is not None and nod_f is not None:
                lung_f[r0:r1, c0:c1] += lf
                nod_f[r0:r1, c0:c1] += nod
            if lab is not None:
                bg = 1.0 - frac
                sub_lab = lab[r0:r1, c0:c1]
                sub_lab[lf > np.maximum(bg, nod)] = 1
                sub_lab[(nod > bg) & (nod >= lf)] = 2
        if rng is not None and self.noise_sigma > 0:
            noise = rng.standard_normal(shape, dtype=np.float32)
            noise *= np.float32(self.noise_sigma)
            img += noise
        np.maximum(img, np.float32(-1024.0), out=img)
        return RenderedSlice(img, lung_f, nod_f, lab)

    def _box(self, ell: _Ellipsoid, z0: float, z1: float) -> tuple[int, int, int, int] | None:
        hw = ell.inplane_halfwidths(z0, z1)
        if hw is None:
            return None
        cx, cy = ell.center[0], ell.center[1]
        c0 = int(math.floor((cx - hw[0] - self.x0_mm) / self.col_mm)) - 2
        c1 = int(math.ceil((cx + hw[0] - self.x0_mm) / self.col_mm)) + 3
        r0 = int(math.floor((cy - hw[1] - self.y0_mm) / self.row_mm)) - 2
        r1 = int(math.ceil((cy + hw[1] - self.y0_mm) / self.row_mm)) + 3
        r0, c0 = max(r0, 0), max(c0, 0)
        r1, c1 = min(r1, self.rows), min(c1, self.cols)
        if r1 <= r0 or c1 <= c0:
            return None
        return r0, r1, c0, c1


def _occupancy(
    ell: _Ellipsoid, xs: np.ndarray, ys: np.ndarray, z0: float, z1: float, dx: float, dy: float
) -> np.ndarray:
    """Voxel occupancy: exact along z, 4x4 supersampled in-plane where it varies."""
    x = xs.astype(np.float64)[None, :]
    y = ys.astype(np.float64)[:, None]
    f = ell.zfrac(x, y, z0, z1)
    if f.size == 0:
        return f
    kernel = np.ones((3, 3), np.uint8)
    spread = cv2.dilate(f, kernel) - cv2.erode(f, kernel)
    rr, cc = np.nonzero(spread > 0.05)
    if rr.size:
        off = (np.arange(_SS) + 0.5) / _SS - 0.5
        ox = np.repeat(off, _SS) * dx
        oy = np.tile(off, _SS) * dy
        px = xs[cc][:, None] + ox[None, :]
        py = ys[rr][:, None] + oy[None, :]
        f[rr, cc] = ell.zfrac(px, py, z0, z1).mean(axis=1)
    return f


# --------------------------------------------------------------------------- sampling

_OVERRIDES = {
    "matrix",
    "rows",
    "cols",
    "pixel_mm",
    "thickness_mm",
    "slices",
    "noise_sigma",
    "nodule",
    "nodule_diameter_mm",
    "nodules",
    "age_years",
    "sex",
    "lung_hu",
    "body_half_width_mm",
    "coverage_mm",
    "lung_offset_mm",
}


def sample_geometry(seed: int, **overrides: Any) -> ChestGeometry:
    """Draw a phantom's parameters from the family (see module docstring).

    Overrides: ``matrix`` (rows = cols) or ``rows``/``cols``, ``pixel_mm``,
    ``thickness_mm`` (= slice spacing), ``slices`` or ``coverage_mm``,
    ``noise_sigma``, ``nodule`` (bool), ``nodule_diameter_mm`` (0/None: none),
    ``nodules`` (list of :class:`Nodule`, placed as given), ``age_years``,
    ``sex`` ("M"/"F"/None), ``lung_hu``, ``body_half_width_mm``,
    ``lung_offset_mm`` (z of the lung centres relative to the scan centre).
    """
    unknown = set(overrides) - _OVERRIDES
    if unknown:
        raise TypeError(f"unknown phantom overrides: {sorted(unknown)}")
    rng = np.random.default_rng([int(seed), 1])
    ov = overrides

    matrix = int(ov.get("matrix", rng.choice(_MATRICES)))
    rows, cols = int(ov.get("rows", matrix)), int(ov.get("cols", matrix))
    a = float(ov.get("body_half_width_mm", rng.uniform(135.0, 175.0)))
    b = a * rng.uniform(0.62, 0.78)
    fov_wanted = 2 * a * rng.uniform(1.12, 1.5)
    pixel = float(ov.get("pixel_mm", np.clip(fov_wanted / max(rows, cols), 0.6, 1.6)))
    fov_x, fov_y = cols * pixel, rows * pixel
    shrink = min(1.0, 0.46 * fov_x / a, 0.46 * fov_y / b)  # the body must fit
    a, b = a * shrink, b * shrink
    margin_x, margin_y = max(0.0, fov_x / 2 - a * 1.04), max(0.0, fov_y / 2 - b * 1.04)
    body_center = (
        float(rng.uniform(-0.3, 0.3) * margin_x),
        float(rng.uniform(-0.3, 0.3) * margin_y),
    )

    # every draw happens whatever the overrides, so that overriding one
    # parameter leaves the others of a seed unchanged
    t_typical, t_choice = rng.random() < 0.6, float(rng.choice(_TYPICAL_THICKNESS))
    t_uniform = float(round(rng.uniform(0.6, 5.0), 2))
    t = float(ov.get("thickness_mm", t_choice if t_typical else t_uniform))
    coverage = float(ov.get("coverage_mm", rng.uniform(200.0, 330.0)))
    slices = int(ov.get("slices", int(np.clip(round(coverage / t), 30, 400))))
    table_z = float(rng.uniform(-600.0, -100.0))
    z0 = table_z - (slices - 1) * t / 2
    scan_center = table_z

    fat = float(rng.uniform(8.0, 25.0)) * shrink
    ai, bi = a - fat, b - fat
    k = a / 155.0
    spine_rx = 19.0 * k
    med = max(float(rng.uniform(0.13, 0.2)) * ai, spine_rx + 6.0)
    ax = (0.94 * ai - med) / 2
    ay = bi * rng.uniform(0.68, 0.82)
    cy = -bi * rng.uniform(0.0, 0.08)
    # keep the lungs inside the tissue ellipse (margin 6 %) and in front of the spine
    for _ in range(50):
        th = np.linspace(0, 2 * np.pi, 180)
        px = med + ax + ax * np.cos(th)
        py = cy + ay * np.sin(th)
        if np.all((px / ai) ** 2 + (py / bi) ** 2 <= 0.94**2):
            break
        ax *= 0.96
        ay *= 0.96
    az = float(rng.uniform(105.0, 135.0))
    lung_off = float(ov.get("lung_offset_mm", rng.uniform(-0.12, 0.12) * min(coverage, 260.0)))
    lz = scan_center + lung_off
    dz = float(rng.uniform(-12.0, 12.0))
    lungs = (
        _Ellipsoid(
            (body_center[0] - (med + ax), body_center[1] + cy, lz + dz / 2),
            (ax * rng.uniform(0.95, 1.05), ay, az),
        ),
        _Ellipsoid(
            (body_center[0] + (med + ax), body_center[1] + cy, lz - dz / 2),
            (ax * rng.uniform(0.9, 1.0), ay, az * rng.uniform(0.95, 1.0)),
        ),
    )
    lhu = ov.get("lung_hu")
    lung_hu = (
        (float(lhu), float(lhu))
        if lhu is not None
        else (float(rng.uniform(-880, -820)), float(rng.uniform(-880, -820)))
    )

    age = ov.get("age_years", int(rng.integers(25, 86)))
    sex = ov.get("sex", "M" if rng.random() < 0.5 else "F")
    noise = float(ov.get("noise_sigma", rng.uniform(0.0, 25.0)))
    has_nodule = bool(ov.get("nodule", rng.random() < 0.5))
    diameter = float(rng.uniform(6.0, 30.0))
    if "nodule_diameter_mm" in ov:
        d = ov["nodule_diameter_mm"]
        has_nodule = bool(d)
        diameter = float(d or 0.0)
    geo = ChestGeometry(
        seed=int(seed),
        rows=rows,
        cols=cols,
        row_mm=pixel,
        col_mm=pixel,
        thickness_mm=t,
        slices=slices,
        z0_mm=z0,
        x0_mm=-(cols - 1) / 2 * pixel,
        y0_mm=-(rows - 1) / 2 * pixel,
        body_axes=(a, b),
        body_center=body_center,
        fat_mm=fat,
        fat_hu=float(rng.uniform(-110, -90)),
        tissue_hu=float(rng.uniform(35, 50)),
        lungs=lungs,
        lung_hu=lung_hu,
        texture_hu=float(rng.uniform(8, 25)),
        vessel_radius_mm=float(rng.uniform(0.8, 1.4)),
        vessel_wavelength_mm=float(rng.uniform(28, 45)),
        noise_sigma=noise,
        nodules=(),
        age_years=age,
        sex=sex,
    )
    if "nodules" in ov:
        geo.nodules = tuple(ov["nodules"])
    elif has_nodule:
        placed = _place_nodule(geo, diameter, rng)
        geo.nodules = (placed,) if placed else ()
    return geo


def _place_nodule(geo: ChestGeometry, diameter: float, rng: np.random.Generator) -> Nodule | None:
    """A sphere fully inside one lung and inside the scanned slab (one slice
    of margin); shrinks the diameter when it cannot fit, None below 6 mm."""
    z0, z1 = geo.slab
    fib = _fibonacci_sphere(96)
    while diameter >= 6.0:
        r = diameter / 2
        zlo, zhi = z0 + r + geo.thickness_mm, z1 - r - geo.thickness_mm
        for _ in range(300):
            li = int(rng.integers(0, 2))
            ell = geo.lungs[li]
            if zhi <= zlo:
                break
            z = rng.uniform(
                max(zlo, ell.center[2] - ell.axes[2]), min(zhi, ell.center[2] + ell.axes[2])
            )
            x = ell.center[0] + rng.uniform(-1, 1) * ell.axes[0]
            y = ell.center[1] + rng.uniform(-1, 1) * ell.axes[1]
            p = np.array([x, y, z]) + fib * r
            q = sum(((p[:, i] - ell.center[i]) / ell.axes[i]) ** 2 for i in range(3))
            if np.all(q <= 0.9**2):
                return Nodule((float(x), float(y), float(z)), float(diameter), li)
        diameter *= 0.85
    return None


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    th = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(th) * np.sin(phi), np.sin(th) * np.sin(phi), np.cos(phi)], axis=1)


# --------------------------------------------------------------------------- phantom


@dataclass
class Phantom:
    """A rendered phantom. Arrays are ordered by ascending z."""

    hu: np.ndarray  # float32 (slices, rows, cols)
    spacing: tuple[float, float, float]  # (slice_spacing_mm, row_mm, col_mm)
    labels: np.ndarray  # uint8, 0 background, 1 lung, 2 nodule
    truth: dict[str, Any]
    seed: int
    thickness_mm: float
    origin: tuple[float, float, float]  # LPS (x, y, z) of voxel (0, 0, 0)
    age_years: int | None
    sex: str | None
    geometry: ChestGeometry = field(repr=False)
    fractions: np.ndarray | None = field(default=None, repr=False)  # (2, n, r, c) lung, nodule

    @property
    def z_positions(self) -> np.ndarray:
        return self.origin[2] + np.arange(self.hu.shape[0]) * self.spacing[0]

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def generate_chest_ct(seed: int, *, with_fractions: bool = False, **overrides: Any) -> Phantom:
    """Render a chest CT phantom of the family (see module docstring and
    :func:`sample_geometry` for the overrides). Deterministic for a seed."""
    geo = sample_geometry(seed, **overrides)
    n, rows, cols = geo.slices, geo.rows, geo.cols
    hu = np.empty((n, rows, cols), np.float32)
    labels = np.empty((n, rows, cols), np.uint8)
    fr = np.empty((2, n, rows, cols), np.float32) if with_fractions else None
    rng = np.random.default_rng([int(seed), 2])
    for k in range(n):
        rs = geo.render_slice(k, rng, fractions=with_fractions, labels=True)
        hu[k] = rs.hu
        assert rs.labels is not None
        labels[k] = rs.labels
        if fr is not None and rs.lung is not None and rs.nodule is not None:
            fr[0, k], fr[1, k] = rs.lung, rs.nodule
    return Phantom(
        hu=hu,
        spacing=(geo.slice_spacing_mm, geo.row_mm, geo.col_mm),
        labels=labels,
        truth=geo.truth(),
        seed=int(seed),
        thickness_mm=geo.thickness_mm,
        origin=(geo.x0_mm, geo.y0_mm, geo.z0_mm),
        age_years=geo.age_years,
        sex=geo.sex,
        geometry=geo,
        fractions=fr,
    )


# --------------------------------------------------------------------------- DICOM


def _uid(seed: int | None, *parts: object) -> str:
    from pydicom.uid import generate_uid

    if seed is None:
        return str(generate_uid())
    return str(generate_uid(entropy_srcs=["pacs-ai-phantom", str(seed), *map(str, parts)]))


def _file_dataset(sop_class: str, sop_uid: str) -> Any:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


def _patient_study(
    ds: Any,
    *,
    patient_name: str,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    date: str,
    age: int | None,
    sex: str | None,
    modality: str,
    description: str,
) -> None:
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = sex if sex in ("M", "F", "O") else ""
    if age is not None:
        ds.PatientAge = f"{int(age):03d}Y"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.ContentDate = date
    ds.StudyTime = "120000"
    ds.SeriesTime = "120000"
    ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.Manufacturer = "pacs-ai synthetic phantom"
    ds.SeriesDescription = description
    ds.SeriesNumber = 1


def phantom_to_datasets(
    phantom: Phantom,
    *,
    signed: bool = True,
    intercept: float | None = None,
    shuffle: bool = False,
    patient_name: str = "PHANTOM^CHEST",
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int | None = None,
    demographics: bool = True,
    date: str | None = None,
) -> list[Any]:
    """A CT Image Storage series (Explicit VR Little Endian FileDatasets).

    ``signed``: PixelRepresentation 1 with RescaleIntercept 0 or -1024 (from
    ``intercept``, else chosen by the phantom's seed); unsigned: 12-bit
    PixelRepresentation 0 with intercept -1024. ``seed`` makes the UIDs (and
    the shuffle) reproducible; None gives fresh UIDs. Instance 1 is the top
    (most superior) slice. ``demographics`` adds PatientAge and PatientSex.
    """
    from pydicom.uid import CTImageStorage

    n, rows, cols = phantom.hu.shape
    if signed:
        icpt = float(intercept) if intercept is not None else (0.0 if phantom.seed % 2 else -1024.0)
    else:
        if intercept not in (None, -1024, -1024.0):
            raise ValueError("unsigned storage uses RescaleIntercept -1024")
        icpt = -1024.0
    study_uid = study_uid or _uid(seed, "study", phantom.seed)
    series_uid = series_uid or _uid(seed, "series", phantom.seed)
    frame_uid = _uid(seed, "frame", phantom.seed)
    date = date or dt.date.today().strftime("%Y%m%d")
    pid = patient_id or f"PHANTOM-{phantom.seed}"
    row_mm, col_mm = phantom.spacing[1], phantom.spacing[2]
    x0, y0, _ = phantom.origin
    zs = phantom.z_positions
    out = []
    for inst, k in enumerate(range(n - 1, -1, -1), start=1):
        ds = _file_dataset(CTImageStorage, _uid(seed, "sop", phantom.seed, k))
        _patient_study(
            ds,
            patient_name=patient_name,
            patient_id=pid,
            study_uid=study_uid,
            series_uid=series_uid,
            date=date,
            age=phantom.age_years if demographics else None,
            sex=phantom.sex if demographics else None,
            modality="CT",
            description="Synthetic chest CT phantom",
        )
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = inst
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "CHEST"
        ds.PatientPosition = "HFS"
        ds.KVP = "120"
        ds.ImagePositionPatient = [_ds_num(x0), _ds_num(y0), _ds_num(zs[k])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = _ds_num(zs[k])
        ds.PixelSpacing = [_ds_num(row_mm), _ds_num(col_mm)]
        ds.SliceThickness = _ds_num(phantom.thickness_mm)
        ds.SpacingBetweenSlices = _ds_num(phantom.spacing[0])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        values = np.rint(phantom.hu[k] - icpt)
        if signed:
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            pix = np.clip(values, -32768, 32767).astype("<i2")
        else:
            ds.BitsStored = 12
            ds.HighBit = 11
            ds.PixelRepresentation = 0
            pix = np.clip(values, 0, 4095).astype("<u2")
        ds.RescaleIntercept = _ds_num(icpt)
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.PixelData = pix.tobytes()
        out.append(ds)
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(out))
        out = [out[i] for i in order]
    return out


def _ds_num(v: float) -> str:
    """A DS string of at most 16 characters."""
    s = f"{float(v):.6g}"
    return s if len(s) <= 16 else f"{float(v):.8e}"[:16]


# --------------------------------------------------------------------------- endoscopy


@dataclass
class EndoscopyImage:
    rgb: np.ndarray  # uint8 (rows, cols, 3)
    lesion: bool
    lesion_center: tuple[float, float] | None  # (row, col)
    lesion_radius_px: float | None
    seed: int


def generate_endoscopy_image(
    seed: int, *, lesion: bool | None = None, size: tuple[int, int] | None = None
) -> EndoscopyImage:
    """An endoscopy-like RGB image: pinkish mucosa with folds, vessels,
    specular highlights and vignetting; a lesion is a raised reddish or
    whitish blob with an irregular border and shading."""
    rng = np.random.default_rng([int(seed), 11])
    if size is None:
        size = [(480, 640), (512, 512), (576, 768), (600, 600), (720, 720)][int(rng.integers(5))]
    rows, cols = size
    if lesion is None:
        lesion = bool(rng.random() < 0.5)
    # the scene is smooth: render it on a coarse grid (in full-size pixel
    # units), enlarge, then add the sensor noise at full size
    f = min(1.0, 224.0 / min(rows, cols))
    rw, cw = max(int(round(rows * f)), 1), max(int(round(cols * f)), 1)
    yy = ((np.arange(rw, dtype=np.float32) + 0.5) * (rows / rw) - 0.5)[:, None]
    xx = ((np.arange(cw, dtype=np.float32) + 0.5) * (cols / cw) - 0.5)[None, :]
    yy, xx = np.broadcast_arrays(yy, xx)
    s = float(min(rows, cols))
    u, v = (xx - cols / 2) / s, (yy - rows / 2) / s
    base = np.array([rng.uniform(175, 215), rng.uniform(85, 120), rng.uniform(80, 110)], np.float32)
    img = np.empty((rw, cw, 3), np.float32)
    img[...] = base
    # low-frequency shading and colour variation
    shade = np.zeros((rw, cw), np.float32)
    for _ in range(4):
        k = rng.normal(size=2) * rng.uniform(2, 6)
        shade += np.cos(k[0] * u + k[1] * v + rng.uniform(0, 6.3)).astype(np.float32)
    img *= (1 + 0.06 * shade)[..., None]
    # folds: dark curved bands around a dark lumen
    lum = np.array([rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25)], np.float32)
    rr = np.sqrt((u - lum[0]) ** 2 + (v - lum[1]) ** 2)
    ang = np.arctan2(v - lum[1], u - lum[0])
    fold_f = rng.uniform(14, 26)
    folds = np.cos(fold_f * rr + 0.8 * np.cos(3 * ang + rng.uniform(0, 6.3)))
    img *= (1 - 0.1 * np.clip(folds, 0, 1) ** 3)[..., None]
    lumen = np.exp(-((rr / rng.uniform(0.06, 0.14)) ** 2))
    img *= (1 - 0.85 * lumen)[..., None]
    # thin vessels
    for _ in range(int(rng.integers(3, 8))):
        k = rng.normal(size=2) * rng.uniform(3, 9)
        w = np.abs(np.sin(k[0] * u + k[1] * v + 0.5 * np.sin(5 * u) + rng.uniform(0, 6.3)))
        line = np.exp(-((w / 0.02) ** 2)).astype(np.float32)
        img[..., 1] -= 25 * line
        img[..., 2] -= 15 * line
    center = radius = None
    if lesion:
        radius = float(rng.uniform(0.06, 0.17) * s)
        cr = float(rng.uniform(0.25, 0.75) * rows)
        cc = float(rng.uniform(0.25, 0.75) * cols)
        center = (cr, cc)
        dy, dx = (yy - cr), (xx - cc)
        th = np.arctan2(dy, dx)
        wob = 1 + sum(
            rng.uniform(0, 0.12) * np.cos(m * th + rng.uniform(0, 6.3)) for m in (2, 3, 5)
        )
        d = np.sqrt(dx * dx + dy * dy) / (radius * wob)
        mask = np.clip((1.0 - d) * radius / 3.0, 0, 1).astype(np.float32)
        kind = rng.random()
        if kind < 0.6:  # reddish
            col = np.array(
                [rng.uniform(200, 235), rng.uniform(45, 75), rng.uniform(50, 75)], np.float32
            )
        else:  # whitish
            col = np.array(
                [rng.uniform(225, 245), rng.uniform(175, 205), rng.uniform(165, 195)], np.float32
            )
        light = np.array([rng.normal(), rng.normal()])
        light /= np.linalg.norm(light) + 1e-6
        dome = np.sqrt(np.clip(1 - d**2, 0, 1))
        shading = 1 + 0.25 * (light[0] * dx + light[1] * dy) / radius * dome
        bumps = np.zeros((rw, cw), np.float32)
        for _ in range(6):
            k = rng.normal(size=2) * radius / 4
            bumps += np.cos((k[0] * dx + k[1] * dy) / radius * 1.0 + rng.uniform(0, 6.3))
        lesion_img = col[None, None, :] * (shading * (1 + 0.04 * bumps))[..., None]
        img = img * (1 - mask[..., None]) + lesion_img * mask[..., None]
    # flat diffuse erythema (confuser, both classes)
    if rng.random() < 0.5:
        pc = (rng.uniform(0, rows), rng.uniform(0, cols))
        pr = rng.uniform(0.1, 0.3) * s
        patch = np.exp(-(((yy - pc[0]) ** 2 + (xx - pc[1]) ** 2) / pr**2)).astype(np.float32)
        img[..., 1] -= 18 * patch
        img[..., 2] -= 10 * patch
    # specular highlights (confuser, both classes)
    for _ in range(int(rng.integers(2, 12))):
        pc = (rng.uniform(0, rows), rng.uniform(0, cols))
        pr = rng.uniform(0.003, 0.015) * s
        spot = np.exp(-(((yy - pc[0]) ** 2 + (xx - pc[1]) ** 2) / pr**2)).astype(np.float32)
        img += (255 - img) * spot[..., None]
    # vignetting and the round endoscope field of view
    r_all = np.sqrt(u * u + v * v)
    img *= (1 - rng.uniform(0.3, 0.6) * np.clip(r_all / 0.75, 0, 1) ** 2)[..., None]
    if rng.random() < 0.6:
        img *= np.clip((rng.uniform(0.48, 0.6) - r_all) * s / 3.0, 0, 1)[..., None]
    img = np.asarray(cv2.resize(img, (cols, rows), interpolation=cv2.INTER_LINEAR), np.float32)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= np.float32(rng.uniform(1, 5))
    img += noise
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return EndoscopyImage(
        rgb=rgb, lesion=lesion, lesion_center=center, lesion_radius_px=radius, seed=int(seed)
    )


def endoscopy_to_dataset(
    image: EndoscopyImage,
    *,
    secondary_capture: bool = False,
    patient_name: str = "PHANTOM^ENDO",
    patient_id: str | None = None,
    study_uid: str | None = None,
    seed: int | None = None,
    age_years: int | None = None,
    sex: str | None = None,
    date: str | None = None,
) -> Any:
    """One VL Endoscopic Image (modality ES) or Secondary Capture (modality
    OT) instance, RGB, Explicit VR Little Endian."""
    from pydicom.uid import SecondaryCaptureImageStorage, VLEndoscopicImageStorage

    sop_class = SecondaryCaptureImageStorage if secondary_capture else VLEndoscopicImageStorage
    ds = _file_dataset(sop_class, _uid(seed, "sop", image.seed))
    _patient_study(
        ds,
        patient_name=patient_name,
        patient_id=patient_id or f"ENDO-{image.seed}",
        study_uid=study_uid or _uid(seed, "study", image.seed),
        series_uid=_uid(seed, "series", image.seed),
        date=date or dt.date.today().strftime("%Y%m%d"),
        age=age_years,
        sex=sex,
        modality="OT" if secondary_capture else "ES",
        description="Synthetic endoscopy image",
    )
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "SECONDARY"] if secondary_capture else ["ORIGINAL", "PRIMARY"]
    if secondary_capture:
        ds.ConversionType = "WSD"
    else:
        ds.AcquisitionContextSequence = []
    rows, cols, _ = image.rgb.shape
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(image.rgb, dtype=np.uint8).tobytes()
    return ds
