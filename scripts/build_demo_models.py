#!/usr/bin/env python3
"""Train and export the three demo ONNX models into worker/models/.

    python -m scripts.build_demo_models [--out worker/models] [--only NAME] [--quick]

Needs torch (2.13.0 CPU) and onnx, which the runtime never imports. Everything
is seeded and runs on 2 CPU threads, so a rebuild gives the same models (the
sha256 may still differ across torch/onnx versions). Training data are
synthetic (testkit/phantoms.py) and go through the runtime's own preprocessing
(worker/pipeline/recipe.py), so training and production see identical inputs.

Seed ranges (never overlapping): CT classification phantoms 0-1999, CT
segmentation phantoms 5000-6999, endoscopy images 0-9999, validation
500000-500999; bench/eval_models.py evaluates on seeds >= 1000000.

Models:

* chest-ct-nodule-cls: the classic small CNN (conv 32 5x5, ReLU, 4x4 max-pool,
  conv 64 5x5, ReLU, 4x4 max-pool, global max pooling, dense 128 ReLU with
  the clinical vector late-fused, dense 1 sigmoid) on body-cropped axial
  slices at 224x224 with three CT windows as channels.
* chest-ct-lung-seg: a 4-level 2D U-Net (8 base channels, no normalisation)
  on body-cropped slices at 256x256, lung window, 3-class logits, trained
  with soft (partial-volume occupancy) targets so that its probabilities
  estimate voxel occupancy.
* endoscopy-lesion-cls: the same small CNN on RGB images at 224x224.

The CNNs are trained in two stages to fit a small CPU budget: (A) the whole
network on 96x96 patches cut from the prepared 224x224 inputs (a sub-window
of exactly what the runtime feeds), then (B) the dense head re-fitted on the
globally max-pooled features of whole prepared images, with the
convolutions frozen. The U-Net is fully convolutional and trained on 96x96
patches of the prepared 256x256 slices.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from testkit.phantoms import ChestGeometry, generate_endoscopy_image, sample_geometry
from worker.pipeline import recipe as R

REPO = Path(__file__).resolve().parent.parent

SEED = 20_240_601
THREADS = 2
VERSION = "1.0.0"
OPSET = 17
PATCH = 96
#: SmallCNN: 5x5 convolutions and 4x4 max-pooling give a 36-pixel receptive
#: field (about 55 mm at 224 px per body width): a whole nodule and the lung
#: around it. Global max pooling (not average) keeps a single focal finding
#: from being diluted by the rest of the image.
KERNEL = 5
POOL = 4
#: negative slices drawn per clean phantom (half as many far from the nodule in
#: a nodule phantom). The study probability is the maximum over up to 400
#: slices, so the per-slice false-positive rate must be tiny: vessels crossing
#: on thin, high-resolution slices are the hard negatives, and they need many
#: examples.
NEG_SLICES = 6

CLS_SEEDS = range(0, 2000)
SEG_SEEDS = range(5000, 7000)
ENDO_SEEDS = range(0, 10_000)
VAL_SEEDS = range(500_000, 501_000)

CLS_RECIPE: dict[str, Any] = {
    "mode": "axial_slices",
    "crop": "body",
    "size": [224, 224],
    "channels": [{"window": [-600, 1500]}, {"window": [40, 400]}, {"window": [300, 1500]}],
    "denoise": None,
    "enhance": None,
    "batch_size": 32,
}
SEG_RECIPE: dict[str, Any] = {
    "mode": "axial_slices",
    "crop": "body",
    "size": [256, 256],
    "channels": [{"window": [-600, 1500]}],
    "denoise": None,
    "enhance": None,
    "batch_size": 16,
}
ENDO_RECIPE: dict[str, Any] = {
    "mode": "rgb_image",
    "crop": None,
    "size": [224, 224],
    "channels": [{"component": "R"}, {"component": "G"}, {"component": "B"}],
    "denoise": None,
    "enhance": None,
    "batch_size": 32,
}

SCT_LUNG = {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}
SCT_NODULE = {"value": "786838002", "scheme": "SCT", "meaning": "Lung nodule"}
SCT_LESION = {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"}
SCT_ANATOMY = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical structure"}
SCT_ABNORMAL = {
    "value": "49755003",
    "scheme": "SCT",
    "meaning": "Morphologically abnormal structure",
}
CLINICAL_FEATURES = ["age_years_div100", "sex_male", "sex_female"]
CLINICAL_MISSING = {"age_years_div100": 0.5, "sex_male": 0.0, "sex_female": 0.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} cpu {time.process_time():6.0f} s] {msg}", flush=True)


# --------------------------------------------------------------------------- models


class SmallCNN(nn.Module):
    """conv32-ReLU-maxpool-conv64-ReLU-maxpool-GAP-dense128(+clinical)-dense1."""

    def __init__(self, in_ch: int = 3, n_clinical: int = 0) -> None:
        super().__init__()
        self.n_clinical = n_clinical
        self.conv1 = nn.Conv2d(in_ch, 32, KERNEL, padding=KERNEL // 2)
        self.conv2 = nn.Conv2d(32, 64, KERNEL, padding=KERNEL // 2)
        self.fc1 = nn.Linear(64 + n_clinical, 128)
        self.fc2 = nn.Linear(128, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) * 4.0  # inputs are in [0, 1]; centred inputs train far more reliably
        x = F.max_pool2d(F.relu(self.conv1(x)), POOL)
        x = F.max_pool2d(F.relu(self.conv2(x)), POOL)
        return x.amax(dim=(2, 3))  # global max pooling

    def head(self, f: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        if self.n_clinical:
            assert clinical is not None
            f = torch.cat([f, clinical], dim=1)
        return self.fc2(F.relu(self.fc1(f)))  # logit

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(image), clinical)


class ProbWithClinical(nn.Module):
    def __init__(self, net: SmallCNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(image, clinical))


class Prob(nn.Module):
    def __init__(self, net: SmallCNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(image))


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, in_ch: int = 1, n_classes: int = 3, base: int = 8, levels: int = 4) -> None:
        super().__init__()
        chans = [base * 2**i for i in range(levels)]
        self.down = nn.ModuleList()
        prev = in_ch
        for c in chans:
            self.down.append(_block(prev, c))
            prev = c
        self.up = nn.ModuleList()
        self.up_block = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up.append(nn.ConvTranspose2d(prev, c, 2, stride=2))
            self.up_block.append(_block(2 * c, c))
            prev = c
        self.out = nn.Conv2d(prev, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, blk in zip(self.up, self.up_block, strict=True):
            x = blk(torch.cat([up(x), skips.pop()], dim=1))
        return self.out(x)


# --------------------------------------------------------------------------- helpers


def clinical_vector(label: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic demographics, only weakly associated with the label (mean age
    62 vs 58 years, same spread) and 20 % missing (manifest defaults)."""
    age = float(np.clip(rng.normal(0.62 if label else 0.58, 0.13), 0.18, 0.95))
    male = rng.random() < 0.5
    vec = np.array([age, float(male), float(not male)], np.float32)
    if rng.random() < 0.2:
        vec[0] = CLINICAL_MISSING["age_years_div100"]
    if rng.random() < 0.2:
        vec[1:] = 0.0
    return vec


