"""The ``pacs-ai`` command: sub-commands and the process supervisor of ``run``.

Owns: argument parsing, exit codes, one-line errors. Reads and changes data
through :mod:`worker.services` and :mod:`db`; must not be imported by any
other room.
"""
