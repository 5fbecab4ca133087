"""Object IDs and counters that are pure arithmetic.

Object IDs are ``<site code><5 digits>`` (``CEN00014``), allocated per site and per kind.
Receivers key definitions by ID, so an ID allocated twice overwrites: the "package 14"
hazard of Q258924.
"""

from __future__ import annotations

import re

OBJECT_KINDS = ("package", "advertisement", "collection")
_ID = re.compile(r"^([A-Z0-9]{3})(\d{5})$")


def object_id(site_code: str, number: int) -> str:
    if not 0 <= number <= 99999:
        raise ValueError(f"object number {number} of site {site_code} does not fit in 5 digits")
    return f"{site_code}{number:05d}"


def parse_object_id(value: str) -> tuple[str, int] | None:
    match = _ID.fullmatch(value)
    if match is None:
        return None
    return match.group(1), int(match.group(2))


def recovered_txn_id(own: int, peer_watermarks: list[int], margin: int) -> int:
    """Q288970's workaround: the highest transaction ID any peer holds for us, plus a margin.

    Never moves the counter backwards: if our own counter is already past every peer, it
    still moves by the margin so no number we might have used before a crash is reused.
    """
    return max([own, *peer_watermarks]) + margin


def recovered_counter(own: int, seen: list[int]) -> int:
    """Allocators and serials move past everything any peer has seen."""
    return max([own, *seen])
