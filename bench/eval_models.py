"""Evaluate the shipped models on held-out synthetic data, through the runtime path.

Each chest CT phantom is drawn from the whole family (matrix 256-512, pixel
spacing 0.6-1.6 mm, slice thickness 0.6-5 mm, 30-400 slices, noise 0-25 HU,
signed or unsigned storage, slices written in shuffled order), written as DICOM
files and read back with the worker's own decoder (worker.pipeline.volume.load_series),
then run through worker.pipeline.run.run_model_full exactly as a job does. Seeds
start at 1,000,000 and never overlap the training (0-6999) or validation
(500000-500999) seeds of scripts/build_demo_models.py.

Prints, per model: accuracy/AUC (classification), Dice and volume errors
against the generator's analytic truth (segmentation), and timings; then the
acceptance criteria with PASS/FAIL. Exit status 1 when a criterion fails.

    .venv/bin/python -m bench.eval_models   # 20 CT phantoms, 10 with a nodule >= 10 mm
    .venv/bin/python -m bench.eval_models --phantoms 6 --max-slices 80 --endoscopy 20   # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from testkit.phantoms import (
    endoscopy_to_dataset,
    generate_chest_ct,
    generate_endoscopy_image,
    phantom_to_datasets,
)
from worker.pipeline.registry import RegisteredModel, discover
from worker.pipeline.run import run_model_full
from worker.pipeline.volume import load_series, patient_features
from worker.settings import load_settings

SEED0 = 1_000_000
CLS = "chest-ct-nodule-cls"
SEG = "chest-ct-lung-seg"
ENDO = "endoscopy-lesion-cls"

#: Acceptance criteria (issue "Inference pipeline", Done when 2)
MIN_ACCURACY = 0.95
LUNG_TOL = 0.10
NODULE_TOL = 0.20


def set_seed0(seed0: int) -> None:
    global SEED0
    SEED0 = seed0


def auc(scores: list[float], labels: list[bool]) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def write_series(datasets: list[Any], folder: Path) -> list[Path]:
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def phantom_params(k: int, n: int, max_slices: int | None) -> dict[str, Any]:
    """Held-out phantom k of n: the first half with a nodule >= 10 mm."""
    rng = np.random.default_rng([SEED0, k])
    params: dict[str, Any] = {"nodule": k < n // 2}
    if params["nodule"]:
        params["nodule_diameter_mm"] = float(round(rng.uniform(10.0, 30.0), 1))
    if max_slices is not None:
        params["slices"] = int(rng.integers(30, max_slices + 1))
    return params


def evaluate_ct(
    models: dict[str, RegisteredModel], n: int, max_slices: int | None, settings: Any
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for k in range(n):
        seed = SEED0 + k
        rng = np.random.default_rng([SEED0, k, 1])
        params = phantom_params(k, n, max_slices)
        t0 = time.monotonic()
        phantom = generate_chest_ct(seed, **params)
        signed = bool(rng.random() < 0.5)
        gen_s = time.monotonic() - t0
        truth = phantom.truth
        row: dict[str, Any] = {
            "seed": seed,
            "matrix": phantom.hu.shape[1],
            "slices": phantom.hu.shape[0],
            "pixel_mm": round(phantom.spacing[1], 2),
            "thickness_mm": round(phantom.thickness_mm, 2),
            "noise": round(float(phantom.geometry.noise_sigma), 1),
            "signed": signed,
            "nodule_mm": truth["nodule_diameter_mm"],
            "truth_lung_ml": truth["lung_volume_ml"],
            "truth_nodule_ml": truth["nodule_volume_ml"],
            "generate_s": gen_s,
        }
        with tempfile.TemporaryDirectory() as tmp:
            datasets = phantom_to_datasets(phantom, signed=signed, shuffle=True, seed=seed)
            paths = write_series(datasets, Path(tmp))
            del datasets
            t = time.monotonic()
            volume = load_series(paths)
            features = patient_features(dcmread(paths[0], stop_before_pixels=True))
            row["decode_s"] = time.monotonic() - t
        # map each volume slice to the phantom slice at the same z
        z = volume.origin[2] + np.arange(volume.pixels.shape[0]) * volume.spacing[0] * float(
            np.sign(volume.normal[2])
        )
        index = np.rint((z - phantom.origin[2]) / phantom.spacing[0]).astype(int)
        truth_labels = phantom.labels[index]
        del phantom
        if CLS in models:
            run = run_model_full(models[CLS], volume, features, settings)
            (result,) = run.rows
            row["cls_probability"] = result["probability"]
            row["cls_present"] = result["present"]
            row["cls_inference_s"] = run.timings["inference_s"]
            row["cls_other_s"] = run.timings["preprocess_s"] + run.timings["postprocess_s"]
        if SEG in models:
            run = run_model_full(models[SEG], volume, features, settings)
            by_value = {r["label_value"]: r for r in run.rows}
            assert run.labels is not None
            row["lung_ml"] = by_value[1]["measurements"]["volume_ml"]
            row["nodule_ml"] = by_value[2]["measurements"]["volume_ml"]
            row["seg_nodule_present"] = by_value[2]["present"]
            row["lung_dice"] = dice(run.labels == 1, truth_labels == 1)
            row["nodule_dice"] = (
                dice(run.labels == 2, truth_labels == 2) if (truth_labels == 2).any() else None
            )
            row["seg_inference_s"] = run.timings["inference_s"]
            row["seg_other_s"] = run.timings["preprocess_s"] + run.timings["postprocess_s"]
        del volume, truth_labels
        rows.append(row)
        print(_ct_line(row), flush=True)
    return rows


def _rel(measured: float | None, truth: float | None) -> float | None:
    if measured is None or not truth:
        return None
    return (measured - truth) / truth


def _ct_line(r: dict[str, Any]) -> str:
    parts = [
        f"seed {r['seed']}: {r['slices']}x{r['matrix']}^2 px {r['pixel_mm']} mm "
        f"thk {r['thickness_mm']} mm noise {r['noise']} {'signed' if r['signed'] else 'unsigned'}",
        f"nodule {r['nodule_mm'] or '-'} mm",
    ]
    if "cls_probability" in r:
        parts.append(f"p={r['cls_probability']:.3f}")
    if "lung_ml" in r:
        lung = _rel(r["lung_ml"], r["truth_lung_ml"])
        parts.append(
            f"lung {r['lung_ml']:.0f}/{r['truth_lung_ml']:.0f} ml ({lung:+.1%}) "
            f"Dice {r['lung_dice']:.3f}"
        )
        if r["truth_nodule_ml"]:
            nod = _rel(r["nodule_ml"], r["truth_nodule_ml"])
            parts.append(
                f"nodule {r['nodule_ml']:.2f}/{r['truth_nodule_ml']:.2f} ml ({nod:+.1%}) "
                f"Dice {r['nodule_dice']:.3f}"
            )
        else:
            parts.append(f"nodule {r['nodule_ml']:.2f} ml (none in truth)")
    return "  " + ", ".join(parts)


def evaluate_endoscopy(model: RegisteredModel, n: int, settings: Any) -> dict[str, Any]:
    scores: list[float] = []
    labels: list[bool] = []
    calls: list[bool] = []
    inference_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(n):
            seed = SEED0 + 50_000 + k
            image = generate_endoscopy_image(seed, lesion=k % 2 == 0)
            ds = endoscopy_to_dataset(image, secondary_capture=k % 4 == 1, seed=seed)
            path = Path(tmp) / f"{k:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            volume = load_series([path])
            run = run_model_full(model, volume, {}, settings)
            (result,) = run.rows
            scores.append(float(result["probability"]))
            calls.append(bool(result["present"]))
            labels.append(image.lesion)
            inference_s += run.timings["inference_s"]
    correct = sum(c == y for c, y in zip(calls, labels, strict=True))
    return {
        "images": n,
        "accuracy": correct / n,
        "auc": auc(scores, labels),
        "inference_ms_per_image": 1000 * inference_s / n,
    }


def summarize(rows: list[dict[str, Any]], endo: dict[str, Any] | None) -> tuple[str, bool]:
    lines = []
    ok = True

    def check(name: str, passed: bool, detail: str) -> None:
        nonlocal ok
        ok = ok and passed
        lines.append(f"  [{'PASS' if passed else 'FAIL'}] {name}: {detail}")

    if rows and "cls_probability" in rows[0]:
        truth = [r["nodule_mm"] is not None for r in rows]
        calls = [bool(r["cls_present"]) for r in rows]
        probs = [float(r["cls_probability"]) for r in rows]
        acc = sum(c == t for c, t in zip(calls, truth, strict=True)) / len(rows)
        sens = sum(c and t for c, t in zip(calls, truth, strict=True)) / max(1, sum(truth))
        spec = sum(not c and not t for c, t in zip(calls, truth, strict=True)) / max(
            1, len(truth) - sum(truth)
        )
        slices = sum(r["slices"] for r in rows)
        inf = sum(r["cls_inference_s"] for r in rows)
        lines.append(
            f"{CLS}: {len(rows)} studies, accuracy {acc:.3f}, AUC {auc(probs, truth):.3f}, "
            f"sensitivity {sens:.3f}, specificity {spec:.3f}; "
            f"inference {slices / inf:.0f} slices/s"
        )
        check("classification accuracy >= 95%", acc >= MIN_ACCURACY, f"{acc:.1%}")
    if rows and "lung_ml" in rows[0]:
        lung_err = [abs(_rel(r["lung_ml"], r["truth_lung_ml"]) or 0.0) for r in rows]
        nod_rows = [r for r in rows if r["truth_nodule_ml"]]
        nod_err = [abs(_rel(r["nodule_ml"], r["truth_nodule_ml"]) or 0.0) for r in nod_rows]
        false_nod = [r for r in rows if not r["truth_nodule_ml"] and r["seg_nodule_present"]]
        slices = sum(r["slices"] for r in rows)
        inf = sum(r["seg_inference_s"] for r in rows)
        nd = [r["nodule_dice"] for r in nod_rows if r["nodule_dice"] is not None]
        lines.append(
            f"{SEG}: {len(rows)} studies, "
            f"lung Dice mean {np.mean([r['lung_dice'] for r in rows]):.3f}"
            + (f", nodule Dice mean {np.mean(nd):.3f}" if nd else "")
            + f"; lung volume error mean {np.mean(lung_err):.1%} max {max(lung_err):.1%}"
            + (
                f"; nodule volume error mean {np.mean(nod_err):.1%} max {max(nod_err):.1%}"
                if nod_err
                else ""
            )
            + f"; nodule found in {len(false_nod)} of {len(rows) - len(nod_rows)} clean studies"
            + f"; inference {slices / inf:.0f} slices/s"
        )
        within_lung = sum(e <= LUNG_TOL for e in lung_err)
        check(
            "lung volume within 10% of truth",
            within_lung == len(rows),
            f"{within_lung}/{len(rows)} studies",
        )
        if nod_err:
            within_nod = sum(e <= NODULE_TOL for e in nod_err)
            check(
                "nodule volume within 20% of truth",
                within_nod == len(nod_err),
                f"{within_nod}/{len(nod_err)} studies",
            )
    if endo is not None:
        lines.append(
            f"{ENDO}: {endo['images']} images, accuracy {endo['accuracy']:.3f}, "
            f"AUC {endo['auc']:.3f}; inference {endo['inference_ms_per_image']:.1f} ms/image"
        )
        acc = endo["accuracy"]
        check("endoscopy accuracy >= 95%", acc >= MIN_ACCURACY, f"{acc:.1%}")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=20, help="CT phantoms (half with a nodule)")
    parser.add_argument("--max-slices", type=int, default=None, help="cap slices (quick runs)")
    parser.add_argument("--endoscopy", type=int, default=100, help="endoscopy images (0: skip)")
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed0", type=int, default=SEED0, help="first held-out seed")
    parser.add_argument("--json", type=Path, default=None, help="also write per-study rows here")
    args = parser.parse_args(argv)

    overrides: dict[str, Any] = {"ort_threads": args.threads}
    if args.models_dir is not None:
        overrides["models_dir"] = args.models_dir
    settings = load_settings(**overrides)
    registry = {m.name: m for m in discover(settings.models_path)}
    broken = {name: m.error for name, m in registry.items() if not m.enabled}
    if broken:
        for name, error in broken.items():
            print(f"model {name} is disabled: {error}", file=sys.stderr)
        return 1
    missing = {CLS, SEG, ENDO} - set(registry)
    if missing:
        print(f"models not found in {settings.models_path}: {sorted(missing)}", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    if args.seed0 < SEED0:
        print(f"held-out seeds start at {SEED0} (lower ones train the models)", file=sys.stderr)
        return 2
    set_seed0(args.seed0)
    print(f"chest CT: {args.phantoms} held-out phantoms (seeds {args.seed0}+)", flush=True)
    rows = evaluate_ct(registry, args.phantoms, args.max_slices, settings)
    endo = None
    if args.endoscopy:
        print(f"endoscopy: {args.endoscopy} held-out images", flush=True)
        endo = evaluate_endoscopy(registry[ENDO], args.endoscopy, settings)
    text, ok = summarize(rows, endo)
    print(f"\nsummary ({time.monotonic() - t0:.0f} s):\n{text}")
    if args.json is not None:
        args.json.write_text(json.dumps({"ct": rows, "endoscopy": endo}, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
