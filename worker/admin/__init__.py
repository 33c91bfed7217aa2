"""Administration over HTTP: the API, the dashboard, the web guard.

Owns: HTTP routes, tokens, the dashboard's static files. Reads and changes data
through :mod:`worker.services` and :mod:`db`; must not import
:mod:`worker.cli` or run the pipeline.
"""
