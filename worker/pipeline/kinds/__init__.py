"""Task kinds: one handler module per kind, registered here and nowhere else.

A manifest's ``task`` names its kind. A new kind is one new module in this
package (a ``HANDLER`` with ``task``, ``run`` and ``findings``, see
:class:`~worker.pipeline.kinds.base.KindHandler`) and one line in
:data:`REGISTRY`. Handlers are imported on first use, so that naming the kinds
(manifest validation) loads neither onnxruntime nor the pipeline.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.pipeline.kinds.base import KindHandler

#: task name -> the module holding its HANDLER (the registration lines)
REGISTRY: dict[str, str] = {
    "classification": "worker.pipeline.kinds.classification",
    "segmentation": "worker.pipeline.kinds.segmentation",
}


def handler_for(task: str) -> KindHandler:
    """The handler of a task kind; KeyError names the kinds there are."""
    module = REGISTRY.get(task)
    if module is None:
        raise KeyError(f"unknown task {task!r} (known: {', '.join(sorted(REGISTRY))})")
    handler: KindHandler = importlib.import_module(module).HANDLER
    return handler
