"""Forgeries published with pika into a running lab's site inboxes (issue 10): a client with
broker access publishes to a link's routing key, as the real neighbour does. Each forgery is
refused or counted, and nothing is lost: asserted on the site stores, the checker's verdict
and the lab's dead-letter queue, waiting on conditions with deadlines.

On a lab with per-site identities (the default where the broker's users can be managed) the
forger holds the real sender's credentials: its messages carry that site's validated
``user_id``, so only the strict-input rules stand between them and the receiver's data. The
``unauthenticated`` runs (``SMSLAB_IDENTITIES=off``) are a foreign client of the broker.
"""

from __future__ import annotations

import json
from typing import Any

import pika
import pytest

from broker import admin, names
from emulator import identities
from emulator.protocol import envelope as wire
from emulator.protocol.envelope import (
    DataClass,
    LinkAck,
    Packet,
    RecoveryAnnounce,
    RecoveryResync,
    content_hash,
)
from emulator.testing import DEMO_SITES, Lab, topology_yaml, wait_for
from sites import status_ids as sid
from sites.clients import inventory_payload

pytestmark = pytest.mark.integration

PAUSE_TIMEOUT = 4.0
SETTINGS = {"degraded_after": 4, "failed_after": 8, "recovery_pause_timeout": PAUSE_TIMEOUT}
SUBTREE = [DEMO_SITES[0], DEMO_SITES[1], DEMO_SITES[3]]  # CEN, P01 and its secondary S01


