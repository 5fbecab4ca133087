"""Admission (emulator/protocol/admission.py): what a neighbour may send, table-driven (issue 10).

The hierarchy of these tests: CEN above P01 above S01 and S02; the site judging is P01.
"""

from __future__ import annotations

from typing import Any

import pytest

from emulator.protocol.admission import refusal
from emulator.protocol.envelope import MAX_VERSION, DataClass
from sites.clients import inventory_payload
from tests.unit.helpers import envelope

SITE = "P01"
ANCESTORS = frozenset({"CEN"})
DESCENDANTS = frozenset({"P01", "S01", "S02"})
SUBTREES = {"S01": frozenset({"S01"}), "S02": frozenset({"S02"})}


def obj(oid: str = "CEN00007", kind: str = "package", origin: str = "CEN", **over: Any) -> dict[str, Any]:
    return {"id": oid, "kind": kind, "origin": origin, "def_uid": "u1", "name": "Office", "revision": 2,
            "deleted": False, **over}


def judged(cls: DataClass, key: str, payload: dict[str, Any], *, source: str, origin: str | None = None) -> str | None:
    env = envelope(source=source, dest=SITE, data_class=cls, key=key, payload=payload, origin=origin or source)
    role = "parent" if source == "CEN" else "child"
    return refusal(env, peer_role=role, peer_subtree=SUBTREES.get(source, frozenset()),  # type: ignore[arg-type]
                   ancestors=ANCESTORS, descendants=DESCENDANTS)


GOOD = [
    ("inventory up", DataClass.INVENTORY, "S01-C001", inventory_payload("S01-C001", 3), "S01", None),
    ("discovery up", DataClass.DISCOVERY, "c9", {"client": "c9", "version": 1}, "S01", None),
    ("SCF up", DataClass.SCF, "S01", {"site": "S01", "version": 4, "settings": {}}, "S01", None),
    ("status up", DataClass.STATUS, "S02:17", {"site": "S02", "version": 17, "text": "hi"}, "S02", None),
    ("package down", DataClass.PACKAGE, "CEN00007", obj(), "CEN", None),
    ("deleted collection down", DataClass.COLLECTION, "CEN00009",
     obj("CEN00009", "collection", deleted=True), "CEN", None),
    ("site control down for us", DataClass.SITE_CONTROL, "P01:3", {"target": "P01", "delta_serial": 3,
                                                                   "settings": {"x": 1}}, "CEN", None),
    ("site control down for our child", DataClass.SITE_CONTROL, "S02:1", {"target": "S02", "delta_serial": 1},
     "CEN", None),
]


@pytest.mark.parametrize("cls, key, payload, source, origin", [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_what_the_hierarchy_sends_is_admitted(cls: DataClass, key: str, payload: dict[str, Any], source: str,
                                              origin: str | None) -> None:
    assert judged(cls, key, payload, source=source, origin=origin) is None


BAD = [
    # (what, class, key, payload, sender, origin, words of the reason)
    ("global data up", DataClass.PACKAGE, "S0100001", obj("S0100001", origin="S01"), "S01", "S01",
     "does not come up"),
    ("site data down", DataClass.INVENTORY, "c1", {"client": "c1", "version": 1}, "CEN", "CEN",
     "does not come down"),
    ("origin outside the child's subtree", DataClass.INVENTORY, "c1", {"client": "c1", "version": 1}, "S01", "S02",
     "not in S01's subtree"),
    ("origin above us, sent up", DataClass.SCF, "CEN", {"site": "CEN", "version": 1}, "S01", "CEN",
     "not in S01's subtree"),
    ("origin not an ancestor", DataClass.PACKAGE, "S0200001", obj("S0200001", origin="S02"), "CEN", "S02",
     "not an ancestor"),
    ("inventory of another client", DataClass.INVENTORY, "c1", {"client": "c2", "version": 1}, "S01", None,
     "client"),
    ("version true", DataClass.INVENTORY, "c1", {"client": "c1", "version": True}, "S01", None, "version"),
    ("version a string", DataClass.DISCOVERY, "c1", {"client": "c1", "version": "3"}, "S01", None, "version"),
    ("version 2**62", DataClass.INVENTORY, "c1", {"client": "c1", "version": 2**62}, "S01", None, "beyond"),
    ("version past the bound", DataClass.INVENTORY, "c1", {"client": "c1", "version": MAX_VERSION + 1}, "S01", None,
     "beyond"),
    ("negative version", DataClass.INVENTORY, "c1", {"client": "c1", "version": -1}, "S01", None, "version"),
    ("SCF of another site", DataClass.SCF, "S02", {"site": "S02", "version": 1}, "S01", "S01", "SCF"),
    ("SCF naming another site", DataClass.SCF, "S01", {"site": "S02", "version": 1}, "S01", None, "site"),
    ("status of another site", DataClass.STATUS, "S01:4", {"site": "S02", "version": 4}, "S01", None, "site"),
    ("status key not its serial", DataClass.STATUS, "S01:4", {"site": "S01", "version": 5}, "S01", None, "serial"),
    ("object ID not its key", DataClass.PACKAGE, "CEN00007", obj("CEN00008"), "CEN", None, "id"),
    ("object of another kind", DataClass.PACKAGE, "CEN00007", obj(kind="collection"), "CEN", None, "kind"),
    ("object of another origin", DataClass.PACKAGE, "CEN00007", obj(origin="P01"), "CEN", None, "origin"),
    ("object ID another site numbers", DataClass.PACKAGE, "P0100007", obj("P0100007"), "CEN", None, "numbers"),
    ("object revision 2**62", DataClass.PACKAGE, "CEN00007", obj(revision=2**62), "CEN", None, "revision"),
    ("object deleted 1", DataClass.PACKAGE, "CEN00007", obj(deleted=1), "CEN", None, "deleted"),
    ("object without a name", DataClass.PACKAGE, "CEN00007", {**obj(), "name": None}, "CEN", None, "name"),
    ("site control for a site elsewhere", DataClass.SITE_CONTROL, "P02:1", {"target": "P02", "delta_serial": 1},
     "CEN", None, "target"),
    ("site control key not its serial", DataClass.SITE_CONTROL, "P01:1", {"target": "P01", "delta_serial": 2},
     "CEN", None, "delta serial"),
    ("site control serial true", DataClass.SITE_CONTROL, "P01:1", {"target": "P01", "delta_serial": True},
     "CEN", None, "delta_serial"),
    ("site control settings a list", DataClass.SITE_CONTROL, "P01:1",
     {"target": "P01", "delta_serial": 1, "settings": [1]}, "CEN", None, "settings"),
]


@pytest.mark.parametrize("cls, key, payload, source, origin, words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_what_the_sender_could_not_have_sent_is_refused_with_a_reason(
        cls: DataClass, key: str, payload: dict[str, Any], source: str, origin: str | None, words: str) -> None:
    why = judged(cls, key, payload, source=source, origin=origin)
    assert why is not None and words in why, why
    assert f"from {source}" in why
