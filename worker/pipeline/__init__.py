"""The inference pipeline: series selection, decoding, recipes, ONNX inference,
postprocessing, the model registry and one handler per task kind
(:mod:`worker.pipeline.kinds`).

Owns: turning a study's instances into result records. Must not import
:mod:`worker.admin`, :mod:`worker.cli` or :mod:`worker.delivery`; only
:mod:`worker.pipeline.run` touches the database. Never imported by the listener
process (onnxruntime, OpenCV and highdicom stay out of it: a test checks).
"""
