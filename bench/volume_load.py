"""Time and peak memory of ``load_series`` on a synthetic CT series.

Writes N slices of ROWSxCOLS signed 16-bit CT (shuffled file order) to a temporary
folder, optionally compressed, then loads them in a fresh child process and
reports wall time and peak RSS next to the size of the float32 output:

    .venv/bin/python -m bench.volume_load [--slices 520] [--size 512] [--ts rle|jls|j2k]

Peak RSS should be the output array plus a small constant (one decoded slice,
the interpreter and libraries), not a multiple of the series size.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from tests.factory import ct_slice

REPO = Path(__file__).resolve().parent.parent

SYNTAXES = {"rle": RLELossless, "jls": JPEGLSLossless, "j2k": JPEG2000Lossless}

CHILD = """
import json, resource, sys, time
from pathlib import Path
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from worker.pipeline.volume import load_series
paths = [Path(p) for p in json.loads(Path(sys.argv[2]).read_text())]
t0 = time.perf_counter()
vol = load_series(paths)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_rss_mib": peak / 1024, "shape": vol.pixels.shape,
                  "output_mib": vol.pixels.nbytes / 2**20}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=520)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--ts", choices=sorted(SYNTAXES), default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        study, series = generate_uid(), generate_uid()
        rng = np.random.default_rng(0)
        base = rng.normal(1000, 30, (args.size, args.size)).astype(np.int16)
        paths = []
        t0 = time.perf_counter()
        for i in range(args.slices):
            ds = ct_slice(study, series, i, rows=args.size, cols=args.size, pixels=base + i)
            if args.ts:
                ds.compress(SYNTAXES[args.ts], generate_instance_uid=False)
            p = Path(tmp) / f"{generate_uid()}.dcm"
            ds.save_as(p, enforce_file_format=True)
            paths.append(str(p))
        random.Random(1).shuffle(paths)
        print(f"wrote {args.slices} slices in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        listing = Path(tmp) / "paths.json"
        listing.write_text(json.dumps(paths))
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(REPO), str(listing)],
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
    result["transfer_syntax"] = args.ts or "explicit LE"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
