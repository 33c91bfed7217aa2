"""The listener process keeps the pipeline out: a C-STORE listener that imports
onnxruntime, OpenCV, highdicom or the pipeline pays their memory in every
listener process and can break on a model library's upgrade.

The real process entry (``pacs-ai listen``, two listener processes) runs with
``PYTHONPROFILEIMPORTTIME=1`` (inherited by its children), receives a study,
assembles it and queues its job; every module any of its processes imported is
then read from the import-time log.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import NodeFactory, send_datasets, wait_for
from tests.factory import write_ct_series

#: module prefixes that must never be loaded by a listener process
FORBIDDEN = (
    "onnxruntime",
    "cv2",
    "highdicom",
    "scipy",
    "torch",
    "worker.pipeline",
    "worker.results",
    "worker.admin",
    "dicomnode.results",
)

_IMPORT_LINE = re.compile(r"^import time:\s+\d+\s+\|\s+\d+\s+\|(\s*)(\S+)\s*$")


def imported_modules(log: str) -> set[str]:
    """Every module named by ``-X importtime`` lines in a log."""
    found = set()
    for line in log.splitlines():
        match = _IMPORT_LINE.match(line)
        if match:
            found.add(match.group(2))
    return found


def test_import_log_is_parsed() -> None:
    log = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       120 |        120 |   numpy.core\n"
        "import time:      2000 |       2200 | worker.pipeline.run\n"
    )
    assert imported_modules(log) == {"numpy.core", "worker.pipeline.run"}


def test_listener_loads_no_pipeline(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory(listener_processes=2)
    node.cli("db", "upgrade")
    node.env["PYTHONPROFILEIMPORTTIME"] = "1"
    node.start_listener()
    paths = write_ct_series(tmp_path / "ct", 4)
    assert send_datasets(node.port, paths) == [0] * 4

    def queued() -> bool:
        jobs = node.json("jobs", "list")
        return bool(jobs)

    wait_for(queued, 30, 0.5, what="the study's job")
    node.stop("listen")
    modules = imported_modules(node.logs())
    # the log really holds the listener's imports (not an empty or foreign log)
    assert "dicomnode.scp" in modules and "pynetdicom" in modules
    loaded = sorted(m for m in modules if m.startswith(FORBIDDEN))
    assert loaded == [], f"the listener process imported {loaded}"
