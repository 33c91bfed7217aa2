"""Where results go: the ``PACS_AI_DESTINATIONS`` syntax, parsed and checked.

A destination is ``[tls://]AE@host:port[/profile]``; several are separated by
commas::

    PACS@10.0.0.5:104,ARCHIVE@archive.local:11112/sr+seg+ki,tls://SECURE@pacs:2762/sr

The profile says which objects the destination receives: ``sr``, ``seg`` and
``ki`` (key image), joined by ``+``; without a profile it is ``sr+seg``. The
``tls://`` prefix makes the association use TLS (certificates from
``PACS_AI_TLS_*``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Kinds of objects pacs-ai produces.
KINDS = ("sr", "seg", "ki")
DEFAULT_PROFILE = frozenset({"sr", "seg"})

_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)$")
_ITEM = re.compile(
    r"^(?P<tls>tls://)?(?P<ae>[^@]+)@(?P<host>.+):(?P<port>\d{1,5})(/(?P<profile>.*))?$"
)


@dataclass(frozen=True, slots=True)
class Destination:
    """One DICOM peer that receives results."""

    ae_title: str
    host: str
    port: int
    profile: frozenset[str] = DEFAULT_PROFILE
    tls: bool = False

    @property
    def name(self) -> str:
        """The key of its delivery rows: ``AE@host:port``."""
        return f"{self.ae_title}@{self.host}:{self.port}"

    def wants(self, kind: str) -> bool:
        return kind in self.profile

    def __str__(self) -> str:
        prefix = "tls://" if self.tls else ""
        return f"{prefix}{self.name}/{'+'.join(k for k in KINDS if k in self.profile)}"


def parse_destination(text: str) -> Destination:
    """Parse one ``[tls://]AE@host:port[/profile]``; ValueError says what is wrong."""
    item = text.strip()
    match = _ITEM.match(item)
    if match is None:
        raise ValueError(
            f"destination {item!r} is not of the form [tls://]AE@host:port[/sr+seg+ki]"
        )
    ae = match.group("ae").strip()
    if not _AE.match(ae) or len(ae) > 16:
        raise ValueError(f"destination {item!r}: AE title {ae!r} is not 1-16 printable characters")
    host = match.group("host")
    if not _HOST.match(host):
        raise ValueError(f"destination {item!r}: {host!r} is not a host name or address")
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(f"destination {item!r}: port {port} is not in 1-65535")
    profile_text = match.group("profile")
    profile = DEFAULT_PROFILE
    if profile_text is not None:
        kinds = [k.strip().lower() for k in profile_text.split("+") if k.strip()]
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            raise ValueError(
                f"destination {item!r}: profile {profile_text!r} must be sr, seg and/or ki "
                "joined by '+'"
            )
        profile = frozenset(kinds)
    return Destination(ae, host, port, profile, tls=match.group("tls") is not None)


def parse_destinations(text: str) -> tuple[Destination, ...]:
    """Parse a comma-separated list; names (AE@host:port) must be unique."""
    out: list[Destination] = []
    for item in text.split(","):
        if item.strip():
            dest = parse_destination(item)
            if any(d.name == dest.name for d in out):
                raise ValueError(f"destination {dest.name} is listed twice")
            out.append(dest)
    return tuple(out)
