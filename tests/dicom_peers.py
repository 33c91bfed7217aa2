"""DICOM peers for result delivery tests: a recording Storage SCP and dcmtk storescp."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from tests.conftest import port_open, wait_for


@dataclass
class RecordingSCP:
    """A Storage SCP on localhost that records every C-STORE and answers ``status``."""

    port: int
    ae_title: str = "DEST"
    status: int = 0x0000
    received: list[Dataset] = field(default_factory=list)
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return self.status

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        contexts = list(StoragePresentationContexts)
        names = {cx.abstract_syntax for cx in contexts}
        for sop in (Comprehensive3DSRStorage, SegmentationStorage, SecondaryCaptureImageStorage):
            if sop not in names:
                ae.add_supported_context(sop)
        for cx in contexts:
            ae.add_supported_context(cx.abstract_syntax)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def uids(self) -> list[str]:
        with self._lock:
            return [str(ds.SOPInstanceUID) for ds in self.received]


@contextmanager
def storescp(port: int, folder: Path, ae_title: str = "DEST") -> Iterator[subprocess.Popen[bytes]]:
    """dcmtk's storescp writing every received object into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["storescp", "-aet", ae_title, "-od", str(folder), "--fork", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open(port), 10, what="storescp")
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
