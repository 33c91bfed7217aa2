"""Inference benchmark: one 300-slice 512x512 chest CT through the worker pipeline.

Prints seconds for decode, preprocessing, each model's inference and
postprocessing, and the process's peak RSS. Targets (2-core machine): both CT
models together at most 6 s (issue 12; under 20 s before it); everything but
inference faster than inference; peak RSS under 2 GB.

    .venv/bin/python -m bench.inference [--slices 300] [--size 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from testkit.phantoms import generate_chest_ct, phantom_to_datasets
from worker.pipeline.registry import discover
from worker.pipeline.run import run_model
from worker.pipeline.volume import load_series, patient_features
from worker.settings import load_settings


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM belongs to the process image (getrusage's
    ru_maxrss survives exec and would include the parent's phantom generator)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2_000_001)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child: a series dir
    args = parser.parse_args()

    if args.measure is None:
        # generate the series here, measure in a fresh child process so that its
        # peak RSS is the worker's alone (not the phantom generator's)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.monotonic()
            phantom = generate_chest_ct(
                args.seed, slices=args.slices, matrix=args.size, nodule_diameter_mm=15.0
            )
            for i, ds in enumerate(phantom_to_datasets(phantom, shuffle=True, seed=args.seed)):
                ds.save_as(Path(tmp) / f"{i:04d}.dcm", enforce_file_format=True)
            del phantom
            print(f"series generated in {time.monotonic() - t:.1f} s (not counted)", flush=True)
            child = [
                sys.executable,
                "-m",
                "bench.inference",
                "--measure",
                tmp,
                "--threads",
                str(args.threads),
            ]
            return subprocess.call(child)

    settings = load_settings(ort_threads=args.threads)
    models = [m for m in discover(settings.models_path) if m.enabled]
    ct_models = [m for m in models if m.manifest and "CT" in m.manifest.routing.modalities]
    paths = sorted(args.measure.glob("*.dcm"))
    args.slices = len(paths)
    args.size = int(dcmread(paths[0], stop_before_pixels=True).Rows)
    rss_before = peak_rss_mb()
    t = time.monotonic()
    volume = load_series(paths)
    features = patient_features(dcmread(paths[0], stop_before_pixels=True))
    decode_s = time.monotonic() - t

    rows = [("decode (read + modality LUT + sort)", decode_s)]
    total_inference = 0.0
    total_other = decode_s
    for model in ct_models:
        results, timings = run_model(model, volume, features, settings)
        rows.append((f"{model.name}: preprocess", timings["preprocess_s"]))
        rows.append((f"{model.name}: inference", timings["inference_s"]))
        rows.append((f"{model.name}: postprocess", timings["postprocess_s"]))
        total_inference += timings["inference_s"]
        total_other += timings["preprocess_s"] + timings["postprocess_s"]
        for r in results:
            print(
                f"  {model.name}: {r['finding']}: p={r['probability']} present={r['present']} "
                f"{ {k: v for k, v in r['measurements'].items() if k != 'components'} }"
            )
    n = args.slices
    print(f"\nseries: {n} slices {args.size}x{args.size}, {args.threads} onnxruntime threads")
    print(f"{'stage':<45} {'seconds':>8}")
    for name, seconds in rows:
        print(f"{name:<45} {seconds:8.2f}")
    both = total_inference + total_other - decode_s
    print(f"{'both CT models, everything but decode':<45} {both:8.2f}")
    peak = peak_rss_mb()
    print(f"worker peak RSS: {peak:.0f} MB (after imports, before decode: {rss_before:.0f} MB)")
    checks = [
        ("both CT models <= 6 s", both <= 6.0),
        ("everything but inference < inference", total_other < total_inference),
        ("peak RSS < 2 GB", peak < 2048),
    ]
    for label, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
