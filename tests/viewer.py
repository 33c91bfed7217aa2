"""A real web viewer for the tests: OHIF 3.13 over Orthanc's DICOMweb, in headless Chromium.

- :func:`ohif_dist`: OHIF's prebuilt ``dist/`` from the npm registry
  (``npm pack @ohif/app@3.13.2``, unpacked by ``scripts/setup.sh viewer`` into
  ``~/.cache/pacs-ai/ohif-3.13.2``; ``PACS_AI_OHIF_DIST`` overrides). Nothing of
  its dependency tree is installed: the tarball holds the built app.
- :class:`OrthancWeb`: a private Orthanc with its DICOMweb plugin (Debian
  ``orthanc``, ``orthanc-dicomweb``) on free ports, filled over REST.
- :class:`ViewerServer`: serves ``dist/`` with our ``app-config.js`` (one
  DICOMweb data source at ``/dicom-web``), falls back to ``index.html`` for the
  app's routes and forwards ``/dicom-web/...`` to Orthanc (same origin, no CORS).
- :func:`chromium`: Debian's Chromium through chromedriver (selenium).

Outside CI a missing piece skips the viewer tests; in CI (``CI`` set) it fails
them, because ``scripts/setup.sh`` installs all of it there.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import CHROMEDRIVER, CHROMIUM, Orthanc, free_port, headless_chromium

OHIF_VERSION = "3.13.2"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def ohif_dist() -> Path:
    """The unpacked OHIF ``dist/`` folder (``scripts/setup.sh viewer`` puts it there)."""
    configured = os.environ.get("PACS_AI_OHIF_DIST")
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "pacs-ai" / f"ohif-{OHIF_VERSION}" / "package" / "dist"


def missing_pieces() -> list[str]:
    """What the viewer tests need and this machine lacks."""
    missing = []
    if not (ohif_dist() / "index.html").is_file():
        missing.append(f"OHIF {OHIF_VERSION} dist (bash scripts/setup.sh viewer)")
    if not shutil.which("Orthanc"):
        missing.append("Orthanc (apt-get install orthanc)")
    if not DICOMWEB_PLUGIN.is_file():
        missing.append("Orthanc DICOMweb plugin (apt-get install orthanc-dicomweb)")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        missing.append("Chromium (apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e .[dev])")
    return missing


def require_viewer() -> None:
    """Skip (outside CI) or fail (in CI) when a piece of the viewer set-up is missing."""
    missing = missing_pieces()
    if not missing:
        return
    message = "viewer test needs: " + "; ".join(missing)
    if os.environ.get("CI"):
        pytest.fail(message + " (CI installs them: bash scripts/setup.sh all)")
    pytest.skip(message)


# -- Orthanc with DICOMweb -------------------------------------------------------------


class OrthancWeb(Orthanc):
    """A private Orthanc with the DICOMweb plugin (at ``/dicom-web``), on free ports."""

    def __init__(self, folder: Path, name: str = "pacs-ai-viewer-test") -> None:
        super().__init__(folder, name)

    def start(self, pacs_ai_port: int | None = None, **config: Any) -> None:
        dicomweb = {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"}
        settings = {"Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": dicomweb, "StableAge": 1}
        super().start(pacs_ai_port, **{**settings, **config})

    def series_of(self, study_uid: str) -> list[dict[str, Any]]:
        """QIDO-RS series of a study, as DICOM JSON."""
        return list(self.call("GET", f"/dicom-web/studies/{study_uid}/series") or [])


# -- the static server with the /dicom-web proxy ------------------------------------------


def app_config() -> str:
    """OHIF's configuration: one DICOMweb data source, same origin, no study list frills."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (pacs-ai tests)",
            "name": "orthanc",
            "wadoUriRoot": "/dicom-web",
            "qidoRoot": "/dicom-web",
            "wadoRoot": "/dicom-web",
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "showErrorDetails": "always",
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


class _Handler(SimpleHTTPRequestHandler):
    server: _ViewerHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=120)
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in {"host", "connection", "accept-encoding"}
        }
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            rsp = conn.getresponse()
            data = rsp.read()
        except OSError as exc:
            self.send_error(502, f"Orthanc: {exc}")
            return
        finally:
            conn.close()
        self.send_response(rsp.status)
        for key, value in rsp.getheaders():
            if key.lower() not in {"transfer-encoding", "connection", "content-length"}:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _static(self, head: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/app-config.js":
            data = self.server.config_js.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)
            return
        target = Path(self.translate_path(path))
        if not target.is_file():
            self.path = "/index.html"  # the app's own routes: /viewer, /segmentation, ...
        if head:
            super().do_HEAD()
        else:
            super().do_GET()

    def do_GET(self) -> None:
        if self.path.startswith("/dicom-web/"):
            self._proxy()
        else:
            self._static(head=False)

    def do_HEAD(self) -> None:
        self._static(head=True)

    def do_POST(self) -> None:
        if self.path.startswith("/dicom-web/"):
            self._proxy()
        else:
            self.send_error(405)


class _ViewerHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    orthanc_port: int
    config_js: str


class ViewerServer:
    """OHIF's ``dist/`` on a free port, ``/dicom-web`` forwarded to Orthanc."""

    def __init__(self, dist: Path, orthanc_port: int) -> None:
        self.port = free_port()

        def handler(*args: Any, **kwargs: Any) -> _Handler:
            return _Handler(*args, directory=str(dist), **kwargs)

        self._server = _ViewerHTTPServer(("127.0.0.1", self.port), handler)
        self._server.orthanc_port = orthanc_port
        self._server.config_js = app_config()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ViewerServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- the browser ----------------------------------------------------------------------------


@contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    """Headless Chromium with a fresh profile, keeping the page's console messages."""
    profile.mkdir(parents=True, exist_ok=True)
    flags = (f"--user-data-dir={profile}", "--window-size=1600,1000")
    with headless_chromium(*flags, console_log=True) as driver:
        yield driver


def screenshot(driver: Any, path: Path) -> Path:
    """A PNG of the page, for a person to look at."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})["data"]
    path.write_bytes(base64.b64decode(data))
    return path
