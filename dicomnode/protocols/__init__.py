"""Where results go: the ``PACS_AI_DESTINATIONS`` syntax and the registry of
delivery protocols, keyed by the scheme a destination is written with.

``PACS_AI_DESTINATIONS`` is a comma-separated list; each item is
``scheme://...``, or has no scheme (a plain C-STORE peer)::

    PACS@10.0.0.5:104,tls://SECURE@pacs:2762/sr,stow+https://pacs.example.org/dicom-web#sr+seg

:data:`PROTOCOLS` maps each scheme to the parser of its protocol module, which
returns a :class:`~dicomnode.protocols.base.Destination` that sends by itself
(``dest.send(paths, ctx)``): the dispatcher never looks at the scheme. A new
protocol is a new module in this package plus one line per scheme in
:data:`PROTOCOLS`.

This package never imports ``worker`` (settings reach it as a
:class:`~dicomnode.protocols.base.SendContext`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

from dicomnode.protocols import cstore, stow
from dicomnode.protocols.base import (
    DEFAULT_PROFILE,
    KINDS,
    NAME_MAX,
    Destination,
    Outcome,
    SendContext,
    SendResult,
    classify_status,
    redact,
)

__all__ = [
    "DEFAULT_PROFILE",
    "KINDS",
    "PROTOCOLS",
    "Destination",
    "Outcome",
    "SendContext",
    "SendResult",
    "classify_status",
    "parse_destination",
    "parse_destinations",
]

#: ``parser(rest)``: ``rest`` is what follows ``scheme://`` (all of the item for
#: the empty scheme); ValueError says what is wrong, without credentials.
Parser = Callable[[str], Destination]

#: The registry: one registration line per scheme.
PROTOCOLS: dict[str, Parser] = {
    "": partial(cstore.parse, tls=False),  # AE@host:port[/profile]
    "tls": partial(cstore.parse, tls=True),  # tls://AE@host:port[/profile]
    "stow+http": partial(stow.parse, https=False),  # stow+http://[u:pw@]host[:port][/path][#kinds]
    "stow+https": partial(stow.parse, https=True),  # the same over HTTPS
}

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.S)


def parse_destination(text: str) -> Destination:
    """Parse one destination; ValueError says what is wrong and what is accepted."""
    item = text.strip()
    match = _SCHEME.match(item)
    scheme, rest = (match.group("scheme").lower(), match.group("rest")) if match else ("", item)
    parser = PROTOCOLS.get(scheme)
    if parser is None:
        known = ", ".join(f"{s}://" for s in PROTOCOLS if s)
        raise ValueError(
            f"destination {redact(item)!r}: unknown scheme {scheme!r} "
            f"(known: {known}, or none for C-STORE)"
        )
    dest = parser(rest)
    if len(dest.name) > NAME_MAX:
        raise ValueError(f"destination {dest.name!r} is longer than {NAME_MAX} characters")
    return dest


def parse_destinations(text: str) -> tuple[Destination, ...]:
    """Parse a comma-separated list; names (the delivery rows' key) must be unique."""
    out: list[Destination] = []
    for item in text.split(","):
        if item.strip():
            dest = parse_destination(item)
            if any(d.name == dest.name for d in out):
                raise ValueError(f"destination {dest.name} is listed twice")
            out.append(dest)
    return tuple(out)
