"""Hardened mode's end-to-end signatures (issue 10, item 2).

The pure rules (``emulator.protocol.signing``) on hand-made records, then the real runtimes on
the simulator: what a site originates is signed, every ancestor verifies it also when it was
relayed, a forgery is refused with nothing lost, a recovered site signs with a new key and data
signed with the retired key is refused with its reason, and the Preinst key verbs re-pin by hand.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import names
from emulator.protocol import envelope as wire
from emulator.protocol import signing
from emulator.protocol.envelope import DataClass, Envelope, Packet, content_hash
from emulator.protocol.signing import Outcome, Pin, Signer
from sites import status_ids as sid
from sites.clients import inventory_payload
from tests.unit.memsim import SimLab, three_sites

ALICE = Signer(bytes(range(32)), inc=1)
ALICE2 = Signer(bytes(range(1, 33)), inc=2)
MALLORY = Signer(bytes(32), inc=1)


def record(signer: Signer = ALICE, origin: str = "S01", **changes: Any) -> dict[str, Any]:
    payload = signer.sign(origin, "inventory", "S01-C0001", "upsert", {"client": "S01-C0001", "version": 3})
    payload.update(changes)
    return payload


def judge(payload: dict[str, Any], pinned: Pin | None = None, neighbour: int | None = None,
          origin: str = "S01") -> signing.Check:
    return signing.check(origin, "inventory", "S01-C0001", "upsert", payload, pinned=pinned,
                         neighbour_incarnation=neighbour)


# -- the rules -----------------------------------------------------------------------------------

def test_a_signed_record_verifies_and_its_first_key_is_pinned() -> None:
    result = judge(record())
    assert result.outcome is Outcome.OK and result.pin == ALICE.pin and not result.rotated
    assert judge(record(), pinned=ALICE.pin) == signing.Check(Outcome.OK)


@pytest.mark.parametrize("tamper", [
    {"version": 4},  # the content changed after signing
    {"_sig": None},
    {"_sig": {"inc": 1, "pub": ALICE.pub}},
    {"_sig": {"inc": True, "pub": ALICE.pub, "sig": "AAAA"}},
    {"_sig": {"inc": 1, "pub": "not base64!", "sig": "AAAA"}},
])
def test_a_tampered_or_unsigned_record_is_forged(tamper: dict[str, Any]) -> None:
    payload = record(**tamper)
    assert judge(payload).outcome is Outcome.FORGED
    assert judge(payload, pinned=ALICE.pin).outcome is Outcome.FORGED


def test_a_record_signed_for_another_origin_does_not_verify() -> None:
    assert judge(record(origin="S02")).outcome is Outcome.FORGED


def test_a_second_key_for_the_same_incarnation_is_forged() -> None:
    result = judge(record(MALLORY), pinned=ALICE.pin)
    assert result.outcome is Outcome.FORGED and ALICE.pin.fingerprint in result.reason


def test_a_new_incarnations_key_is_pinned_and_the_old_one_retired() -> None:
    rotated = judge(record(ALICE2), pinned=ALICE.pin)
    assert rotated.outcome is Outcome.OK and rotated.pin == ALICE2.pin and rotated.rotated
    retired = judge(record(ALICE), pinned=ALICE2.pin)
    assert retired.outcome is Outcome.RETIRED and "incarnation 1" in retired.reason


def test_from_the_origin_itself_only_its_incarnation_on_the_link_is_taken() -> None:
    assert judge(record(ALICE2), pinned=ALICE.pin, neighbour=2).outcome is Outcome.OK
    assert judge(record(ALICE), pinned=ALICE.pin, neighbour=2).outcome is Outcome.FORGED  # a replay
    assert judge(record(ALICE2), pinned=ALICE.pin, neighbour=1).outcome is Outcome.FORGED  # not recovered


# -- on the simulator ----------------------------------------------------------------------------

@pytest.fixture
def lab(tmp_path: Path) -> Iterator[SimLab]:
    handle = SimLab(tmp_path, three_sites("hardened"), seed=5)
    handle.start_all()
    try:
        handle.run(4)
        yield handle
    finally:
        handle.close()


def pins(lab: SimLab, code: str) -> dict[str, tuple[int, str]]:
    return {s: (inc, pub) for s, inc, pub in lab.query(code, "SELECT site, inc, pub FROM site_keys")}


def own_pub(lab: SimLab, code: str) -> str:
    return str(lab.sites[code].runtime.signer().pub)


def test_every_ancestor_verifies_what_the_origin_signed_also_when_relayed(lab: SimLab) -> None:
    lab.run_until("S01's data at CEN", lambda: lab.query("CEN", "SELECT 1 FROM site_data WHERE origin='S01'"))
    assert pins(lab, "CEN")["S01"] == (1, own_pub(lab, "S01"))  # learned through P01
    assert pins(lab, "P01")["S01"] == (1, own_pub(lab, "S01"))
    assert pins(lab, "S01")["CEN"] == (1, own_pub(lab, "CEN"))  # objects come down signed
    rows = lab.query("CEN", "SELECT data_class, key, origin, payload FROM site_data WHERE origin='S01'")
    for cls, key, origin, payload in rows:
        assert signing.check(origin, cls, key, "upsert", json.loads(payload), pinned=Pin(1, own_pub(lab, "S01")),
                             neighbour_incarnation=None).outcome is Outcome.OK


def forge_next(lab: SimLab, sender: str, receiver: str, payload: dict[str, Any], origin: str) -> None:
    link = lab.link(receiver, sender)
    env = Envelope(source=sender, dest=receiver, incarnation=1, origin=origin, data_class=DataClass.INVENTORY,
                   key=payload["client"], priority=wire.priority_of(DataClass.INVENTORY), txn_id=10**9,
                   link_seq=link["next_expected"], hash=content_hash(payload), payload=payload)
    body = wire.encode(Packet(lab=lab.lab_id, source=sender, dest=receiver, messages=[env]))
    assert lab.broker.publish(names.exchange(lab.lab_id), names.link_key(sender, receiver), body)


def test_a_forged_record_relayed_in_a_neighbours_name_is_refused_and_nothing_is_lost(lab: SimLab) -> None:
    # A forger with broker access writes at P01->CEN's next number, as S01's client, with a key
    # of its own: CEN refuses the packet (the link does not move), the real envelope is taken.
    client = lab.query("S01", "SELECT key FROM site_data WHERE origin='S01' AND data_class='inventory'")[0][0]
    fake = MALLORY.sign("S01", "inventory", client, "upsert",
                        dict(inventory_payload(client, 10**6)))
    forge_next(lab, "P01", "CEN", fake, origin="S01")
    lab.run(3)
    assert lab.query("CEN", "SELECT version FROM site_data WHERE key=?", client)[0][0] < 10**6
    refused = [d["reason"] for d in lab.broker.dead_letters(lab.lab_id)]
    assert any("not S01's key" in r for r in refused), refused
    lab.settle()
    assert lab.violations() == []


def test_a_recovered_site_signs_with_a_new_key_and_the_retired_one_is_refused(lab: SimLab, tmp_path: Path) -> None:
    old = own_pub(lab, "S01")
    lab.kill("S01")
    lab.recover("S01", wipe=True)  # a secondary is reinstalled: its store (and key) start anew
    new = own_pub(lab, "S01")
    assert new != old and lab.sites["S01"].runtime.incarnation == 2
    lab.run_until("the new key pinned above", lambda: pins(lab, "CEN").get("S01") == (2, new)
                  and pins(lab, "P01").get("S01") == (2, new))
    assert sid.KEY_CHANGED in [m for (m,) in lab.query("CEN", "SELECT message_id FROM status_messages")]
    # P01 still holds S01 records of the old incarnation (its status messages: the wiped S01
    # has them no more): /syncparent relays them up, and CEN refuses them as retired
    held = lab.query("P01", "SELECT payload FROM site_data WHERE origin='S01'")
    assert any(json.loads(p)["_sig"]["inc"] == 1 for (p,) in held)
    assert lab.control("P01", {"cmd": "syncparent"})["ok"]
    lab.run_until("CEN refuses the retired key's data",
                  lambda: lab.query("CEN", "SELECT COUNT(*) FROM drops WHERE reason='retired_key'")[0][0] > 0)
    assert sid.KEY_RETIRED in [m for (m,) in lab.query("CEN", "SELECT message_id FROM status_messages")]
    lab.settle()
    assert lab.violations() == []


def test_the_key_verbs_pin_a_key_by_hand(lab: SimLab) -> None:
    key = lab.control("S01", {"cmd": "key"})
    assert key["ok"] and key["inc"] == 1 and key["pub"] == own_pub(lab, "S01")
    assert key["pins"]["CEN"]["fingerprint"] == signing.fingerprint(own_pub(lab, "CEN"))
    other = MALLORY.pub
    answer = lab.control("CEN", {"cmd": "trustkey", "site": "S01", "inc": 1, "pub": other})
    assert answer["ok"] and pins(lab, "CEN")["S01"] == (1, other)
    for bad in ("not a key", "A" * 44, ""):
        assert not lab.control("CEN", {"cmd": "trustkey", "site": "S01", "inc": 1, "pub": bad})["ok"]
    assert not lab.control("CEN", {"cmd": "trustkey", "site": "CEN", "inc": 1, "pub": other})["ok"]
    assert pins(lab, "CEN")["S01"] == (1, other)
    # CEN now refuses S01's real data as signed by another key, until the real key is pinned again
    lab.run(2)
    refused = [d["reason"] for d in lab.broker.dead_letters(lab.lab_id)]
    assert any("not S01's key" in r for r in refused), refused
    assert lab.control("CEN", {"cmd": "trustkey", "site": "S01", "inc": 1, "pub": key["pub"]})["ok"]
    assert pins(lab, "CEN")["S01"] == (1, key["pub"])
    lab.settle()
    assert lab.violations() == []


def test_an_sms20_lab_signs_nothing(tmp_path: Path) -> None:
    handle = SimLab(tmp_path, three_sites("sms20"), seed=5)
    handle.start_all()
    try:
        handle.run(3)
        rows = handle.query("CEN", "SELECT payload FROM site_data")
        assert rows and not any("_sig" in json.loads(p) for (p,) in rows)
        answer = handle.control("CEN", {"cmd": "key"})
        assert not answer["ok"] and "hardened" in answer["error"]
    finally:
        handle.close()
