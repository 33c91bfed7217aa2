"""pacs-ai's worker side, in rooms by role.

- :mod:`worker.settings`, :mod:`worker.logging_setup`, :mod:`worker.metrics`:
  shared by every room (typed settings, PHI-safe logging, Prometheus metrics).
- :mod:`worker.scheduling`: study completion, jobs, the Celery app and tasks,
  retention (the assembler and reconciler run in the listener process).
- :mod:`worker.pipeline`: series selection, decoding, recipes, ONNX inference,
  postprocessing, the model registry and the task kinds' handlers.
- :mod:`worker.results`: findings, SR/SEG/key image files in the outbox, and
  their delivery rows.
- :mod:`worker.delivery`: sending result objects (dispatch, retries).
- :mod:`worker.services`: what the CLI and the API both do (filters, reprocess,
  resend).
- :mod:`worker.admin`: the HTTP API, dashboard and web guard.
- :mod:`worker.cli`: the ``pacs-ai`` command and its process supervisor.

SQL lives in :mod:`db`; DICOM networking and object building in
:mod:`dicomnode`.
"""
