"""Run ``worker.pipeline.volume.load_series`` over every pydicom test file and print a table.

Each file is processed as a one-instance series. The outcome is one of:

* ``ok``       -- a Volume was built (shape, colour, geometry shown);
* ``refused``  -- a readable ``VolumeError`` (the reason is shown);
* ``skipped``  -- not an image (not DICOM Part 10, or no Rows/Columns: SR, RT plan...);
* ``ERROR``    -- any other exception: a bug (the test suite asserts there are none).

The files are listed from disk only (pydicom's bundled ``test_files`` plus the
``pydicom-data`` package when installed): ``pydicom.data.get_testdata_files``
would try to download the files missing locally, which hangs without network.

    .venv/bin/python -m bench.pydicom_files [--markdown] [PATTERN]
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from worker.pipeline.volume import VolumeError, load_series


def pydicom_test_files() -> list[tuple[str, Path]]:
    """(display name, path) of every local pydicom test file, without network access."""
    from pydicom.data.data_manager import DATA_ROOT

    out: list[tuple[str, Path]] = []
    root = Path(DATA_ROOT) / "test_files"
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix != ".py":
            out.append((str(p.relative_to(root)), p))
    try:
        import data_store  # the pydicom-data package

        ext = Path(data_store.__file__).parent / "data"
        for p in sorted(ext.glob("*")):
            if p.is_file():
                out.append(("pydicom-data/" + p.name, p))
    except ImportError:
        pass
    return out


@dataclass
class Outcome:
    name: str
    status: str  # ok | refused | skipped | ERROR
    detail: str
    seconds: float


def process(name: str, path: Path) -> Outcome:
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except InvalidDicomError:
                return Outcome(name, "skipped", "not a DICOM Part 10 file", 0.0)
            except Exception as exc:
                return Outcome(name, "skipped", f"unreadable ({type(exc).__name__})", 0.0)
            if "Rows" not in ds or "Columns" not in ds:
                sop = getattr(ds.get("SOPClassUID"), "name", None) or "no SOP class"
                return Outcome(name, "skipped", f"no Rows/Columns: not an image ({sop})", 0.0)
            del ds
            vol = load_series([path])
    except VolumeError as exc:
        return Outcome(name, "refused", str(exc), time.perf_counter() - t0)
    except Exception as exc:
        return Outcome(name, "ERROR", f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
    kind = "RGB" if vol.is_rgb else "grey"
    geo = "positions" if vol.positions_known else "no positions"
    lo, hi = float(vol.pixels.min()), float(vol.pixels.max())
    detail = (
        f"{'x'.join(map(str, vol.pixels.shape))} {kind} {vol.photometric} "
        f"[{lo:.4g}, {hi:.4g}] {geo}"
    )
    return Outcome(name, "ok", detail, time.perf_counter() - t0)


def run(pattern: str = "*") -> list[Outcome]:
    return [
        process(name, path)
        for name, path in pydicom_test_files()
        if fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(path.name, pattern)
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pattern", nargs="?", default="*")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    outcomes = run(args.pattern)
    if args.markdown:
        print("| file | outcome | detail | s |\n|---|---|---|---|")
        for o in outcomes:
            detail = o.detail.replace("|", "/")
            print(f"| {o.name} | {o.status} | {detail} | {o.seconds:.2f} |")
    else:
        width = max((len(o.name) for o in outcomes), default=10)
        for o in outcomes:
            print(f"{o.name:<{width}}  {o.status:<8} {o.seconds:6.2f}s  {o.detail}")
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), file=sys.stderr)
    return 1 if counts.get("ERROR") else 0


if __name__ == "__main__":
    raise SystemExit(main())
