"""Three real site runtimes (CEN, P01, S01) with their real SQLite and client stores, over the
in-memory broker, driven by its virtual clock: crashes, lost connections, lost, duplicated
and reordered messages, and the recovery handshake, each judged from the stores.

Every test runs tens of virtual seconds in well under a second of real time.
"""

from __future__ import annotations

import collections
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import names
from tests.unit.memsim import SimLab, data_from, seeded_uuid4

LINKS = [("CEN", "P01"), ("P01", "S01")]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[SimLab]:
    handle = SimLab(tmp_path, seed=7)
    handle.start_all()
    try:
        yield handle
    finally:
        handle.close()


def site_queue(lab: SimLab, code: str) -> str:
    return names.site_queue(lab.lab_id, code)


def assert_applied_once(lab: SimLab) -> None:
    """On every directed link the receiver consumed each sequence number exactly once
    (applied, or consumed as stale), 1 through what it expects next, and applied nothing
    it could not apply."""
    for parent, child in LINKS:
        for receiver, sender in ((parent, child), (child, parent)):
            through = lab.link(receiver, sender)["next_expected"] - 1
            applied = [s for (s,) in lab.query(receiver, "SELECT seq FROM applied WHERE source=?", sender)]
            stale = [s for (s,) in lab.query(
                receiver, "SELECT seq FROM drops WHERE source=? AND reason='stale'", sender)]
            assert sorted(applied + stale) == list(range(1, through + 1)), f"{sender}->{receiver}"
    for code in lab.topology.codes:
        assert not lab.query(code, "SELECT * FROM drops WHERE reason='unappliable'"), code
    assert lab.broker.dead_letters(lab.lab_id) == []
    assert lab.broker.errors == []


def counter(lab: SimLab, code: str, peer: str, name: str) -> int:
    return int(lab.link(code, peer)[name])


def versions_at(lab: SimLab, code: str, data_class: str, origin: str) -> dict[str, int]:
    return dict(lab.query(code, "SELECT key, version FROM site_data WHERE data_class=? AND origin=?",
                          data_class, origin))


def objects_of(lab: SimLab, code: str, origin: str) -> dict[str, tuple[str, int, int]]:
    rows = lab.query(code, "SELECT id, def_uid, revision, deleted FROM objects WHERE origin=?", origin)
    return {oid: (uid, rev, deleted) for oid, uid, rev, deleted in rows}


# -- the happy path -----------------------------------------------------------------------------


def test_data_flows_up_and_objects_flow_down(lab: SimLab) -> None:
    lab.run(8)
    # site data of both levels has reached the central site, objects of both levels S01
    assert versions_at(lab, "CEN", "inventory", "S01")
    assert versions_at(lab, "CEN", "inventory", "P01")
    assert objects_of(lab, "S01", "CEN") and objects_of(lab, "S01", "P01")
    assert int(lab.query("S01", "SELECT v FROM meta WHERE k='control_serial_processed'")[0][0]) > 0

    lab.settle()
    for code in ("P01", "S01"):  # the central site holds every client's latest report
        clients = lab.sites[code].clients
        assert clients is not None
        want = {c: inv for c, (inv, _) in clients.versions().items()}
        assert versions_at(lab, "CEN", "inventory", code) == want
        scf = lab.sites[code].runtime.scf_serial
        assert lab.query("CEN", "SELECT version FROM site_data WHERE data_class='scf' AND key=?", code) == [(scf,)]
    for owner in ("CEN", "P01"):  # every descendant holds exactly its ancestors' objects
        for below in lab.topology.subtree(owner)[1:]:
            assert objects_of(lab, below, owner) == objects_of(lab, owner, owner)
    assert_applied_once(lab)
    assert lab.broker.stats["redelivered"] == 0


def test_the_memory_broker_does_not_import_pika() -> None:
    code = "import sys, broker.memory; assert 'pika' not in sys.modules, 'pika imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr


# -- crashes and lost connections ---------------------------------------------------------------


