"""The CLI's audit records: one per command that reads or changes data.

:func:`run_audited` is called by the dispatcher (:func:`worker.cli.main.main`)
for every command but the long-running services; see
:mod:`worker.admin.audit` for what a record holds. A command's record names
the operating-system user (``cli:<user>`` as its source), the command words and
option names (never their values), the studies named by ``--study``, and the
exit status. ``models list``/``check`` read only the model files and are not
recorded. Imports no web framework and nothing of :mod:`worker.admin` (the
listener process runs this CLI too).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from db.audit import uids, write
from db.repo import AuditEntry

#: commands that read no data (the model files only)
NOT_AUDITED_COMMANDS = frozenset({"models"})


def cli_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return f"uid:{os.getuid()}"


def cli_entry(args: argparse.Namespace, argv: Sequence[str], outcome: int) -> AuditEntry:
    """The record of one command: the command words and option names of ``argv``
    (never their values), the studies it named, and its exit status."""
    words: list[str] = []
    for arg in argv:
        if arg.startswith("-"):
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            if name not in words:
                words.append(name)
        elif (
            len(words) < 2  # command and sub-command (a later word is a value)
            and not any(w.startswith("-") for w in words)
            and re.match(r"^[a-z][a-z-]*$", arg)
        ):
            words.append(arg)  # before any option
    study = getattr(args, "study", None)
    studies = study if isinstance(study, list) else [study]
    user = cli_user()
    return AuditEntry(
        interface="cli",
        actor=user,
        source=f"cli:{user}",
        action=" ".join(words) or "(no command)",
        outcome=outcome,
        studies=uids(studies),
    )


def run_audited(
    settings: Any,
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    exit_status: Callable[[BaseException], int],
) -> int:
    """Run a parsed command (``args.func``) and append its audit record; the
    command's exceptions propagate unchanged after the record is written, with
    the exit status ``exit_status`` gives them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "command", None) in NOT_AUDITED_COMMANDS:
        return int(args.func(settings, args))
    url = settings.effective_database_url
    try:
        outcome = int(args.func(settings, args))
    except BaseException as exc:
        # the command failed, perhaps for want of a database: its own line says why
        write(url, cli_entry(args, argv, exit_status(exc)), logging.DEBUG)
        raise
    written = write(url, cli_entry(args, argv, outcome), logging.DEBUG)
    if not written and not outcome:
        print("pacs-ai: warning: this command's audit record was not written", file=sys.stderr)
    return outcome
