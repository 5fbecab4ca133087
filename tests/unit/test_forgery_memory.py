"""Forged messages into a site's inbox, on the simulator (real runtimes and stores on the
in-memory broker and its virtual clock): each refused or counted as evidence, nothing lost,
the site never dies, the lab converges valid afterwards (issue 10, strict input).

The forger is a client of the broker that publishes to a link's routing key, as the real
neighbour does: without per-site identities nothing tells the two apart on the broker. With
them (the ``identities`` runs) the forger holds the real sender's credentials, so its messages
carry that site's validated ``user_id`` and only the strict-input rules stand in its way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import names
from emulator.protocol import envelope as wire
from emulator.protocol.envelope import (
    DataClass,
    LinkAck,
    Packet,
    RecoveryAnnounce,
    RecoveryComplete,
    RecoveryResync,
    ResendRequest,
    content_hash,
)
from emulator.topology import parse_topology
from sites import status_ids as sid
from sites.clients import inventory_payload
from tests.unit.memsim import TOPOLOGY, SimLab

PAUSE_TIMEOUT = 5.0


def topology(mode: str) -> Any:
    text = TOPOLOGY.format(mode=mode).replace("settings:\n", f"settings:\n  recovery_pause_timeout: {PAUSE_TIMEOUT}\n")
    return parse_topology(text, "forgery-topology.yaml")


@pytest.fixture(params=[("sms20", False), ("hardened", False), ("sms20", True), ("hardened", True)],
                ids=["sms20", "hardened", "sms20-identities", "hardened-identities"])
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SimLab]:
    mode, identities = request.param
    handle = SimLab(tmp_path, topology(mode), seed=11, identities=identities)
    handle.start_all()
    try:
        handle.run(3)
        yield handle
    finally:
        handle.close()


def forge(lab: SimLab, sender: str, receiver: str, *msgs: wire._Msg) -> None:
    body = wire.encode(Packet(lab=lab.lab_id, source=sender, dest=receiver, messages=list(msgs)))  # type: ignore[arg-type]
    forge_raw(lab, sender, receiver, body)


def forge_raw(lab: SimLab, sender: str, receiver: str, body: bytes) -> None:
    """As a foreign client, or (a lab with identities) as one holding ``sender``'s credentials."""
    user = names.broker_user(lab.lab_id, sender) if lab.identities else None
    assert lab.broker.publish(names.exchange(lab.lab_id), names.link_key(sender, receiver), body, user_id=user)


def runtime(lab: SimLab, code: str) -> Any:
    return lab.sites[code].runtime


def outbox(lab: SimLab, code: str, peer: str) -> int:
    return int(lab.query(code, "SELECT COUNT(*) FROM outbox WHERE peer=?", peer)[0][0])


def statuses(lab: SimLab, code: str) -> list[int]:
    return [m for (m,) in lab.query(code, "SELECT message_id FROM status_messages")]


def subtree_data(lab: SimLab, code: str, origins: tuple[str, ...]) -> set[tuple[str, str]]:
    marks = ",".join("?" * len(origins))
    return {(c, k) for c, k in lab.query(code, f"SELECT data_class, key FROM site_data WHERE origin IN ({marks})",
                                          *origins)}


def reasons(lab: SimLab) -> list[str]:
    return [d["reason"] for d in lab.broker.dead_letters(lab.lab_id)]


def test_a_forged_ack_far_past_what_was_sent_purges_nothing(lab: SimLab) -> None:
    lab.crash("CEN")  # P01's data for CEN piles up in its outbox
    lab.run(3)
    p01 = runtime(lab, "P01")
    link = p01.links["CEN"]
    held, acked = outbox(lab, "P01", "CEN"), link.acked_through
    assert held > 10
    forge(lab, "CEN", "P01", LinkAck(source="CEN", dest="P01", incarnation=link.their_incarnation,
                                     through=link.sent_through + 12_803, sent_through=link.applied_through))
    lab.run_until("P01 to refuse the ack", lambda: p01.links["CEN"].extra.get("ack_ahead", 0) >= 1)
    assert outbox(lab, "P01", "CEN") >= held and p01.links["CEN"].acked_through == acked
    assert p01.state == "active", "one forged ack is evidence, not a rollback"
    lab.start("CEN")
    lab.settle()  # the checker finds nothing lost
    assert lab.broker.errors == []