# The default run forges into labs with identities; the same forgeries into unauthenticated labs
# (the strict-input rules alone) are in the slow suite (.ci/run runs it), and on the simulator
# both run in tests/unit/test_forgery_memory.py.
@pytest.fixture(params=["identities", pytest.param("unauthenticated", marks=pytest.mark.slow)])
def lab(request: pytest.FixtureRequest, lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Lab:
    if request.param == "unauthenticated":
        monkeypatch.setenv(identities.OFF_ENV, "off")
    return lab


def publish(lab: Lab, sender: str, receiver: str, *bodies: bytes) -> None:
    """Publish to the routing key of the link ``sender`` -> ``receiver``: with ``sender``'s own
    credentials on a lab with identities, else as a foreign client."""
    url = lab.site_url(sender)
    with admin.blocking(url, name="forger") as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        for body in bodies:
            ch.basic_publish(names.exchange(lab.lab_id), names.link_key(sender, receiver), body,
                             pika.BasicProperties(delivery_mode=2, user_id=admin.login_user(url)), mandatory=True)


def packet(lab: Lab, sender: str, receiver: str, *msgs: Any) -> bytes:
    return wire.encode(Packet(lab=lab.lab_id, source=sender, dest=receiver, messages=list(msgs)))


def records(lab: Lab, site: str, origins: tuple[str, ...]) -> set[tuple[str, str]]:
    marks = ",".join("?" * len(origins))
    return {(c, k) for c, k in lab.query(site, f"SELECT data_class, key FROM site_data WHERE origin IN ({marks})",
                                         *origins)}


def outbox(lab: Lab, site: str, peer: str) -> int:
    return int(lab.query(site, "SELECT COUNT(*) FROM outbox WHERE peer=?", peer)[0][0])


def dead_reasons(lab: Lab) -> list[str]:
    return [json.loads(d["body"])["reason"] for d in admin.dead_letters(lab.url, lab.lab_id)]


@pytest.mark.parametrize("mode", ["sms20", "hardened"])
def test_a_forged_ack_far_past_what_was_sent_purges_nothing(lab: Lab, mode: str) -> None:
    """main lost 12,803 of 20,000 records this way, and the link failed for good."""
    lab.up(topology_yaml(DEMO_SITES[:2], settings=SETTINGS, mode=mode))
    lab.cli("stop", "CEN")
    assert lab.control("P01", {"cmd": "burst", "count": 3000, "keys": 3000, "chunk": 500})["ok"]
    wait_for("P01's burst to wait in its outbox", lambda: outbox(lab, "P01", "CEN") >= 3000, timeout=60)
    link = lab.link("P01", "CEN")
    held = outbox(lab, "P01", "CEN")
    publish(lab, "CEN", "P01", packet(lab, "CEN", "P01", LinkAck(
        source="CEN", dest="P01", incarnation=1, through=link["next_send_seq"] - 1 + 12_803,
        sent_through=link["next_expected"] - 1)))
    wait_for("P01 to refuse the ack", lambda: lab.link("P01", "CEN")["extra"].get("ack_ahead", 0) >= 1, timeout=20)
    assert outbox(lab, "P01", "CEN") >= held, "nothing purged"
    assert lab.link("P01", "CEN")["acked_through"] == link["acked_through"]
    assert lab.meta("P01", "state") == "active", "one forged ack is evidence, not a rollback"
    lab.cli("start", "CEN")
    report = lab.wait_converged(timeout=120)
    assert report.verdict == "valid", report.render()
    burst = lab.query("CEN", "SELECT COUNT(*) FROM site_data WHERE key LIKE 'P01-B%'")[0][0]
    assert burst == 3000, f"CEN holds {burst} of P01's 3,000 records"
    assert dead_reasons(lab) == []


def test_a_forged_announce_pauses_the_link_only_until_it_times_out(lab: Lab) -> None:
    """main paused the parent's link for good (persisted, no timeout)."""
    lab.up(topology_yaml(DEMO_SITES[:2], settings=SETTINGS))
    wait_for("traffic from P01", lambda: lab.link("CEN", "P01")["next_expected"] > 5)
    publish(lab, "P01", "CEN", packet(lab, "P01", "CEN", RecoveryAnnounce(
        source="P01", dest="CEN", incarnation=1, recovery_id="forged-announce", txn_id=1, next_send_seq=1,
        next_expected=1)))
    wait_for("CEN to pause its link to P01", lambda: lab.link("CEN", "P01")["paused"], timeout=20)
    wait_for("the pause to time out", lambda: not lab.link("CEN", "P01")["paused"], timeout=10 * PAUSE_TIMEOUT)
    assert lab.query("CEN", "SELECT COUNT(*) FROM status_messages WHERE message_id=?",
                     sid.PEER_RECOVERY_TIMEOUT)[0][0] == 1
    before = lab.link("CEN", "P01")["next_expected"]
    wait_for("CEN to apply P01's data again", lambda: lab.link("CEN", "P01")["next_expected"] > before + 3,
             timeout=30)
    report = lab.wait_converged(timeout=90)
    assert report.verdict == "valid", report.render()


@pytest.mark.parametrize("mode", ["sms20", "hardened"])
def test_a_forged_announce_and_resync_delete_nothing_at_the_parent(lab: Lab, mode: str) -> None:
    """main deleted the subtree's data at the parent (3,001 records lost)."""
    lab.up(topology_yaml(SUBTREE, settings=SETTINGS, mode=mode))
    wait_for("S01's data at CEN", lambda: len(records(lab, "CEN", ("S01",))) > 3, timeout=30)
    held = records(lab, "CEN", ("P01", "S01"))
    publish(lab, "P01", "CEN", packet(lab, "P01", "CEN", RecoveryAnnounce(
        source="P01", dest="CEN", incarnation=1, recovery_id="forged-resync", txn_id=1, next_send_seq=1,
        next_expected=1)))
    wait_for("CEN to pause its link to P01", lambda: lab.link("CEN", "P01")["paused"], timeout=20)
    expected = lab.link("CEN", "P01")["next_expected"]
    publish(lab, "P01", "CEN", *[packet(lab, "P01", "CEN", RecoveryResync(
        source="P01", dest="CEN", incarnation=99, recovery_id="forged-resync", next_send_seq=1, next_expected=1,
        challenge=guess)) for guess in ("", "0123456789abcdef")])
    wait_for("CEN to refuse both resyncs", lambda: lab.link("CEN", "P01")["extra"].get("recovery_refused", 0) >= 2,
             timeout=20)
    link = lab.link("CEN", "P01")
    assert link["their_incarnation"] == 1 and link["next_expected"] >= expected, "the link was not reset"
    assert held <= records(lab, "CEN", ("P01", "S01")), "CEN reinitialized nothing"
    wait_for("the pause to time out", lambda: not lab.link("CEN", "P01")["paused"], timeout=10 * PAUSE_TIMEOUT)
    report = lab.wait_converged(timeout=90)
    assert report.verdict == "valid", report.render()
    assert held <= records(lab, "CEN", ("P01", "S01"))
    assert dead_reasons(lab) == []


def test_a_forged_envelope_from_outside_the_subtree_is_dead_lettered_with_its_reason(lab: Lab) -> None:
    lab.up(topology_yaml(DEMO_SITES[:2], settings=SETTINGS, mode="hardened"))
    wait_for("traffic from P01", lambda: lab.link("CEN", "P01")["next_expected"] > 5)
    nxt = lab.link("CEN", "P01")["next_expected"]
    payload = inventory_payload("P01-FORGED", 1)
    forged = wire.encode_envelope(source="P01", dest="CEN", incarnation=1, origin="P02", data_class=DataClass.INVENTORY,
                                  key="P01-FORGED", txn_id=2**40, link_seq=nxt, op="upsert",
                                  hash_=content_hash(payload), payload=payload)
    true_seq = forged.replace(b'"origin":"P02"', b'"origin":"P01"').replace(f'"link_seq":{nxt}'.encode(),
                                                                            b'"link_seq":true')
    publish(lab, "P01", "CEN", wire.encode_parts(lab.lab_id, "P01", "CEN", [forged]),
            wire.encode_parts(lab.lab_id, "P01", "CEN", [true_seq]))
    reasons = wait_for("two dead letters", lambda: (r := dead_reasons(lab)) and len(r) >= 2 and r, timeout=20)
    assert any("not in P01's subtree" in r for r in reasons), reasons
    assert any("link_seq" in r for r in reasons), reasons
    assert not lab.query("CEN", "SELECT 1 FROM site_data WHERE key='P01-FORGED'")
    wait_for("CEN to take P01's real envelope of that number", lambda: lab.link("CEN", "P01")["next_expected"] > nxt)
    link = lab.link("CEN", "P01")
    assert not link["quarantined"] and link["conflicts"] == 0 and link["extra"]["refused_input"] >= 1
    report = lab.wait_converged(timeout=90)
    assert report.verdict == "valid", report.render()
