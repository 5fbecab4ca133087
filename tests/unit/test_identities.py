"""Per-site broker identities (issue 10 item 1): the receiver takes a message only when the
broker user that published it (its validated ``user_id``) is the site its packet names as
sender, and a control command only from the lab's controller. The rule (pure core), then real
site runtimes on the in-memory broker, whose deliveries carry the publisher's user as
RabbitMQ's do."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import names
from emulator.protocol import envelope as wire
from emulator.protocol.admission import Identities, sender_refusal
from emulator.protocol.envelope import DataClass, LinkAck, Packet, content_hash
from sites.clients import inventory_payload
from tests.unit.memsim import SimLab

IDS = Identities(sites={"CEN": "u-CEN", "P01": "u-P01"}, controller="u-ctl")


@pytest.mark.parametrize(("user", "sender", "refused"), [
    ("u-P01", "P01", None),
    ("u-CEN", "CEN", None),
    ("u-ctl", None, None),
    (None, "P01", "published by broker user None, not by P01 (u-P01)"),
    ("u-CEN", "P01", "published by broker user 'u-CEN', not by P01 (u-P01)"),
    ("u-ctl", "P01", "not by P01"),  # the controller relays with the sender's user_id, never its own
    ("u-P01", None, "a control command published by broker user 'u-P01', not by the controller"),
    ("u-P01", "P99", "P99, which is not a site of this lab"),
])
def test_the_sender_rule(user: str | None, sender: str | None, refused: str | None) -> None:
    why = sender_refusal(IDS, user_id=user, sender=sender)
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why and why.startswith("identity: ")


@pytest.mark.parametrize(("user", "cmd", "refused"), [
    ("u-ctl", "create", None),
    ("u-CEN", None, None),  # P01's parent: judged again once parsed
    ("u-CEN", "syncparent", None),  # Preinst /syncparent, passed down by the parent
    ("u-CEN", "create", "a 'create' command published by CEN (u-CEN): a parent passes down only syncparent"),
    ("u-P01", "syncparent", "not by the controller"),  # not its own parent
    (None, None, "not by the controller"),
])
def test_the_command_rule(user: str | None, cmd: str | None, refused: str | None) -> None:
    from emulator.protocol.admission import command_refusal

    why = command_refusal(IDS, user_id=user, parent="CEN", cmd=cmd)
    assert (why is None) if refused is None else (why is not None and refused in why)


def test_without_identities_nothing_is_refused_by_the_rule() -> None:
    assert sender_refusal(None, user_id=None, sender="P01") is None
    assert sender_refusal(None, user_id="anyone", sender=None) is None


def test_a_site_may_touch_only_its_own_queues_and_publish_only_to_the_lab_exchange() -> None:
    configure, write, read = names.site_permissions("t-1a2b3c", "P01")
    own = [names.site_queue("t-1a2b3c", "P01"), names.control_queue("t-1a2b3c", "P01")]
    others = [names.site_queue("t-1a2b3c", "P02"), names.control_queue("t-1a2b3c", "CEN"),
              names.dead_queue("t-1a2b3c"), names.relay_queue("t-1a2b3c", "P02", "CEN"), "amq.default",
              names.site_queue("t-1a2b3cd", "P01"), names.exchange("t-1a2b3c") + "x"]
    for name in own:
        assert all(re.search(p, name) for p in (configure, write, read)), name
    for name in others:
        assert not any(re.search(p, name) for p in (configure, write, read)), name
    ex = names.exchange("t-1a2b3c")
    assert re.search(write, ex) and re.search(read, ex) and not re.search(configure, ex)
    everything = names.controller_permissions("t-1a2b3c")[0]
    assert re.search(everything, ex) and re.search(everything, names.dead_queue("t-1a2b3c"))
    assert not re.search(everything, names.site_queue("t-other", "P01"))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[SimLab]:
    handle = SimLab(tmp_path, seed=5, identities=True)
    handle.start_all()
    try:
        handle.run(3)
        yield handle
    finally:
        handle.close()


def _inventory(lab: SimLab, seq: int) -> bytes:
    payload = inventory_payload("P01-FORGED", 1)
    return wire.encode_parts(lab.lab_id, "P01", "CEN", [wire.encode_envelope(
        source="P01", dest="CEN", incarnation=1, origin="P01", data_class=DataClass.INVENTORY, key="P01-FORGED",
        txn_id=10**6, link_seq=seq, op="upsert", hash_=content_hash(payload), payload=payload)])


def _dead(lab: SimLab) -> list[str]:
    return [d["reason"] for d in lab.broker.dead_letters(lab.lab_id)]


@pytest.mark.parametrize("user", [None, "P02", "CEN", "S01"], ids=["foreign", "as-P02", "as-CEN", "as-S01"])
def test_a_packet_published_by_another_user_than_its_sender_is_refused(lab: SimLab, user: str | None) -> None:
    """A perfectly plausible envelope of P01's, at the very number CEN expects next, published
    by anyone but P01: refused with its reason, dead-lettered, nothing applied, the link goes on."""
    cen = lab.sites["CEN"].runtime
    nxt = cen.links["P01"].next_expected
    forger = names.broker_user(lab.lab_id, user) if user else None
    assert lab.broker.publish(names.exchange(lab.lab_id), names.link_key("P01", "CEN"), _inventory(lab, nxt),
                              user_id=forger)
    lab.run_until("CEN to refuse it", lambda: cen.links["P01"].extra.get("refused_identity", 0) == 1)
    reasons = _dead(lab)
    assert len(reasons) == 1 and "identity: a packet from P01 published by broker user" in reasons[0], reasons
    assert not lab.query("CEN", "SELECT 1 FROM site_data WHERE key='P01-FORGED'")
    assert cen.links["P01"].conflicts == 0 and cen.links["P01"].extra.get("refused_input", 0) == 0
    lab.run_until("CEN to take P01's real envelope of that number", lambda: cen.links["P01"].next_expected > nxt)
    assert lab.query("CEN", "SELECT 1 FROM events WHERE kind='refused'")
    lab.settle()


def test_the_same_packet_from_the_senders_own_user_is_taken(lab: SimLab) -> None:
    """The other side of the rule: P01's credentials make it P01's; strict input judges it
    (a plausible record of its own client: taken)."""
    p01 = lab.sites["P01"].runtime
    assert lab.broker.publish(names.exchange(lab.lab_id), names.link_key("CEN", "P01"), wire.encode(Packet(
        lab=lab.lab_id, source="CEN", dest="P01", messages=[LinkAck(
            source="CEN", dest="P01", incarnation=1, through=p01.links["CEN"].sent_through + 500,
            sent_through=0)])), user_id=names.broker_user(lab.lab_id, "CEN"))
    lab.run_until("P01 to take it and refuse the ack by the strict rules",
                  lambda: p01.links["CEN"].extra.get("ack_ahead", 0) >= 1)
    assert p01.links["CEN"].extra.get("refused_identity", 0) == 0
    lab.settle()


def test_a_control_command_is_taken_only_from_the_controller(lab: SimLab) -> None:
    assert lab.control("P01", {"cmd": "ping"})["ok"]  # the harness publishes as the controller
    for user in (None, names.broker_user(lab.lab_id, "CEN"), names.broker_user(lab.lab_id, "P01")):
        assert lab.broker.publish(names.exchange(lab.lab_id), names.control_key("P01"),
                                  json.dumps({"cmd": "create", "kind": "package", "name": "forged"}).encode(),
                                  correlation_id=f"forged-{user}", user_id=user)
    lab.run_until("three refusals", lambda: len(_dead(lab)) == 3)
    assert sum("identity: a control command published by broker user" in r for r in _dead(lab)) == 2
    assert sum("a parent passes down only syncparent" in r for r in _dead(lab)) == 1  # CEN, P01's parent
    assert not lab.query("P01", "SELECT 1 FROM objects WHERE name='forged'")
    assert lab.control("P01", {"cmd": "ping"})["ok"], "the site goes on"
    lab.settle()


def test_a_parent_passes_syncparent_down_to_its_children(lab: SimLab) -> None:
    """Preinst /syncparent at P01 runs at S01 too: P01 publishes it to S01's control queue as
    itself, and S01 takes it from its parent (and nothing else but from the controller)."""
    s01 = lab.sites["S01"].runtime
    before = s01.links["P01"].sent_through
    assert lab.control("P01", {"cmd": "syncparent"})["children"] == ["S01"]
    lab.run_until("S01 to resend its site data up", lambda: s01.links["P01"].sent_through > before + 5)
    assert _dead(lab) == []
    lab.settle()