def test_a_crashed_site_restarted_on_its_files_loses_nothing_and_applies_nothing_twice(lab: SimLab) -> None:
    lab.run(4)
    p01 = lab.sites["P01"]
    # Its acks stay on the wire: what P01 commits from now on is redelivered after the crash.
    p01.transport.hold_acks()
    lab.run(0.5)
    applied = {peer: counter(lab, "P01", peer, "next_expected") for peer in ("CEN", "S01")}
    dups = {peer: counter(lab, "P01", peer, "duplicates") for peer in ("CEN", "S01")}
    lab.crash("P01")
    requeued = lab.broker.stats["requeued"]
    assert requeued > 0
    lab.run(1.5)  # CEN and S01 go on; their envelopes wait in P01's queue
    assert lab.broker.depth(site_queue(lab, "P01")) > requeued

    lab.start("P01")  # a new process on the same store and client files
    lab.run(5)
    assert lab.broker.stats["redelivered"] >= requeued
    # the redelivered envelopes P01 had committed are recognized by their link sequence
    assert sum(counter(lab, "P01", p, "duplicates") - dups[p] for p in dups) > 0
    assert all(counter(lab, "P01", p, "next_expected") > applied[p] for p in applied)
    lab.settle()
    assert_applied_once(lab)


def test_after_a_lost_connection_the_site_reconnects_ticks_and_produces(lab: SimLab) -> None:
    lab.run(3)
    p01 = lab.sites["P01"]
    statuses = lab.query("P01", "SELECT COUNT(*) FROM status_messages")[0][0]
    before = max(versions_at(lab, "CEN", "inventory", "P01").values())
    p01.transport.hold_acks()
    lab.run(0.3)
    p01.transport.disconnect()
    assert not p01.transport.ready
    lab.run(0.1)  # the backoff: still down
    assert not p01.transport.ready and p01.transport.connects == 1
    lab.run(4)
    assert p01.transport.connects == 2 and p01.transport.ready
    assert lab.broker.stats["redelivered"] > 0
    assert lab.query("P01", "SELECT COUNT(*) FROM status_messages")[0][0] > statuses
    assert max(versions_at(lab, "CEN", "inventory", "P01").values()) > before

    # the broker closes it this time (rabbitmqctl close_connection), and is down for a while
    lab.broker.accepting = False
    assert lab.broker.disconnect(names.connection_name(lab.lab_id, "P01")) == 1
    lab.run(3)
    assert not p01.transport.ready and len(p01.transport.losses) >= 3  # retried with backoff
    lab.broker.accepting = True
    lab.run(6)
    assert p01.transport.connects == 3
    lab.settle()
    assert_applied_once(lab)


def test_a_site_stopped_gracefully_and_started_again_goes_on(lab: SimLab) -> None:
    lab.run(3)
    lab.stop("P01")  # its last acks reach the broker before its connection closes
    assert not lab.broker.queue(site_queue(lab, "P01")).consumers
    lab.run(2)
    lab.start("P01")
    lab.run(3)
    lab.settle()
    assert_applied_once(lab)


def test_a_connection_lost_between_a_delivery_and_its_flush_does_not_stall_the_site(lab: SimLab) -> None:
    lab.run(3)
    p01 = lab.sites["P01"]
    on_delivery = p01.runtime.on_delivery

    def deliver_then_lose_the_connection(delivery: object) -> None:
        on_delivery(delivery)  # type: ignore[arg-type]
        if p01.transport.connects == 1:
            p01.transport.disconnect()

    p01.runtime.on_delivery = deliver_then_lose_the_connection  # type: ignore[method-assign]
    lab.run(3)
    assert p01.transport.connects == 2
    assert lab.broker.queue(site_queue(lab, "P01")).unacked < 10, "P01 stopped acking its deliveries"
    lab.settle()


# -- messages lost, duplicated, reordered, refused ----------------------------------------------


def test_dropped_duplicated_reordered_and_nacked_messages_heal(lab: SimLab) -> None:
    lab.run(2)
    gaps_cen = counter(lab, "CEN", "P01", "gaps")
    faults = [
        lab.broker.drop(site_queue(lab, "CEN"), where=data_from("P01"), count=2),  # site data up
        lab.broker.drop(site_queue(lab, "S01"), where=data_from("P01")),  # objects down
        lab.broker.duplicate(site_queue(lab, "P01"), where=data_from("S01"), count=2),
        lab.broker.reorder(site_queue(lab, "S01"), where=data_from("P01")),
        lab.broker.nack(site_queue(lab, "CEN"), where=data_from("P01")),
    ]
    lab.run_until("every fault to happen", lambda: all(f.done for f in faults), timeout=15)
    lab.run(3)
    assert counter(lab, "CEN", "P01", "gaps") > gaps_cen  # the hole after a lost packet is seen
    assert counter(lab, "P01", "S01", "duplicates") > 0  # the duplicated packet is dropped
    assert counter(lab, "S01", "P01", "gaps") > 0
    lab.settle()
    assert_applied_once(lab)


