"""Delivery: sending the outbox's result objects to their destinations.

Owns: the dispatch task's work, retries and back-off, give-up by age. The
protocols themselves (C-STORE, STOW-RS) are in :mod:`dicomnode`, registered by
scheme. Must not import :mod:`worker.pipeline`, :mod:`worker.admin` or
:mod:`worker.cli`.
"""
