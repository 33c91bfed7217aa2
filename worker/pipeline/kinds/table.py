"""The task kinds and the module of each one's handler: the registration lines.

A new kind is one module in this package (a ``HANDLER``, see
:class:`~worker.pipeline.kinds.base.KindHandler`) and one line here. This
module imports nothing, so that validating a manifest's ``task`` loads neither
onnxruntime nor the pipeline.
"""

#: task name -> the module holding its HANDLER
REGISTRY: dict[str, str] = {
    "classification": "worker.pipeline.kinds.classification",
    "segmentation": "worker.pipeline.kinds.segmentation",
}
