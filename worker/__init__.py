"""Celery app and tasks, scheduling (assembler, reconciler), admin CLI."""