def test_a_forged_resend_request_for_what_was_never_sent_is_refused(lab: SimLab) -> None:
    cen = runtime(lab, "CEN")
    sent = cen.links["P01"].sent_through
    forge(lab, "P01", "CEN", ResendRequest(source="P01", dest="CEN", incarnation=1, from_seq=sent + 1000))
    lab.run_until("CEN to refuse the request", lambda: cen.links["P01"].extra.get("resend_refused", 0) == 1)
    assert cen.links["P01"].resend_unavailable == 0
    lab.settle()


def test_a_forged_announce_pauses_the_link_only_until_the_pause_times_out(lab: SimLab) -> None:
    cen = runtime(lab, "CEN")
    forge(lab, "P01", "CEN", RecoveryAnnounce(source="P01", dest="CEN", incarnation=1, recovery_id="forged-1",
                                              txn_id=1, next_send_seq=1, next_expected=1))
    lab.run_until("CEN to pause its link to P01", lambda: cen.links["P01"].paused)
    paused_at = lab.loop.now
    lab.run_until("the pause to time out", lambda: not cen.links["P01"].paused, timeout=4 * PAUSE_TIMEOUT)
    assert lab.loop.now - paused_at >= PAUSE_TIMEOUT - 1.0
    assert sid.PEER_RECOVERY_TIMEOUT in statuses(lab, "CEN")
    assert cen.links["P01"].extra["recovery_expired"] == 1
    # the same forged announce again no longer pauses the link
    forge(lab, "P01", "CEN", RecoveryAnnounce(source="P01", dest="CEN", incarnation=1, recovery_id="forged-1",
                                              txn_id=1, next_send_seq=1, next_expected=1))
    lab.run(2)
    assert not cen.links["P01"].paused
    lab.settle()


@pytest.mark.parametrize("with_announce", [True, False], ids=["announce and resync", "resync alone"])
def test_a_forged_resync_deletes_nothing_and_resets_nothing(lab: SimLab, with_announce: bool) -> None:
    cen = runtime(lab, "CEN")
    held = subtree_data(lab, "CEN", ("P01", "S01"))
    assert len(held) > 5
    if with_announce:
        forge(lab, "P01", "CEN", RecoveryAnnounce(source="P01", dest="CEN", incarnation=1, recovery_id="forged-2",
                                                  txn_id=1, next_send_seq=1, next_expected=1))
        lab.run_until("CEN to pause its link to P01", lambda: cen.links["P01"].paused)
    expected = cen.links["P01"].next_expected
    for challenge in ("", "0" * 16):
        forge(lab, "P01", "CEN", RecoveryResync(source="P01", dest="CEN", incarnation=99, recovery_id="forged-2",
                                                next_send_seq=1, next_expected=1, challenge=challenge))
    forge(lab, "P01", "CEN", RecoveryComplete(source="P01", dest="CEN", incarnation=99, recovery_id="forged-2"))
    lab.run_until("CEN to refuse the resyncs", lambda: cen.links["P01"].extra.get("recovery_refused", 0) >= 2)
    assert held <= subtree_data(lab, "CEN", ("P01", "S01")), "CEN reinitialized nothing"
    link = cen.links["P01"]
    assert link.next_expected >= expected and link.their_incarnation == 1 and link.paused == with_announce
    lab.run_until("the link to run again", lambda: not cen.links["P01"].paused, timeout=4 * PAUSE_TIMEOUT)
    lab.settle()
    assert held <= subtree_data(lab, "CEN", ("P01", "S01"))


def _inventory(lab: SimLab, *, seq: int, origin: str = "P01", client: str = "P01-X", key: str = "P01-X",
               version: Any = 1) -> bytes:
    payload = {**inventory_payload(client, 1), "version": version}
    msg = wire.encode_envelope(source="P01", dest="CEN", incarnation=1, origin=origin, data_class=DataClass.INVENTORY,
                               key=key, txn_id=10**6, link_seq=seq, op="upsert", hash_=content_hash(payload),
                               payload=payload)
    return wire.encode_parts(lab.lab_id, "P01", "CEN", [msg])


