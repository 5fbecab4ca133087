"""Broker URLs: a lab's broker is one URL or several (the nodes of one RabbitMQ cluster).

Several are written comma-separated (``amqp://h1,amqp://h2``) or given as a list; this module
turns either into the list and back. Pika-free, so the lab file and the CLI use it.
"""

from __future__ import annotations

import urllib.parse
import zlib
from collections.abc import Iterable
from urllib.parse import urlsplit

from emulator.errors import ConfigError

SCHEMES = ("amqp://", "amqps://")


def split(value: str | Iterable[str] | None) -> list[str]:
    """The URLs in ``value`` (a comma-separated string, or strings each of which may hold
    several), in order, without blanks or repeats."""
    if value is None:
        return []
    parts = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for part in parts:
        for url in str(part).split(","):
            url = url.strip()
            if not url:
                continue
            if not url.startswith(SCHEMES):
                raise ConfigError(f"not an AMQP URL: {url!r}",
                                  hint="use amqp://USER:PASSWORD@HOST:PORT/VHOST; several nodes of one "
                                       "cluster comma-separated (amqp://h1,amqp://h2) or --amqp repeated")
            if url not in out:
                out.append(url)
    return out


def join(urls: Iterable[str]) -> str:
    return ",".join(urls)


def where(url: str) -> str:
    """``host:port`` of one URL (no user or password): how status names a node."""
    parts = urlsplit(url)
    port = parts.port or (5671 if url.startswith("amqps://") else 5672)
    return f"{parts.hostname or 'localhost'}:{port}"


def first_choice(site: str, count: int) -> int:
    """The node a site tries first: spread over the nodes, stable for one site."""
    return zlib.crc32(site.encode()) % count if count else 0


def with_login(url: str, user: str, password: str) -> str:
    """``url`` logging in as ``user``: its host, port and vhost with another user and password
    (kept in memory only: lab.json holds the URL as given)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    netloc = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
