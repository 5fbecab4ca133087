"""``smslab topology generate``: a valid topology of any size, for labs at scale and the simulator.

The tree is filled breadth first: the central site ``CEN``; under it and under every primary
down to ``depth`` levels, ``fanout`` primaries; under every primary, ``secondaries``
secondaries; until there are ``sites`` sites. Site codes stay 3 characters ``A-Z0-9``:
primaries take codes starting with P, Q, R... and secondaries codes starting with S, T, U...,
each in order (``P00``, ``P01`` ... ``PZZ``, ``Q00`` ...), so any number of sites up to the code
space fits.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterator
from typing import Any

from emulator.errors import ConfigError
from emulator.topology import Topology

ALPHABET = string.digits + string.ascii_uppercase
PRIMARY_LETTERS = "PQRABCDEFGHIJKLMNO"
SECONDARY_LETTERS = "STUVWXYZ"
CODE_SPACE = 36**3


def _codes(letters: str, taken: set[str]) -> Iterator[str]:
    firsts = list(letters) + [c for c in ALPHABET if c not in PRIMARY_LETTERS + SECONDARY_LETTERS]
    for first in firsts:
        for second, third in itertools.product(ALPHABET, repeat=2):
            code = first + second + third
            if code not in taken:
                taken.add(code)
                yield code
    # the other kind's letters, once their own are used up
    for first, second, third in itertools.product(ALPHABET, repeat=3):
        code = first + second + third
        if code not in taken:
            taken.add(code)
            yield code


def capacity(depth: int, fanout: int, secondaries: int) -> int:
    """How many sites a tree of this shape holds at most."""
    primaries: int = sum(fanout**level for level in range(1, depth + 1))
    return 1 + primaries * (1 + secondaries)


def generate(sites: int, *, depth: int, fanout: int, secondaries: int = 0, clients: int = 3, lab: str = "gen",
             mode: str = "sms20", workload: dict[str, float] | None = None,
             settings: dict[str, Any] | None = None) -> Topology:
    if sites < 1:
        raise ConfigError("a topology needs at least one site (its central site)")
    if sites > CODE_SPACE:
        raise ConfigError(f"{sites} sites do not fit in the code space of {CODE_SPACE} three-character codes")
    if depth < 0 or fanout < 0 or secondaries < 0:
        raise ConfigError("--depth, --fanout and --secondaries are 0 or more")
    most = capacity(depth, fanout, secondaries)
    if sites > most:
        raise ConfigError(f"{sites} sites do not fit in depth {depth}, fanout {fanout} with {secondaries}"
                          f" secondar{'y' if secondaries == 1 else 'ies'} per primary: at most {most}",
                          hint="raise --depth, --fanout or --secondaries")
    taken = {"CEN"}
    primary_codes = _codes(PRIMARY_LETTERS, taken)
    secondary_codes = _codes(SECONDARY_LETTERS, taken)
    out: list[dict[str, Any]] = [{"code": "CEN", "type": "central", "clients": 0}]
    level = [("CEN", 0)]
    while len(out) < sites and level:
        following: list[tuple[str, int]] = []
        for parent, depth_of in level:
            if depth_of < depth:
                for _ in range(fanout):
                    if len(out) >= sites:
                        break
                    code = next(primary_codes)
                    out.append({"code": code, "type": "primary", "parent": parent})
                    following.append((code, depth_of + 1))
        for code, _ in following:
            for _ in range(secondaries):
                if len(out) >= sites:
                    break
                out.append({"code": next(secondary_codes), "type": "secondary", "parent": code})
        level = following
    doc: dict[str, Any] = {"lab": lab, "mode": mode, "defaults": {"clients": clients}}
    if workload:
        doc["defaults"]["workload"] = workload
    if settings:
        doc["settings"] = settings
    doc["sites"] = out
    try:
        return Topology.model_validate(doc)
    except ValueError as exc:  # never for a tree made here; but say so if it were
        raise ConfigError(f"the generated topology is not valid: {exc}") from exc