def lung_z_range(geo: ChestGeometry) -> tuple[float, float]:
    return (
        min(e.center[2] - e.axes[2] for e in geo.lungs),
        max(e.center[2] + e.axes[2] for e in geo.lungs),
    )


def slices_in(geo: ChestGeometry, lo: float, hi: float) -> np.ndarray:
    z = geo.z_positions
    return np.nonzero((z >= lo) & (z <= hi))[0]


def to_model_grid(arr: np.ndarray, box: R.Box, size: list[int]) -> np.ndarray:
    return R.crop_resize(arr, box, size, 0.0)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def batches(n: int, size: int, rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
    idx = rng.permutation(n) if rng is not None else np.arange(n)
    for i in range(0, n, size):
        yield idx[i : i + size]


def cosine_lr(
    opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int = 20
) -> None:
    if step < warmup:
        lr = base * (step + 1) / warmup
    else:
        lr = 0.05 * base + 0.95 * base * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    for g in opt.param_groups:
        g["lr"] = lr


# --------------------------------------------------------------------------- CT data


@dataclass
class ClsData:
    x: np.ndarray  # (n, 3, 224, 224) float16
    y: np.ndarray  # (n,) int
    clinical: np.ndarray  # (n, 3)
    nod_rc: np.ndarray  # (n, 2) nodule centre in model pixels (nan if none)
    nod_rad: np.ndarray  # (n,) nodule radius in model pixels (0 if none)
    lung_px: list[np.ndarray]  # per slice: (m, 2) lung pixel coordinates (subsampled)


def cls_examples(seed: int) -> list[tuple[np.ndarray, int, np.ndarray, float, np.ndarray, int]]:
    """Training slices of one phantom: (x, label, nodule rc, radius px, lung px, age...)."""
    geo = sample_geometry(seed)
    rng = np.random.default_rng([seed, 99])
    noise = np.random.default_rng([seed, 2])
    t = geo.thickness_mm
    lz0, lz1 = lung_z_range(geo)
    picks: list[int] = []
    if geo.nodules:
        n = geo.nodules[0]
        r, zc = n.diameter_mm / 2, n.center[2]
        pos = slices_in(geo, zc - 0.5 * r, zc + 0.5 * r)
        if len(pos) == 0:
            pos = np.array([int(np.argmin(np.abs(geo.z_positions - zc)))])
        picks += list(rng.choice(pos, size=min(2, len(pos)), replace=False))
        far = [k for k in slices_in(geo, lz0, lz1) if abs(geo.z_positions[k] - zc) > r + t]
        if far:
            picks += list(rng.choice(far, size=min(NEG_SLICES // 2, len(far)), replace=False))
    else:
        inside = slices_in(geo, lz0 + 5, lz1 - 5)
        if len(inside):
            picks += list(rng.choice(inside, size=min(NEG_SLICES, len(inside)), replace=False))
        picks.append(int(rng.integers(geo.slices)))
    out = []
    for k in picks:
        rs = geo.render_slice(int(k), noise, fractions=True)
        area = float(rs.nodule.sum()) * geo.row_mm * geo.col_mm
        eq_d = 2 * math.sqrt(area / math.pi)
        if rs.nodule.max() < 1e-3:
            label = 0
        elif eq_d >= 5.0 and rs.nodule.max() >= 0.5:
            label = 1
        else:
            continue  # ambiguous tip of a nodule: not used
        x, boxes = R.prepare_slices(rs.hu[None], CLS_RECIPE)
        box = boxes[0]
        scale = CLS_RECIPE["size"][0] / (box[1] - box[0])
        rc = np.array([np.nan, np.nan], np.float32)
        rad = 0.0
        if label:
            nm = to_model_grid(rs.nodule, box, CLS_RECIPE["size"])
            rr, cc = np.nonzero(nm > 0.05)
            w = nm[rr, cc]
            rc = np.array([np.average(rr, weights=w), np.average(cc, weights=w)], np.float32)
            rad = eq_d / 2 / geo.row_mm * scale
        lm = to_model_grid(rs.lung, box, CLS_RECIPE["size"]) > 0.5
        lp = np.argwhere(lm)[::7].astype(np.int16)
        out.append((x[0].astype(np.float16), label, rc, rad, lp, clinical_vector(label, rng)))
    return out


def build_cls_data(seeds: range, tag: str) -> ClsData:
    t0 = time.time()
    xs, ys, rcs, rads, lps, cls = [], [], [], [], [], []
    for s in seeds:
        for x, y, rc, rad, lp, clin in cls_examples(s):
            xs.append(x)
            ys.append(y)
            rcs.append(rc)
            rads.append(rad)
            lps.append(lp)
            cls.append(clin)
    y = np.array(ys)
    log(
        f"{tag}: {len(ys)} slices ({int(y.sum())} with a nodule) from {len(seeds)} phantoms "
        f"in {time.time() - t0:.0f} s"
    )
    return ClsData(np.stack(xs), y, np.stack(cls), np.stack(rcs), np.array(rads, np.float32), lps)


@dataclass
class SegData:
    x: np.ndarray  # (n, 1, 256, 256) float16
    t: np.ndarray  # (n, 3, 256, 256) float16 occupancy targets
    nod_rc: np.ndarray  # (n, 2) or nan


def seg_examples(seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    geo = sample_geometry(seed)
    rng = np.random.default_rng([seed, 98])
    noise = np.random.default_rng([seed, 2])
    t = geo.thickness_mm
    lz0, lz1 = lung_z_range(geo)
    picks: list[int] = []
    for n in geo.nodules:
        r, zc = n.diameter_mm / 2, n.center[2]
        near = slices_in(geo, zc - r - t / 2, zc + r + t / 2)
        if len(near):
            picks += list(rng.choice(near, size=min(2, len(near)), replace=False))
    inside = slices_in(geo, lz0 - t, lz1 + t)
    if len(inside):
        picks += list(rng.choice(inside, size=min(2, len(inside)), replace=False))
    picks.append(int(rng.integers(geo.slices)))
    out = []
    size = SEG_RECIPE["size"]
    for k in picks:
        rs = geo.render_slice(int(k), noise, fractions=True)
        x, boxes = R.prepare_slices(rs.hu[None], SEG_RECIPE)
        lung = to_model_grid(rs.lung, boxes[0], size)
        nod = to_model_grid(rs.nodule, boxes[0], size)
        bg = np.clip(1.0 - lung - nod, 0.0, 1.0)
        tgt = np.stack([bg, lung, nod]).astype(np.float16)
        rc = np.array([np.nan, np.nan], np.float32)
        if nod.max() > 0.05:
            rr, cc = np.nonzero(nod > 0.05)
            rc = np.array([rr.mean(), cc.mean()], np.float32)
        out.append((x[0].astype(np.float16), tgt, rc))
    return out


def build_seg_data(seeds: range, tag: str) -> SegData:
    t0 = time.time()
    xs, ts, rcs = [], [], []
    for s in seeds:
        for x, tg, rc in seg_examples(s):
            xs.append(x)
            ts.append(tg)
            rcs.append(rc)
    n_nod = int(np.sum(~np.isnan(np.stack(rcs)[:, 0])))
    log(
        f"{tag}: {len(xs)} slices ({n_nod} through a nodule) from {len(seeds)} phantoms "
        f"in {time.time() - t0:.0f} s"
    )
    return SegData(np.stack(xs), np.stack(ts), np.stack(rcs))


# --------------------------------------------------------------------------- CNN training


def _clamp_origin(c: float, size: int, patch: int) -> int:
    return int(min(max(round(c - patch / 2), 0), size - patch))


def sample_patches(
    n_img: int,
    labels: np.ndarray,
    centers: np.ndarray,
    radii: np.ndarray,
    neg_points: Callable[[int, np.random.Generator], tuple[float, float]],
    size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch of patches: (image index, origin row, origin col) and label.
    Positives: the lesion fully inside the patch at a random offset; negatives:
    from negative images, and from positive images far enough from the lesion."""
    idx, org, lab = [], [], []
    for i in range(n_img):
        if labels[i]:
            rad = float(radii[i])
            slack = max(PATCH / 2 - rad - 4, 0)
            for _ in range(2):
                c = centers[i] + rng.uniform(-slack, slack, 2)
                idx.append(i)
                org.append((_clamp_origin(c[0], size, PATCH), _clamp_origin(c[1], size, PATCH)))
                lab.append(1)
            for _ in range(10):  # a patch that misses the lesion
                p = neg_points(i, rng)
                o = (_clamp_origin(p[0], size, PATCH), _clamp_origin(p[1], size, PATCH))
                lo = np.array(o) - rad - 3
                hi = np.array(o) + PATCH + rad + 3
                if not np.all((centers[i] > lo) & (centers[i] < hi)):
                    idx.append(i)
                    org.append(o)
                    lab.append(0)
                    break
        else:
            for _ in range(2):
                p = neg_points(i, rng)
                idx.append(i)
                org.append((_clamp_origin(p[0], size, PATCH), _clamp_origin(p[1], size, PATCH)))
                lab.append(0)
    return np.array(idx), np.array(org), np.array(lab, np.float32)


def train_cnn(
    x: np.ndarray,
    y: np.ndarray,
    clinical: np.ndarray | None,
    centers: np.ndarray,
    radii: np.ndarray,
    neg_points: Callable[[int, np.random.Generator], tuple[float, float]],
    epochs_a: int,
    tag: str,
    seed: int,
) -> SmallCNN:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_clin = 0 if clinical is None else clinical.shape[1]
    net = SmallCNN(x.shape[1], n_clin)
    net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    size = x.shape[-1]
    # ---- stage A: the whole network on patches
    plan = [
        sample_patches(len(x), y, centers, radii, neg_points, size, rng) for _ in range(epochs_a)
    ]
    total = sum(len(p[0]) for p in plan) // 32 + epochs_a
    # balance the classes in stage A (there are several negatives per positive)
    n_pos = sum(float(p[2].sum()) for p in plan)
    n_all = sum(len(p[2]) for p in plan)
    pos_weight = torch.tensor([(n_all - n_pos) / max(n_pos, 1.0)])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    step = 0
    t0 = time.time()
    for ep, (idx, org, lab) in enumerate(plan):
        net.train()
        loss_sum, n_seen, correct = 0.0, 0, 0
        for b in batches(len(idx), 32, rng):
            xb = np.stack(
                [
                    x[idx[j], :, org[j, 0] : org[j, 0] + PATCH, org[j, 1] : org[j, 1] + PATCH]
                    for j in b
                ]
            ).astype(np.float32)
            xt = torch.from_numpy(xb).contiguous(memory_format=torch.channels_last)
            yt = torch.from_numpy(lab[b])[:, None]
            ct = torch.from_numpy(clinical[idx[b]]) if clinical is not None else None
            cosine_lr(opt, 1e-3, step, total)
            opt.zero_grad()
            logit = net(xt, ct)
            loss = F.binary_cross_entropy_with_logits(logit, yt, pos_weight=pos_weight)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(b)
            n_seen += len(b)
            correct += int(((logit > 0).float() == yt).sum())
        log(
            f"{tag} stage A epoch {ep + 1}/{epochs_a}: {len(idx)} patches, loss "
            f"{loss_sum / n_seen:.4f}, patch accuracy {correct / n_seen:.3f} "
            f"({time.time() - t0:.0f} s)"
        )
    # ---- stage B: the dense head on whole-image pooled features
    feats = pooled_features(net, x)
    fit_head(net, feats, y, clinical, tag, seed)
    return net


def pooled_features(net: SmallCNN, x: np.ndarray, batch: int = 32) -> torch.Tensor:
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xt = torch.from_numpy(x[i : i + batch].astype(np.float32))
            out.append(net.features(xt.contiguous(memory_format=torch.channels_last)))
    return torch.cat(out)


def fit_head(
    net: SmallCNN,
    feats: torch.Tensor,
    y: np.ndarray,
    clinical: np.ndarray | None,
    tag: str,
    seed: int,
    epochs: int = 600,
) -> None:
    torch.manual_seed(seed + 1)
    params = list(net.fc1.parameters()) + list(net.fc2.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    yt = torch.from_numpy(y.astype(np.float32))[:, None]
    ct = torch.from_numpy(clinical) if clinical is not None else None
    # negatives count double: the study-level max over many slices needs a
    # low false-positive rate per slice
    w = torch.where(yt > 0, 1.0, 2.0)
    for ep in range(epochs):
        cosine_lr(opt, 3e-3, ep, epochs, warmup=10)
        opt.zero_grad()
        logit = net.head(feats, ct)
        loss = F.binary_cross_entropy_with_logits(logit, yt, weight=w)
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = torch.sigmoid(net.head(feats, ct)).numpy()[:, 0]
    log(
        f"{tag} stage B head: train loss {float(loss):.4f}, slice accuracy "
        f"{np.mean((p > 0.5) == y):.3f}, AUC {auc(p, y):.4f}"
    )


def predict_cnn(net: SmallCNN, x: np.ndarray, clinical: np.ndarray | None) -> np.ndarray:
    feats = pooled_features(net, x)
    with torch.no_grad():
        ct = torch.from_numpy(clinical) if clinical is not None else None
        return torch.sigmoid(net.head(feats, ct)).numpy()[:, 0]


# --------------------------------------------------------------------------- U-Net training


def train_unet(data: SegData, epochs: int, seed: int, patch: int = 96) -> UNet:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = UNet(1, 3, base=8, levels=4).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    size = data.x.shape[-1]
    n = len(data.x)
    has_nod = ~np.isnan(data.nod_rc[:, 0])
    per_epoch = 2 * n
    total = epochs * per_epoch // 16 + epochs
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    step = 0
    t0 = time.time()
    for ep in range(epochs):
        net.train()
        idx, org = [], []
        for i in range(n):
            for j in range(2):
                if j == 0 and has_nod[i]:
                    c = data.nod_rc[i] + rng.uniform(-patch / 3, patch / 3, 2)
                else:
                    c = rng.uniform(patch / 2, size - patch / 2, 2)
                idx.append(i)
                org.append((_clamp_origin(c[0], size, patch), _clamp_origin(c[1], size, patch)))
        idx_a, org_a = np.array(idx), np.array(org)
        loss_sum, seen = 0.0, 0
        for b in batches(len(idx_a), 16, rng):
            xb = np.stack(
                [
                    data.x[
                        idx_a[j],
                        :,
                        org_a[j, 0] : org_a[j, 0] + patch,
                        org_a[j, 1] : org_a[j, 1] + patch,
                    ]
                    for j in b
                ]
            ).astype(np.float32)
            tb = np.stack(
                [
                    data.t[
                        idx_a[j],
                        :,
                        org_a[j, 0] : org_a[j, 0] + patch,
                        org_a[j, 1] : org_a[j, 1] + patch,
                    ]
                    for j in b
                ]
            ).astype(np.float32)
            if rng.random() < 0.5:  # left-right flip
                xb, tb = xb[..., ::-1].copy(), tb[..., ::-1].copy()
            xt = torch.from_numpy(xb).contiguous(memory_format=torch.channels_last)
            tt = torch.from_numpy(tb)
            cosine_lr(opt, 2e-3, step, total)
            opt.zero_grad()
            logits = net(xt)
            loss = -(tt * F.log_softmax(logits, dim=1)).sum(dim=1).mean()  # soft-target CE
            loss.backward()
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(b)
            seen += len(b)
        log(
            f"seg epoch {ep + 1}/{epochs}: {seen} patches, loss {loss_sum / seen:.4f} "
            f"({time.time() - t0:.0f} s)"
        )
    return net


def seg_report(net: UNet, data: SegData) -> str:
    net.eval()
    probs = []
    with torch.no_grad():
        for i in range(0, len(data.x), 16):
            xt = torch.from_numpy(data.x[i : i + 16].astype(np.float32))
            probs.append(torch.softmax(net(xt), dim=1).numpy())
    p = np.concatenate(probs)
    t = data.t.astype(np.float32)
    lab_p, lab_t = p.argmax(1), t.argmax(1)
    parts = []
    for c, name in ((1, "lung"), (2, "nodule")):
        inter = np.sum((lab_p == c) & (lab_t == c))
        dice = 2 * inter / max(np.sum(lab_p == c) + np.sum(lab_t == c), 1)
        soft = p[:, c].sum() / max(t[:, c].sum(), 1e-6)
        parts.append(f"{name} Dice {dice:.3f}, soft volume ratio {soft:.3f}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- endoscopy data


def build_endo_data(
    seeds: range, tag: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    t0 = time.time()
    xs, ys, rcs, rads = [], [], [], []
    h, w = ENDO_RECIPE["size"]
    for s in seeds:
        img = generate_endoscopy_image(s)
        xs.append(R.prepare_rgb(img.rgb[None], ENDO_RECIPE)[0].astype(np.float16))
        ys.append(int(img.lesion))
        rows, cols = img.rgb.shape[:2]
        if img.lesion:
            assert img.lesion_center is not None and img.lesion_radius_px is not None
            rcs.append((img.lesion_center[0] * h / rows, img.lesion_center[1] * w / cols))
            rads.append(img.lesion_radius_px * 1.3 * max(h / rows, w / cols))
        else:
            rcs.append((np.nan, np.nan))
            rads.append(0.0)
    y = np.array(ys)
    log(f"{tag}: {len(ys)} images ({int(y.sum())} with a lesion) in {time.time() - t0:.0f} s")
    return np.stack(xs), y, np.array(rcs, np.float32), np.array(rads, np.float32)


# --------------------------------------------------------------------------- export


def export_onnx(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    names: list[str],
    out_name: str,
    path: Path,
) -> None:
    module.eval()
    module = module.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    axes = {n: {0: "N"} for n in [*names, out_name]}
    torch.onnx.export(
        module,
        example,
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=names,
        output_names=[out_name],
        dynamic_axes=axes,
        do_constant_folding=True,
    )
    import onnx  # noqa: PLC0415

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    model.producer_name = "pacs-ai build_demo_models.py"
    del model.metadata_props[:]
    onnx.save(model, str(path))
    # the exported graph must give what torch gives
    import onnxruntime as ort  # noqa: PLC0415

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(names, example, strict=True)}
    got = sess.run(None, feeds)[0]
    with torch.no_grad():
        want = module(*example).numpy()
    err = float(np.max(np.abs(got - want)))
    size_mb = path.stat().st_size / 1e6
    log(f"exported {path.name}: {size_mb:.2f} MB, max |onnxruntime - torch| = {err:.2e}")
    if err > 1e-3 or size_mb >= 10:
        raise SystemExit(f"{path.name}: export check failed (err {err}, size {size_mb} MB)")


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    onnx_path = out_dir / manifest["file"]
    manifest["sha256"] = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    ordered = {
        k: manifest[k]
        for k in (
            "name",
            "version",
            "file",
            "sha256",
            "task",
            "model_card",
            "inputs",
            "preprocessing",
            "aggregation",
            "aggregation_window_mm",
            "volume_method",
            "segmentation_output",
            "labels",
            "routing",
        )
        if k in manifest
    }
    (out_dir / f"{manifest['name']}.json").write_text(json.dumps(ordered, indent=2) + "\n")
    log(f"wrote {manifest['name']}.json (sha256 {manifest['sha256'][:16]}...)")


CARD_FOOTER = (
    "\n\n**NOT FOR CLINICAL USE.** A demonstration model trained only on synthetic "
    "images; it has never seen a real patient and its outputs mean nothing clinically."
)


def card_cls(stats: dict[str, Any]) -> str:
    return (
        "# chest-ct-nodule-cls (demo)\n\n"
        "Slice classifier for a lung nodule on axial chest CT; the study probability is the "
        "maximum over slices of the lowest slice probability within +-1.5 mm "
        "(`aggregation: max_consistent`, 3 mm window): a nodule of a few millimetres is seen "
        "on every slice of that window, a vessel crossing on one thin slice is not, so "
        "specificity holds on 400-slice thin-slice series; on slices 2 mm apart or more it is "
        "the plain maximum.\n\n"
        "**Architecture**: conv 32 5x5 + ReLU, 4x4 max-pool, conv 64 5x5 + ReLU, 4x4 "
        "max-pool (a 36-pixel, ~55 mm receptive field: a whole nodule and the lung around "
        "it), **global max pooling** (instead of the classic Flatten, which would need ~24 M "
        "dense weights and a ~95 MB file; max rather than average so that one small focal "
        "finding is not diluted by the rest of the slice), dense 128 + ReLU with the clinical "
        "vector "
        "(age/100, sex one-hot; missing age -> 0.5, missing sex -> 0, 0) concatenated to the "
        "pooled features (late fusion), dense 1 + sigmoid. Adam, binary cross-entropy.\n\n"
        "**Input**: each slice cropped to the body (> -500 HU, square, 4 % margin), resized to "
        "224x224, three windows as channels: lung [-600, 1500], mediastinal [40, 400], bone "
        "[300, 1500] (center, width).\n\n"
        f"**Training data**: {stats['train_slices']} slices ({stats['train_pos']} through a "
        f"nodule) of {stats['train_phantoms']} synthetic chest CT phantoms (testkit/phantoms.py, "
        "seeds 0-1999): elliptic body with fat, spine, two textured lungs with vessels, "
        "optional spherical solid nodule 6-30 mm, pixel 0.6-1.6 mm, slices 0.6-5 mm, matrix "
        "256-512, noise 0-25 HU. A slice is positive when its nodule cross-section is >= 5 mm "
        "equivalent diameter; nodule tips are left out. Demographics are synthetic and only "
        "weakly associated with the label (the image dominates).\n\n"
        "**Method**: stage A trains the whole network on 96x96 patches of the prepared "
        f"224x224 inputs ({stats['epochs_a']} epochs); stage B freezes the convolutions and "
        "re-fits the dense head on the pooled features of whole 224x224 slices.\n\n"
        f"**Validation** (held-out phantoms, seeds 500000+): slice accuracy "
        f"{stats['val_acc']:.3f}, AUC {stats['val_auc']:.3f}.\n\n"
        "**Limits**: solid round nodules only; no ground glass, no calcification, no real "
        "anatomy beyond the phantom family." + CARD_FOOTER
    )


def card_seg(stats: dict[str, Any]) -> str:
    return (
        "# chest-ct-lung-seg (demo)\n\n"
        "2D U-Net segmenting the lungs (class 1) and solid lung nodules (class 2) slice by "
        "slice; outputs logits N x 3 x 256 x 256.\n\n"
        "**Architecture**: 4 levels, 8/16/32/64 channels, two 3x3 conv + ReLU per level, "
        "max-pool down, transposed conv up, skip connections, 1x1 output; ~0.5 MB.\n\n"
        "**Input**: each slice cropped to the body (square, 4 % margin), resized to 256x256 "
        "(area averaging), lung window [-600, 1500]. 256 rather than 128 keeps a 10 mm nodule "
        "at ~7 px while a 300-slice 512x512 series still runs in ~10 s on 2 CPU cores.\n\n"
        f"**Training data**: {stats['train_slices']} slices ({stats['train_nodule']} through a "
        f"nodule, tips included) of {stats['train_phantoms']} synthetic chest CT phantoms "
        "(testkit/phantoms.py, seeds 5000-5499; same family as chest-ct-nodule-cls).\n\n"
        "**Method**: soft-target cross-entropy against the exact partial-volume occupancy of "
        "each model pixel (background, lung, nodule), so the softmax probabilities estimate "
        "occupancy: summing the probability of a class over a structure (restored to the "
        "original grid) gives a partial-volume-corrected volume, which is more accurate than "
        "counting argmax voxels for small structures on thick slices. Adam, cosine schedule, "
        f"{stats['epochs']} epochs of 96x96 patches (nodule-centred patches oversampled), "
        "left-right flips.\n\n"
        f"**Validation** (held-out phantoms, model grid): {stats['val']}.\n\n"
        "**Postprocessing** (manifest): nodule components under 0.2 ml (a 7 mm sphere) or "
        "whose largest inscribed ball has a radius under 3.5 mm (vessels and vessel "
        "crossings, which stay thin; a nodule keeps its core even with a vessel attached) "
        "are not reported; volumes and diameters are measured after an opening by a 2 mm "
        "ball, which cuts attached vessels off.\n\n"
        "**Limits**: phantom anatomy only; the lung label includes vessels; nodules touching "
        "the pleura or mediastinum were never seen. Small nodules on thick slices are "
        "under-measured: at 10-12 mm on slices of 3 mm or more, volumes come out 15-30 % low, "
        "because the partial-volume cap slices are mostly missed (bench/eval_models.py shows "
        "the errors per phantom)." + CARD_FOOTER
    )


def card_endo(stats: dict[str, Any]) -> str:
    return (
        "# endoscopy-lesion-cls (demo)\n\n"
        "Image classifier for a raised mucosal lesion on a single endoscopy (or secondary "
        "capture) colour image.\n\n"
        "**Architecture**: the same small CNN as chest-ct-nodule-cls without clinical input: "
        "conv 32 5x5 + ReLU, 4x4 max-pool, conv 64 5x5 + ReLU, 4x4 max-pool, global max "
        "pooling (instead of Flatten, so the file stays small), dense 128 + ReLU, dense 1 + "
        "sigmoid; "
        "Adam, binary cross-entropy.\n\n"
        "**Input**: the whole RGB image resized to 224x224 (area averaging), R, G, B scaled "
        "to [0, 1].\n\n"
        f"**Training data**: {stats['train']} synthetic endoscopy-like images "
        "(testkit/phantoms.py generate_endoscopy_image, seeds 0-9999): pinkish mucosa with "
        "folds, lumen, thin vessels, vignetting, specular highlights and flat erythema as "
        "confusers; a lesion is a raised reddish or whitish blob with an irregular border.\n\n"
        f"**Method**: stage A on 96x96 patches ({stats['epochs_a']} epochs), stage B re-fits "
        "the dense head on whole-image pooled features.\n\n"
        f"**Validation** (held-out images): accuracy {stats['val_acc']:.3f}, AUC "
        f"{stats['val_auc']:.3f}.\n\n"
        "**Limits**: synthetic appearance only; flat lesions, bleeding, instruments and "
        "real optics were never seen." + CARD_FOOTER
    )


# --------------------------------------------------------------------------- main


def build_cls(out: Path, quick: bool) -> None:
    seeds = range(0, 40) if quick else range(0, 1000)
    val_seeds = range(VAL_SEEDS.start, VAL_SEEDS.start + (10 if quick else 120))
    data = build_cls_data(seeds, "cls train")
    val = build_cls_data(val_seeds, "cls val")
    lungs = data.lung_px

    def neg_point(i: int, rng: np.random.Generator) -> tuple[float, float]:
        if len(lungs[i]) and rng.random() < 0.8:
            p = lungs[i][rng.integers(len(lungs[i]))]
            return float(p[0]), float(p[1])
        return float(rng.uniform(30, 194)), float(rng.uniform(30, 194))

    epochs_a = 1 if quick else 8
    net = train_cnn(
        data.x, data.y, data.clinical, data.nod_rc, data.nod_rad, neg_point, epochs_a, "cls", SEED
    )
    p = predict_cnn(net, val.x, val.clinical)
    acc, va = float(np.mean((p > 0.5) == val.y)), auc(p, val.y)
    log(f"cls validation: {len(val.y)} slices, accuracy {acc:.3f}, AUC {va:.4f}")
    path = out / "chest-ct-nodule-cls.onnx"
    export_onnx(
        ProbWithClinical(net),
        (torch.rand(2, 3, 224, 224), torch.rand(2, 3)),
        ["image", "clinical"],
        "probability",
        path,
    )
    stats = {
        "train_slices": len(data.y),
        "train_pos": int(data.y.sum()),
        "train_phantoms": len(seeds),
        "epochs_a": epochs_a,
        "val_acc": acc,
        "val_auc": va,
    }
    write_manifest(
        out,
        {
            "name": "chest-ct-nodule-cls",
            "version": VERSION,
            "file": path.name,
            "task": "classification",
            "model_card": card_cls(stats),
            "inputs": [
                {
                    "name": "image",
                    "source": "pixels",
                    "layout": "NCHW",
                    "dtype": "float32",
                    "shape": [-1, 3, 224, 224],
                },
                {
                    "name": "clinical",
                    "source": "header",
                    "dtype": "float32",
                    "shape": [-1, 3],
                    "features": CLINICAL_FEATURES,
                    "missing": CLINICAL_MISSING,
                },
            ],
            "preprocessing": CLS_RECIPE,
            "aggregation": "max_consistent",
            "aggregation_window_mm": 3.0,
            "labels": [
                {
                    "value": 1,
                    "code": SCT_NODULE,
                    "category": SCT_ABNORMAL,
                    "finding_site": SCT_LUNG,
                    "threshold": 0.5,
                    "focal": True,
                }
            ],
            "routing": {
                "modalities": ["CT"],
                "sop_classes": [],
                "body_parts": [],
                "image_types": ["ORIGINAL", "PRIMARY"],
                "min_slices": 20,
                "description_pattern": None,
            },
        },
    )


def build_seg(out: Path, quick: bool) -> None:
    seeds = range(5000, 5030) if quick else range(5000, 5500)
    val_seeds = range(VAL_SEEDS.start + 500, VAL_SEEDS.start + (510 if quick else 560))
    data = build_seg_data(seeds, "seg train")
    val = build_seg_data(val_seeds, "seg val")
    epochs = 1 if quick else 2
    net = train_unet(data, epochs, SEED + 1)
    rep = seg_report(net, val)
    log(f"seg validation: {rep}")
    path = out / "chest-ct-lung-seg.onnx"
    export_onnx(net, (torch.rand(2, 1, 256, 256),), ["image"], "logits", path)
    n_nod = int(np.sum(~np.isnan(data.nod_rc[:, 0])))
    stats = {
        "train_slices": len(data.x),
        "train_nodule": n_nod,
        "train_phantoms": len(seeds),
        "epochs": epochs,
        "val": rep,
    }
    write_manifest(
        out,
        {
            "name": "chest-ct-lung-seg",
            "version": VERSION,
            "file": path.name,
            "task": "segmentation",
            "model_card": card_seg(stats),
            "inputs": [
                {
                    "name": "image",
                    "source": "pixels",
                    "layout": "NCHW",
                    "dtype": "float32",
                    "shape": [-1, 1, 256, 256],
                }
            ],
            "preprocessing": SEG_RECIPE,
            "volume_method": "probability",
            "segmentation_output": "logits",
            "labels": [
                {
                    "value": 1,
                    "code": SCT_LUNG,
                    "category": SCT_ANATOMY,
                    "threshold": 0.5,
                    "focal": False,
                },
                {
                    "value": 2,
                    "code": SCT_NODULE,
                    "category": SCT_ABNORMAL,
                    "finding_site": SCT_LUNG,
                    "threshold": 0.5,
                    "focal": True,
                    # false-positive reduction: a nodule has a round core,
                    # vessels and their crossings stay thin. 0.2 ml is a
                    # 7 mm sphere.
                    "min_volume_ml": 0.2,
                    "min_core_radius_mm": 3.5,
                    "opening_radius_mm": 2.0,
                },
            ],
            "routing": {
                "modalities": ["CT"],
                "sop_classes": [],
                "body_parts": [],
                "image_types": ["ORIGINAL", "PRIMARY"],
                "min_slices": 20,
                "description_pattern": None,
            },
        },
    )


def build_endo(out: Path, quick: bool) -> None:
    seeds = range(0, 60) if quick else range(0, 700)
    val_seeds = range(VAL_SEEDS.start + 700, VAL_SEEDS.start + (720 if quick else 900))
    x, y, rc, rad = build_endo_data(seeds, "endo train")
    xv, yv, _, _ = build_endo_data(val_seeds, "endo val")

    def neg_point(i: int, rng: np.random.Generator) -> tuple[float, float]:
        return float(rng.uniform(0, 224)), float(rng.uniform(0, 224))

    epochs_a = 1 if quick else 8
    net = train_cnn(x, y, None, rc, rad, neg_point, epochs_a, "endo", SEED + 2)
    p = predict_cnn(net, xv, None)
    acc, va = float(np.mean((p > 0.5) == yv)), auc(p, yv)
    log(f"endo validation: {len(yv)} images, accuracy {acc:.3f}, AUC {va:.4f}")
    path = out / "endoscopy-lesion-cls.onnx"
    export_onnx(Prob(net), (torch.rand(2, 3, 224, 224),), ["image"], "probability", path)
    stats = {"train": len(y), "epochs_a": epochs_a, "val_acc": acc, "val_auc": va}
    write_manifest(
        out,
        {
            "name": "endoscopy-lesion-cls",
            "version": VERSION,
            "file": path.name,
            "task": "classification",
            "model_card": card_endo(stats),
            "inputs": [
                {
                    "name": "image",
                    "source": "pixels",
                    "layout": "NCHW",
                    "dtype": "float32",
                    "shape": [-1, 3, 224, 224],
                }
            ],
            "preprocessing": ENDO_RECIPE,
            "aggregation": "max",
            "labels": [
                {
                    "value": 1,
                    "code": SCT_LESION,
                    "category": SCT_ABNORMAL,
                    "threshold": 0.5,
                    "focal": True,
                }
            ],
            "routing": {
                "modalities": ["ES", "XC", "OT"],
                "sop_classes": ["1.2.840.10008.5.1.4.1.1.77.1.1", "1.2.840.10008.5.1.4.1.1.7"],
                "body_parts": [],
                "image_types": [],
                "min_slices": 1,
                "description_pattern": None,
            },
        },
    )


BUILDERS = {
    "chest-ct-lung-seg": build_seg,
    "chest-ct-nodule-cls": build_cls,
    "endoscopy-lesion-cls": build_endo,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "worker" / "models")
    ap.add_argument("--only", choices=sorted(BUILDERS), action="append")
    ap.add_argument("--quick", action="store_true", help="tiny data, for testing the script")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for name in args.only or list(BUILDERS):
        t1 = time.time()
        log(f"=== {name}")
        BUILDERS[name](args.out, args.quick)
        log(f"=== {name} done in {time.time() - t1:.0f} s")
    log(f"all done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