@pytest.mark.parametrize("spoil, words", [
    ({"origin": "XYZ"}, "not in P01's subtree"),
    ({"origin": "CEN"}, "not in P01's subtree"),
    ({"client": "P01-Y"}, "client"),
    ({"version": 2**62}, "beyond"),
    ({"version": True}, "not an integer"),
])
def test_a_forged_envelope_at_the_next_number_is_dead_lettered_and_the_real_one_taken(
        lab: SimLab, spoil: dict[str, Any], words: str) -> None:
    cen = runtime(lab, "CEN")
    link = cen.links["P01"]
    nxt, conflicts = link.next_expected, link.conflicts
    forge_raw(lab, "P01", "CEN", _inventory(lab, seq=nxt, **spoil))
    lab.run_until("the forgery to be dead-lettered", lambda: any(words in r for r in reasons(lab)))
    assert cen.links["P01"].extra["refused_input"] == 1
    assert not lab.query("CEN", "SELECT 1 FROM site_data WHERE key IN ('P01-X', 'P01-Y')")
    lab.run_until("the real envelope of that number", lambda: cen.links["P01"].next_expected > nxt)
    real = lab.query("CEN", "SELECT hash FROM applied WHERE source='P01' AND seq=?", nxt)
    assert real and real[0][0] != content_hash(inventory_payload("P01-X", 1))
    assert cen.links["P01"].conflicts == conflicts and not cen.links["P01"].quarantined
    lab.settle()


def test_a_link_seq_of_true_is_refused_and_never_quarantines_the_real_child(lab: SimLab) -> None:
    cen = runtime(lab, "CEN")
    body = _inventory(lab, seq=1).replace(b'"link_seq":1,', b'"link_seq":true,')
    assert b'"link_seq":true' in body
    forge_raw(lab, "P01", "CEN", body)
    lab.run_until("the forgery to be dead-lettered", lambda: any("link_seq" in r for r in reasons(lab)))
    lab.run(3)
    assert not cen.links["P01"].quarantined and cen.links["P01"].conflicts == 0
    lab.settle()


def test_a_huge_transaction_id_is_refused_and_poisons_no_watermark(lab: SimLab) -> None:
    nxt = runtime(lab, "CEN").links["P01"].next_expected
    body = _inventory(lab, seq=nxt).replace(b'"txn_id":1000000,', b'"txn_id":4611686018427387904,')
    forge_raw(lab, "P01", "CEN", body)
    lab.run_until("the forgery to be dead-lettered", lambda: any("txn_id" in r for r in reasons(lab)))
    assert lab.query("CEN", "SELECT MAX(txn) FROM watermark")[0][0] < wire.MAX_SEQ
    lab.settle()


def test_an_envelope_admitted_that_still_cannot_be_applied_is_consumed_recorded_and_dead_lettered(
        lab: SimLab, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug, not a forgery: admission cannot refuse it, so the link must not block on it."""
    cen = runtime(lab, "CEN")
    real = cen._apply_site_data
    seen: list[int] = []

    def broken(env: Any, now: float) -> int:
        if not seen:
            seen.append(env.link_seq)
            raise KeyError("a bug in applying")
        return int(real(env, now))

    monkeypatch.setattr(cen, "_apply_site_data", broken)
    lab.run_until("one envelope to be unappliable", lambda: bool(seen) and cen.links["P01"].next_expected > seen[0])
    assert cen.links["P01"].extra["unappliable"] == 1
    assert lab.query("CEN", "SELECT reason FROM drops WHERE source='P01' AND seq=?", seen[0]) == [("unappliable",)]
    lab.run_until("the dead letter", lambda: any("cannot apply" in r for r in reasons(lab)))
    lab.run(2)
    assert cen.links["P01"].next_expected > seen[0] + 3, "the link went on"
