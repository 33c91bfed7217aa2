"""What the CLI and the API both do: list filters, reprocess, resend (studies),
the nodule trend of one patient by its pseudonymous handle (patients).

Owns: the "commit, then send" order of reprocess and resend. Calls :mod:`db`
for SQL and the broker through :mod:`worker.scheduling` /
:mod:`worker.delivery`; must not import :mod:`worker.admin` or
:mod:`worker.cli`.
"""
