"""Scheduling: when a study is complete, jobs and their leases, the Celery app
and tasks, retention.

Owns: the assembler and reconciler (run in the listener process), the job
lifecycle. Must not import :mod:`worker.admin` or :mod:`worker.cli`; the
pipeline is imported only inside the task that runs it (the listener never
loads it).
"""
