"""Results as the radiologist sees them: the SR, SEGs and key image built from a
job's findings (the task kinds' handlers in :mod:`worker.pipeline.kinds` say
what each record shows and where), written to the outbox with one delivery row
per object and destination (:mod:`worker.results.report`); priors compared.

Owns: the outbox and delivery rows' creation. Must not import
:mod:`worker.admin` or :mod:`worker.cli`; sending is :mod:`worker.delivery`'s.
"""
