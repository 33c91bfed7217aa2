"""The inference pipeline: series selection, decoding, recipes, ONNX inference,
postprocessing, the model registry and one handler per task kind
(:mod:`worker.pipeline.kinds`).

Owns: turning a study's instances into result records. Must not import
:mod:`worker.admin`, :mod:`worker.cli` or :mod:`worker.delivery`; only
:mod:`worker.pipeline.run` touches the database. Never imported by the listener
process (onnxruntime, OpenCV and highdicom stay out of it: a test checks).
"""

import os as _os


def _no_transparent_hugepages() -> None:
    """Stop numpy asking the kernel for transparent huge pages on big arrays.

    numpy ``madvise``\\s every array of 4 MB or more for huge pages; where the
    kernel defragments synchronously for such requests (``defrag=madvise``, a
    common default), a process that has allocated and freed a lot (a job) stalls
    on each new big array: comparing a 300 x 512 x 512 label volume took 0.21 s
    instead of 0.03 s, and both CT models on a 300-slice series 6.55 s instead
    of 5.52 s (``bench.inference``). ``NUMPY_MADVISE_HUGEPAGE`` set in the
    environment keeps its say.
    """
    if "NUMPY_MADVISE_HUGEPAGE" in _os.environ:
        return
    import numpy as np

    multiarray = getattr(getattr(np, "_core", None), "multiarray", None)
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)


_no_transparent_hugepages()
