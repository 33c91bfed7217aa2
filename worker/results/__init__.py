"""Results as the radiologist sees them: findings from result records
(:mod:`worker.results.drawing`), the SR, SEGs and key image written to the
outbox with one delivery row per object and destination
(:mod:`worker.results.report`).

Owns: the outbox and delivery rows' creation. Must not import
:mod:`worker.admin` or :mod:`worker.cli`; sending is :mod:`worker.delivery`'s.
"""
