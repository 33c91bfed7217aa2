"""Task kinds: one handler module per kind, registered in
:mod:`worker.pipeline.kinds.table` and nowhere else.

A manifest's ``task`` names its kind; :func:`handler_for` imports the kind's
module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from worker.pipeline.kinds.table import REGISTRY

if TYPE_CHECKING:
    from worker.pipeline.kinds.base import KindHandler

__all__ = ["REGISTRY", "handler_for"]


def handler_for(task: str) -> KindHandler:
    """The handler of a task kind; KeyError names the kinds there are."""
    module = REGISTRY.get(task)
    if module is None:
        raise KeyError(f"unknown task {task!r} (known: {', '.join(sorted(REGISTRY))})")
    handler: KindHandler = importlib.import_module(module).HANDLER
    return handler