def test_a_malformed_message_is_dead_lettered_and_the_site_goes_on(lab: SimLab) -> None:
    lab.run(1)
    assert lab.broker.publish(names.exchange(lab.lab_id), names.site_key("CEN"), b"not a packet")
    lab.run(2)
    (dead,) = lab.broker.dead_letters(lab.lab_id)
    assert dead["site"] == "CEN" and dead["body"] == "not a packet" and "malformed" in dead["reason"]
    lab.broker.get(names.dead_queue(lab.lab_id))
    lab.settle()
    assert_applied_once(lab)


def test_a_command_sent_twice_runs_once(lab: SimLab) -> None:
    lab.run(1)
    first = lab.control("P01", {"cmd": "create", "kind": "package", "name": "Office"}, request_id="r-1")
    again = lab.control("P01", {"cmd": "create", "kind": "package", "name": "Office"}, request_id="r-1")
    assert first["ok"] and again == first
    assert lab.query("P01", "SELECT COUNT(*) FROM objects WHERE name='Office'") == [(1,)]
    lab.run_until("S01 to hold Office",
                  lambda: lab.query("S01", "SELECT id FROM objects WHERE name='Office'"), timeout=5)


# -- determinism --------------------------------------------------------------------------------


def _scenario(root: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> tuple[object, str]:
    # Object definition IDs come from uuid.uuid4 in SiteRuntime.create_object: seeded here.
    monkeypatch.setattr(uuid, "uuid4", seeded_uuid4(seed))
    lab = SimLab(root, seed=seed)
    lab.start_all()
    try:
        lab.run(2)
        lab.broker.drop(site_queue(lab, "CEN"), where=data_from("P01"))
        lab.broker.reorder(site_queue(lab, "S01"), where=data_from("P01"))
        lab.run(2)
        lab.sites["S01"].transport.disconnect()
        lab.run(3)
        return lab.snapshot(), lab.broker.trace_digest()
    finally:
        lab.close()


def test_a_seed_replays_the_same_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, first_trace = _scenario(tmp_path / "a", 11, monkeypatch)
    second, second_trace = _scenario(tmp_path / "b", 11, monkeypatch)
    assert first_trace == second_trace
    assert first == second
    _, other_trace = _scenario(tmp_path / "c", 12, monkeypatch)
    assert other_trace != first_trace  # another seed, another interleaving


# -- restore and the recovery handshake ---------------------------------------------------------


def test_restored_without_recovery_breaks_then_the_recovery_handshake_converges(
        lab: SimLab, tmp_path: Path) -> None:
    lab.run(4)
    backup = lab.backup("P01", tmp_path / "backups" / "P01" / "site.db")
    # made after the backup and acknowledged downstream: must survive the recovery
    office = lab.control("P01", {"cmd": "create", "kind": "package", "name": "Office"})["object"]
    lab.run_until("S01 to hold Office", lambda: lab.query("S01", "SELECT 1 FROM objects WHERE id=?", office["id"]))
    lab.run(4)

    # restored without recovery (the failure): CEN silently drops P01's reused numbers
    lab.crash("P01")
    lab.restore("P01", backup)
    lab.start("P01")
    lab.run_until("CEN to drop P01's reused numbers", lambda: counter(lab, "CEN", "P01", "conflicts") > 0)
    lab.run(4)
    kinds = {v.kind for v in lab.violations()}
    assert "link" in kinds, kinds

    # the recovery agent: the backup again, then the handshake under the reused code
    lab.crash("P01")
    lab.restore("P01", backup)
    lab.start("P01", recover="rec-0001")
    lab.run_until("the recovery to complete",
                  lambda: lab.query("P01", "SELECT v FROM meta WHERE k='recovery_phase'") == [("complete",)])
    lab.settle()
    assert lab.sites["P01"].runtime.state == "active"
    assert lab.sites["P01"].runtime.incarnation > 1
    for code in ("P01", "S01"):
        assert objects_of(lab, code, "P01")[office["id"]][0] == office["def_uid"], code
    assert lab.broker.dead_letters(lab.lab_id) == []
    assert lab.broker.errors == []


def test_a_deleted_inbox_is_declared_again_and_nothing_is_lost(lab: SimLab) -> None:
    lab.run(3)
    lab.broker.delete_queue(site_queue(lab, "P01"))
    assert site_queue(lab, "P01") not in lab.broker.queues
    lab.run(5)
    assert site_queue(lab, "P01") in lab.broker.queues, "P01 declared its inbox again"
    assert lab.query("P01", "SELECT COUNT(*) FROM status_messages WHERE message_id=5400") == [(1,)]
    lab.settle()
    assert_applied_once(lab)


def test_a_bad_control_command_is_refused_and_a_timer_error_never_ends_the_site(lab: SimLab) -> None:
    lab.run(2)
    answer = lab.control("P01", {"cmd": "burst", "count": 5, "keys": 0})
    assert answer["ok"] is False and "keys" in answer["error"]
    runtime = lab.sites["P01"].runtime
    calls = {"n": 0}

    def boom() -> None:
        calls["n"] += 1
        with runtime.transaction():
            runtime.txn_id += 1000  # in memory and in the store: both undone
            raise RuntimeError("a bug in a timer")

    before = runtime.store.get_int("txn_id")
    runtime.later(0, boom)
    lab.run(1)
    assert calls["n"] == 1
    assert runtime.txn_id < before + 1000 and runtime.store.get_int("txn_id") < before + 1000
    lab.settle()
    assert_applied_once(lab)


def test_a_quiet_lab_heartbeats_every_idle_heartbeat_and_a_busy_one_every_sync_interval(lab: SimLab) -> None:
    """Heartbeats tell a peer what it does not know yet: every sync interval (0.3 s here)
    while the two sides of a link disagree, every ``idle_heartbeat`` (5 s) once both have
    acknowledged all the other sent. A quiet lab stays quiet, and no link goes silent."""
    lab.settle()
    beats: collections.Counter[str] = collections.Counter()
    route = lab.broker._route

    def counting(exchange: str, key: str, msg: Any) -> str:
        if b'"kind":"ack"' in msg.body and b'"kind":"data"' not in msg.body:
            beats[key] += 1
        return route(exchange, key, msg)

    lab.broker._route = counting  # type: ignore[method-assign]
    lab.run(30.0)  # 100 sync intervals
    directed = [names.link_key(a, b) for x, y in LINKS for a, b in ((x, y), (y, x))]
    assert set(beats) == set(directed), beats
    assert all(3 <= beats[k] <= 12 for k in directed), beats  # 30 s / 5 s, give or take the first
    beats.clear()
    assert lab.control("P01", {"cmd": "resume-workload"})["ok"]
    lab.run(10.0)
    assert beats[names.link_key("CEN", "P01")] >= 20, beats  # P01's data keeps CEN acking each tick
    lab.pause()
    lab.settle()
    lab.run(10.0)  # quiet again
    lab.crash("S01")
    lab.start("S01")  # its parent answers its first ack at once, not at its next keepalive
    lab.run_until("P01 to answer S01's fresh process",
                  lambda: "P01" in lab.sites["S01"].runtime.heard_from, timeout=3 * 0.3 + 0.1)


def test_a_bursts_synthetic_clients_keep_their_versions_and_the_checker_knows_what_they_produced(
        lab: SimLab) -> None:
    """A burst's clients are clients: their versions live in ``clients.db`` (never rolled back
    with the site), a second burst makes newer versions, and a record held above what its
    client produced is ``invented``."""
    from sites.clients import read_client_versions

    for _ in range(2):
        assert lab.control("P01", {"cmd": "burst", "count": 60, "keys": 20})["ok"]
        lab.run(2.0)
    lab.settle()
    made = {c: v for c, (v, _) in read_client_versions(lab.dir.clients_db("P01")).items() if "-B" in c}
    assert made == {f"P01-B{i:05d}": 6 for i in range(20)}  # 3 each time, the second burst on from 3
    assert versions_at(lab, "CEN", "inventory", "P01")["P01-B00007"] == 6
    lab.crash("CEN")
    db = sqlite3.connect(lab.dir.site_db("CEN"))
    with db:
        db.execute("UPDATE site_data SET version=9 WHERE data_class='inventory' AND key='P01-B00007'")
    db.close()
    lab.start("CEN")
    invented = [v for v in lab.check().violations if v.kind == "invented"]
    assert [(v.site, v.data["key"], v.data["held"], v.data["produced"]) for v in invented] == [
        ("CEN", "P01-B00007", 9, 6)]
