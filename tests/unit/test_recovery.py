"""The recovery handshake's pure core (``emulator.protocol.recovery``), driven without a broker.

Three parts:
- ``plan_counters``: every counter moves past everything any peer has seen, once;
- the agent: the phase table, announcing, collecting reports, resync marks, persistence;
- a two-sided in-memory simulation: a restored site with a parent and two children whose
  links are ahead of it, healed by the handshake as ``sites/recovery.py`` applies it, judged
  envelope by envelope with ``emulator.protocol.sequencing``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from emulator.errors import LocalProtocolError
from emulator.protocol.envelope import Envelope, LinkAck, RecoveryReport, RecoveryResync
from emulator.protocol.recovery import (
    TRANSITIONS,
    CounterPlan,
    LinkPlan,
    OwnCounters,
    Phase,
    RecoveryAgent,
    accept_resync,
    left_to_children,
    peer_report,
    plan_counters,
    reset_link_to_plan,
)
from emulator.protocol.sequencing import (
    AckOutcome,
    LinkState,
    Verdict,
    judge,
    on_ack,
    record,
)
from tests.unit.helpers import envelope

RID = "rec-0001"
SITE = "PR1"  # the recovering site
PARENT = "CEN"
CHILDREN = ("SE1", "SE2")
PEERS = [PARENT, *CHILDREN]
MARGIN = 20


def obj(number: int, revision: int, *, site: str = SITE, def_uid: str | None = None) -> dict[str, Any]:
    """One of ``site``'s own global objects, as a child holds it."""
    oid = f"{site}{number:05d}"
    return {"id": oid, "kind": "package", "origin": site, "revision": revision,
            "def_uid": def_uid or f"uid-{oid}", "deleted": False, "name": f"pkg {number} r{revision}"}


def report(
    peer: str,
    *,
    recovery_id: str = RID,
    site: str = SITE,
    incarnation: int = 1,
    next_expected: int = 1,
    last_sent: int = 0,
    txn_watermark: int = 0,
    max_object: int = 0,
    scf_serial: int = 0,
    control_serial: int = 0,
    objects: list[dict[str, Any]] | None = None,
) -> RecoveryReport:
    return RecoveryReport(
        source=peer, dest=site, incarnation=incarnation, recovery_id=recovery_id,
        next_expected=next_expected, last_sent=last_sent, txn_watermark=txn_watermark,
        max_object_ids={"object": max_object}, scf_serial=scf_serial,
        control_serial=control_serial, objects=objects or [],
    )


def own(**fields: Any) -> OwnCounters:
    base: dict[str, Any] = {"txn_id": 100, "incarnation": 1, "object_next": 5, "scf_serial": 3,
                            "control_sent": {"SE1": 2, "SE2": 2}}
    base.update(fields)
    return OwnCounters(**base)


def three_reports() -> dict[str, RecoveryReport]:
    return {
        PARENT: report(PARENT, incarnation=1, next_expected=44, last_sent=57, txn_watermark=410,
                       max_object=0, scf_serial=9),
        "SE1": report("SE1", incarnation=3, next_expected=73, last_sent=18, txn_watermark=405,
                      max_object=14, scf_serial=0, control_serial=6,
                      objects=[obj(3, 2), obj(14, 1), obj(7, 4)]),
        "SE2": report("SE2", incarnation=2, next_expected=66, last_sent=6, txn_watermark=398,
                      max_object=12, scf_serial=8, control_serial=1,
                      objects=[obj(3, 5), obj(12, 1), obj(7, 4, def_uid="uid-other")]),
    }


# -- plan_counters ----------------------------------------------------------------------------


def test_plan_moves_every_counter_past_every_peer() -> None:
    plan = plan_counters(own(control_sent={"SE1": 2, "SE2": 2}), three_reports(), margin=MARGIN)
    assert plan.txn_id == 410 + MARGIN  # the parent's watermark is the highest
    assert plan.incarnation == 2
    assert plan.object_next == 15  # SE1 has seen object 14
    assert plan.scf_serial == 9
    assert plan.control_sent["SE1"] == 6
    assert plan.control_sent["SE2"] == 2  # own (2) is above what SE2 processed (1)
    assert plan.links == {
        PARENT: LinkPlan(PARENT, next_send_seq=44, next_expected=58, their_incarnation=1),
        "SE1": LinkPlan("SE1", next_send_seq=73, next_expected=19, their_incarnation=3),
        "SE2": LinkPlan("SE2", next_send_seq=66, next_expected=7, their_incarnation=2),
    }


@pytest.mark.parametrize(
    ("own_txn", "watermarks", "margin", "expected"),
    [
        pytest.param(100, [410, 405, 398], 20, 430, id="a peer is highest"),
        pytest.param(100, [10, 410, 11], 20, 430, id="the highest is not the first"),
        pytest.param(500, [410, 405, 398], 20, 520, id="own is highest: still plus the margin"),
        pytest.param(410, [410, 405, 398], 20, 430, id="own ties the highest peer"),
        pytest.param(100, [410, 405, 398], 1, 411, id="margin 1"),
        pytest.param(100, [410, 405, 398], 1000, 1410, id="margin 1000"),
        pytest.param(0, [0, 0, 0], 20, 20, id="nobody has seen a transaction"),
    ],
)
def test_plan_txn_id_is_the_maximum_plus_the_margin(
    own_txn: int, watermarks: list[int], margin: int, expected: int
) -> None:
    reports = {p: report(p, txn_watermark=w) for p, w in zip(PEERS, watermarks)}
    plan = plan_counters(own(txn_id=own_txn), reports, margin=margin)
    assert plan.txn_id == expected
    assert plan.txn_id > max([own_txn, *watermarks])  # never reuse a number


@pytest.mark.parametrize(
    ("own_next", "seen", "expected"),
    [
        pytest.param(5, [0, 14, 12], 15, id="a child has seen more"),
        pytest.param(40, [0, 14, 12], 40, id="own allocator is already past"),
        pytest.param(15, [0, 14, 12], 15, id="own next is exactly past the highest seen"),
        pytest.param(14, [0, 14, 12], 15, id="own next would reuse the highest seen"),
        pytest.param(1, [0, 0, 0], 1, id="no objects anywhere"),
    ],
)
def test_plan_object_allocator_moves_past_every_seen_number(
    own_next: int, seen: list[int], expected: int
) -> None:
    reports = {p: report(p, max_object=n) for p, n in zip(PEERS, seen)}
    assert plan_counters(own(object_next=own_next), reports, margin=MARGIN).object_next == expected


@pytest.mark.parametrize(
    ("own_scf", "seen", "expected"),
    [(3, [9, 0, 8], 9), (12, [9, 0, 8], 12), (0, [0, 0, 0], 0), (0, [0, 0, 4], 4)],
)
def test_plan_scf_serial_is_the_maximum(own_scf: int, seen: list[int], expected: int) -> None:
    reports = {p: report(p, scf_serial=s) for p, s in zip(PEERS, seen)}
    assert plan_counters(own(scf_serial=own_scf), reports, margin=MARGIN).scf_serial == expected


def test_plan_control_serial_per_child() -> None:
    reports = three_reports()
    plan = plan_counters(own(control_sent={"SE1": 9, "SE2": 0}), reports, margin=MARGIN)
    assert plan.control_sent["SE1"] == 9  # own wins
    assert plan.control_sent["SE2"] == 1  # the child's wins
    # a child the restored site had no record of (the backup predates it) still gets one
    plan = plan_counters(own(control_sent={}), reports, margin=MARGIN)
    assert plan.control_sent["SE1"] == 6
    assert plan.control_sent["SE2"] == 1


def test_plan_incarnation_is_bumped_exactly_once() -> None:
    reports = three_reports()
    for inc in (0, 1, 2, 7):
        plans = [plan_counters(own(incarnation=inc), reports, margin=MARGIN) for _ in range(3)]
        assert {p.incarnation for p in plans} == {inc + 1}
        assert plans[0] == plans[1] == plans[2]  # pure: the same inputs give the same plan
    # the peers' own incarnations are theirs, not ours: they do not move our incarnation
    assert plan_counters(own(incarnation=1), reports, margin=MARGIN).incarnation == 2


def test_plan_link_sequences_come_from_each_peer() -> None:
    reports = {
        PARENT: report(PARENT, incarnation=4, next_expected=1, last_sent=0),
        "SE1": report("SE1", incarnation=1, next_expected=1000, last_sent=999),
    }
    plan = plan_counters(own(), reports, margin=MARGIN)
    assert plan.links[PARENT] == LinkPlan(PARENT, 1, 1, 4)
    assert plan.links["SE1"] == LinkPlan("SE1", 1000, 1000, 1)
    assert set(plan.links) == set(reports)


def test_plan_adopts_the_highest_revision_of_each_object() -> None:
    plan = plan_counters(own(), three_reports(), margin=MARGIN)
    by_id = {o["id"]: o for o in plan.adopt}
    assert list(by_id) == sorted(by_id)  # sorted by ID
    assert set(by_id) == {"PR100003", "PR100007", "PR100012", "PR100014"}
    assert by_id["PR100003"]["revision"] == 5  # SE2's revision 5 beats SE1's 2
    assert by_id["PR100014"] == obj(14, 1)
    assert by_id["PR100012"] == obj(12, 1)
    # equal revisions: one of them, whole (never a mix of two definitions)
    assert by_id["PR100007"] in (obj(7, 4), obj(7, 4, def_uid="uid-other"))


def test_plan_adopts_the_highest_revision_whatever_the_report_order() -> None:
    reports = three_reports()
    reversed_reports = dict(reversed(list(reports.items())))
    a = plan_counters(own(), reports, margin=MARGIN)
    b = plan_counters(own(), reversed_reports, margin=MARGIN)
    assert a == b


def test_plan_with_a_reference_adopts_only_its_objects_but_counts_every_report() -> None:
    reports = three_reports()
    plan = plan_counters(own(), reports, margin=MARGIN, reference="SE1")
    assert [o["id"] for o in plan.adopt] == ["PR100003", "PR100007", "PR100014"]
    assert {o["id"]: o["revision"] for o in plan.adopt}["PR100003"] == 2  # SE1's, not SE2's 5
    assert plan.adopt == sorted(reports["SE1"].objects, key=lambda o: o["id"])
    full = plan_counters(own(), reports, margin=MARGIN)
    # the counters are the same as without a reference: every report counts
    assert replace(plan, adopt=[]) == replace(full, adopt=[])
    assert plan.txn_id == 430 and plan.object_next == 15 and plan.scf_serial == 9
    # a reference that holds nothing adopts nothing
    assert plan_counters(own(), reports, margin=MARGIN, reference=PARENT).adopt == []


def test_plan_reference_without_a_report_is_refused() -> None:
    reports = three_reports()
    del reports["SE2"]
    with pytest.raises(LocalProtocolError, match="SE2"):
        plan_counters(own(), reports, margin=MARGIN, reference="SE2")
    with pytest.raises(LocalProtocolError):
        plan_counters(own(), reports, margin=MARGIN, reference="XYZ")


def test_plan_for_a_wiped_site_moves_past_the_peers() -> None:
    wiped = OwnCounters(txn_id=0, incarnation=0, object_next=0, scf_serial=0, control_sent={})
    reports = three_reports()
    plan = plan_counters(wiped, reports, margin=MARGIN)
    assert plan.txn_id == 430
    assert plan.incarnation == 1
    assert plan.object_next == 15
    assert plan.scf_serial == 9
    assert plan.control_sent == {PARENT: 0, "SE1": 6, "SE2": 1}
    assert {lp.peer for lp in plan.links.values()} == set(PEERS)
    assert len(plan.adopt) == 4  # every object the children hold comes back
    # a wiped site with a single peer that has seen nothing still gets fresh counters
    lone = plan_counters(wiped, {PARENT: report(PARENT)}, margin=MARGIN)
    assert (lone.txn_id, lone.incarnation, lone.object_next) == (MARGIN, 1, 1)


def test_plan_for_a_site_alone_moves_its_own_counters() -> None:
    wiped = OwnCounters(txn_id=0, incarnation=0, object_next=0, scf_serial=0, control_sent={})
    plan = plan_counters(wiped, {}, margin=MARGIN)
    assert (plan.txn_id, plan.incarnation, plan.links, plan.adopt) == (MARGIN, 1, {}, [])


@pytest.mark.parametrize("site, subtree, left", [
    ("P01", ["P01", "S01", "T01"], {"S01", "T01"}),  # the children resend their subtree's
    ("S01", ["S01"], set()),                       # a site without children sends all it holds
    ("CEN", ["CEN", "P01", "S01", "P02"], {"P01", "S01", "P02"}),
])
def test_the_recovering_site_sends_up_all_it_originated_and_leaves_only_its_subtree_s_to_its_children(
        site: str, subtree: list[str], left: set[str]) -> None:
    """Issue 6: the recovering site's own data (its clients', its burst records, its status
    messages) always goes up again in its resync; only what came from below it is left out."""
    assert left_to_children(site, subtree) == left
    assert site not in left_to_children(site, subtree)


# -- the agent: phases ------------------------------------------------------------------------

EXPECTED_TRANSITIONS = {
    Phase.ANNOUNCE: {Phase.COUNTERS},
    Phase.COUNTERS: {Phase.RESYNC},
    Phase.RESYNC: {Phase.COMPLETE},
    Phase.COMPLETE: set(),
}


def agent(**fields: Any) -> RecoveryAgent:
    return RecoveryAgent(recovery_id=RID, site=SITE, peers=list(PEERS), **fields)


def test_transitions_table_is_the_four_step_path() -> None:
    assert TRANSITIONS == EXPECTED_TRANSITIONS
    assert set(TRANSITIONS) == set(Phase)


@pytest.mark.parametrize(
    ("src", "dst"),
    [pytest.param(a, b, id=f"{a.value}->{b.value}") for a, b in itertools.product(Phase, Phase)],
)
def test_advance_follows_the_table(src: Phase, dst: Phase) -> None:
    a = agent(phase=src)
    if dst in EXPECTED_TRANSITIONS[src]:
        a.advance(dst)
        assert a.phase is dst
    else:
        with pytest.raises(LocalProtocolError, match=f"{src.value} cannot go to {dst.value}"):
            a.advance(dst)
        assert a.phase is src  # a refused transition changes nothing


def test_advance_walks_the_four_steps_and_stops() -> None:
    a = agent()
    assert a.phase is Phase.ANNOUNCE
    for step in (Phase.COUNTERS, Phase.RESYNC, Phase.COMPLETE):
        a.advance(step)
        assert a.phase is step
    for phase in Phase:
        with pytest.raises(LocalProtocolError):
            a.advance(phase)


# -- the agent: announce and reports ----------------------------------------------------------


def test_should_announce_once_per_retry_to_the_silent_peers() -> None:
    a = agent()
    assert a.should_announce(100.0, 1.0) == PEERS
    assert a.should_announce(100.0, 1.0) == []
    assert a.should_announce(100.9, 1.0) == []
    a.on_report(report("SE1"))
    assert a.should_announce(101.0, 1.0) == [PARENT, "SE2"]
    assert a.should_announce(101.5, 1.0) == []
    a.on_report(report(PARENT))
    assert a.should_announce(102.5, 1.0) == ["SE2"]
    assert a.should_announce(105.0, 5.0) == []  # 2.5 s since the last one, retry is 5 s
    assert a.should_announce(107.5, 5.0) == ["SE2"]


def test_should_announce_nothing_outside_announce() -> None:
    for phase in (Phase.COUNTERS, Phase.RESYNC, Phase.COMPLETE):
        a = agent(phase=phase)
        assert a.missing_reports() == PEERS
        assert a.should_announce(1e9, 1.0) == []
        assert a.last_announce == 0.0


def test_should_announce_nothing_when_every_peer_has_answered() -> None:
    a = agent()
    for p in PEERS:
        a.on_report(report(p))
    assert a.should_announce(1e9, 1.0) == []


def test_on_report_ignores_a_wrong_recovery_id_and_unknown_peers() -> None:
    a = agent()
    assert a.on_report(report(PARENT, recovery_id="rec-OTHER")) is False
    assert a.on_report(report("ZZZ")) is False
    assert a.reports == {}
    assert a.on_report(report("SE1")) is False
    assert set(a.reports) == {"SE1"}
    assert a.missing_reports() == [PARENT, "SE2"]


def test_on_report_true_exactly_when_the_last_missing_peer_reports() -> None:
    a = agent()
    assert a.on_report(report("SE2", next_expected=5)) is False
    assert a.on_report(report("SE2", next_expected=99)) is False  # duplicate
    assert a.on_report(report(PARENT)) is False
    assert a.on_report(report("SE1", recovery_id="stale-id")) is False
    assert a.on_report(report("SE1")) is True
    assert a.missing_reports() == []
    assert set(a.reports) == set(PEERS)


def test_on_report_keeps_the_first_report_of_a_peer() -> None:
    a = agent()
    first = report("SE1", next_expected=73, last_sent=18, txn_watermark=405, objects=[obj(3, 2)])
    second = report("SE1", next_expected=80, last_sent=30, txn_watermark=999, objects=[obj(3, 9)])
    a.on_report(first)
    a.on_report(second)
    assert a.reports["SE1"] == first.model_dump(mode="json")
    assert a.parsed_reports()["SE1"] == first


def test_on_report_outside_announce_is_not_taken() -> None:
    a = agent()
    for p in (PARENT, "SE1"):
        a.on_report(report(p))
    a.advance(Phase.COUNTERS)  # (as if the plan had been made; the table does not know)
    assert a.on_report(report("SE2")) is False
    assert "SE2" not in a.reports
    a.advance(Phase.RESYNC)
    assert a.on_report(report(PARENT, next_expected=500)) is False
    assert a.parsed_reports()[PARENT] == report(PARENT)


def test_on_report_duplicate_after_the_last_report_does_not_signal_again() -> None:
    a = agent()
    results = [a.on_report(report(p)) for p in PEERS]
    assert results == [False, False, True]
    assert a.on_report(report("SE1")) is False


def test_on_resync_done_ignores_wrong_ids_and_unknown_peers() -> None:
    a = agent(phase=Phase.RESYNC)
    a.on_resync_done("SE1", "rec-OTHER", 20)
    a.on_resync_done("ZZZ", RID, 20)
    assert a.done_marks == {}
    a.on_resync_done("SE1", RID, 20)
    a.on_resync_done(PARENT, RID, 60)
    assert a.done_marks == {"SE1": 20, PARENT: 60}


@dataclass(frozen=True)
class Wait:
    name: str
    done: dict[str, int]
    ours: dict[str, int]
    applied: dict[str, int]
    acked: dict[str, int]
    waiting: list[str]


ALL_APPLIED = {PARENT: 60, "SE1": 20, "SE2": 7}
ALL_DONE = {PARENT: 60, "SE1": 20, "SE2": 7}
OURS = {PARENT: 50, "SE1": 80, "SE2": 70}

WAITS = [
    Wait("nothing done yet", {}, {}, {}, {}, PEERS),
    Wait("everything applied and acked", ALL_DONE, OURS, ALL_APPLIED, OURS, []),
    Wait("applied past the mark", ALL_DONE, OURS, {p: v + 5 for p, v in ALL_APPLIED.items()},
         {p: v + 1 for p, v in OURS.items()}, []),
    Wait("no done mark from SE2", {PARENT: 60, "SE1": 20}, OURS, ALL_APPLIED, OURS, ["SE2"]),
    Wait("done mark 0 and nothing applied", {**ALL_DONE, "SE2": 0}, OURS,
         {PARENT: 60, "SE1": 20}, OURS, []),
    Wait("SE1's data not all applied", ALL_DONE, OURS, {**ALL_APPLIED, "SE1": 19}, OURS, ["SE1"]),
    Wait("parent's data not applied at all", ALL_DONE, OURS, {"SE1": 20, "SE2": 7}, OURS, [PARENT]),
    Wait("SE2 has not acked our resync", ALL_DONE, OURS, ALL_APPLIED, {**OURS, "SE2": 69}, ["SE2"]),
    Wait("no ack at all of ours", ALL_DONE, OURS, ALL_APPLIED, {}, PEERS),
    Wait("no mark of ours for the parent yet", ALL_DONE, {"SE1": 80, "SE2": 70}, ALL_APPLIED,
         {"SE1": 80, "SE2": 70}, []),
    Wait("both sides behind, one peer each", ALL_DONE, OURS, {**ALL_APPLIED, PARENT: 10},
         {**OURS, "SE1": 0}, [PARENT, "SE1"]),
]


@pytest.mark.parametrize("case", WAITS, ids=[w.name for w in WAITS])
def test_waiting_for(case: Wait) -> None:
    a = agent(phase=Phase.RESYNC, done_marks=dict(case.done), our_marks=dict(case.ours))
    assert a.waiting_for(case.applied, case.acked) == case.waiting


# -- the agent: persistence and idempotence ---------------------------------------------------


def roundtrip(a: RecoveryAgent) -> RecoveryAgent:
    return RecoveryAgent.from_state(json.loads(json.dumps(a.to_state())))


def agents_at_every_phase() -> list[tuple[str, RecoveryAgent]]:
    """One agent walked through the handshake, a snapshot (deep copy) at every step."""
    snaps: list[tuple[str, RecoveryAgent]] = []
    a = agent()
    snaps.append(("fresh", roundtrip(a)))
    a.should_announce(100.0, 1.0)
    snaps.append(("announced", roundtrip(a)))
    reports = three_reports()
    a.on_report(reports["SE2"])
    snaps.append(("one report", roundtrip(a)))
    a.on_report(reports[PARENT])
    a.on_report(reports["SE1"])
    snaps.append(("every report", roundtrip(a)))
    a.advance(Phase.COUNTERS)
    snaps.append(("counters", roundtrip(a)))
    a.our_marks.update({"SE1": 80, "SE2": 70})
    a.advance(Phase.RESYNC)
    snaps.append(("resync", roundtrip(a)))
    a.on_resync_done("SE1", RID, 20)
    a.last_announce = 103.25
    snaps.append(("resync, one done", roundtrip(a)))
    a.on_resync_done(PARENT, RID, 60)
    a.on_resync_done("SE2", RID, 7)
    a.our_marks[PARENT] = 50
    snaps.append(("resync, all done", roundtrip(a)))
    a.advance(Phase.COMPLETE)
    snaps.append(("complete", roundtrip(a)))
    return snaps


SNAPSHOTS = agents_at_every_phase()


@pytest.mark.parametrize(("name", "original"), SNAPSHOTS, ids=[n for n, _ in SNAPSHOTS])
def test_state_roundtrips_through_json(name: str, original: RecoveryAgent) -> None:
    state = original.to_state()
    text = json.dumps(state)  # must be plain JSON
    restored = RecoveryAgent.from_state(json.loads(text))
    assert restored == original
    assert restored.phase is original.phase
    assert isinstance(restored.phase, Phase)
    assert restored.reports == original.reports
    assert restored.parsed_reports() == original.parsed_reports()
    assert restored.done_marks == original.done_marks
    assert restored.our_marks == original.our_marks
    assert restored.last_announce == original.last_announce
    assert restored.missing_reports() == original.missing_reports()
    assert restored.to_state() == state
    assert json.dumps(restored.to_state()) == text  # a second round trip changes nothing
    # the restored agent behaves as the original would
    for applied, acked in ((ALL_APPLIED, OURS), ({}, {}), ({**ALL_APPLIED, "SE1": 0}, OURS)):
        assert restored.waiting_for(applied, acked) == original.waiting_for(applied, acked)
    twin = roundtrip(original)
    assert restored.should_announce(1e6, 1.0) == twin.should_announce(1e6, 1.0)


def test_a_killed_agent_resumes_collecting_reports_where_it_was() -> None:
    reports = three_reports()
    a = agent()
    a.should_announce(100.0, 1.0)
    a.on_report(reports["SE2"])
    b = roundtrip(a)  # killed here, restarted from the persisted state
    assert b.should_announce(100.5, 1.0) == []  # the retry interval survives the restart
    assert b.should_announce(101.0, 1.0) == [PARENT, "SE1"]
    assert b.on_report(report("SE2", next_expected=1)) is False  # the first SE2 report stays
    assert b.on_report(reports[PARENT]) is False
    assert b.on_report(reports["SE1"]) is True
    assert b.parsed_reports() == reports


def test_a_plan_from_the_restored_agent_equals_the_original_and_is_not_redone() -> None:
    restored_counters = own(txn_id=300, incarnation=1, object_next=10, scf_serial=5)
    a = agent()
    for r in three_reports().values():
        a.on_report(r)
    plan = plan_counters(restored_counters, a.parsed_reports(), margin=MARGIN)
    # the runtime commits the plan and the phase together
    a.advance(Phase.COUNTERS)
    for _ in range(3):  # killed and restarted, several times
        a = roundtrip(a)
        again = plan_counters(restored_counters, a.parsed_reports(), margin=MARGIN)
        assert again == plan
        assert again.incarnation == restored_counters.incarnation + 1
        assert a.phase is Phase.COUNTERS
        # a report redelivered after the restart does not start a second plan
        assert a.on_report(three_reports()["SE1"]) is False
    # killed before the commit: the persisted state is still ANNOUNCE with every report,
    # and the plan made again from it is the same plan (the counters were not committed)
    b = agent()
    for r in three_reports().values():
        b.on_report(r)
    assert plan_counters(restored_counters, roundtrip(b).parsed_reports(), margin=MARGIN) == plan


# -- a two-sided in-memory simulation ---------------------------------------------------------


@dataclass
class Node:
    """One site as the sequencing core sees it: its links, counters and receive history."""

    code: str
    incarnation: int
    txn: int
    links: dict[str, LinkState]
    watermark: dict[str, int] = field(default_factory=dict)  # source -> highest txn applied
    hashes: dict[tuple[str, int], str] = field(default_factory=dict)  # (source, seq) -> hash

    def make(self, peer: str, *, incarnation: int | None = None, advance: bool = True,
             key: str = "k") -> Envelope:
        """The next envelope this site sends to ``peer``."""
        out = self.links[peer]
        self.txn += 1
        env = envelope(source=self.code, dest=peer, link_seq=out.next_send_seq, txn_id=self.txn,
                       incarnation=self.incarnation if incarnation is None else incarnation,
                       key=key, payload={"from": self.code, "txn": self.txn, "key": key})
        if advance:
            out.next_send_seq += 1
            out.sent += 1
        return env

    def verdict(self, env: Envelope, mode: str) -> Verdict:
        link = self.links[env.source]
        applied = self.hashes.get((env.source, env.link_seq))
        if applied is None and env.link_seq < link.next_expected:
            applied = "0000000000000000"  # something else was applied at that seq
        return judge(link, env, mode=mode,  # type: ignore[arg-type]
                     watermark=self.watermark.get(env.source, 0), applied_hash=applied)

    def receive(self, env: Envelope, mode: str) -> Verdict:
        verdict = self.verdict(env, mode)
        record(self.links[env.source], verdict)
        if verdict is Verdict.APPLY:
            self.watermark[env.source] = max(self.watermark.get(env.source, 0), env.txn_id)
            self.hashes[(env.source, env.link_seq)] = env.hash
        return verdict

    def ack_to(self, peer: str) -> LinkAck:
        link = self.links[peer]
        return LinkAck(source=self.code, dest=peer, incarnation=self.incarnation,
                       through=link.applied_through, sent_through=link.sent_through)


PEER_INCARNATION = {PARENT: 1, "SE1": 3, "SE2": 2}
PEER_TXN = {PARENT: 900, "SE1": 700, "SE2": 650}
HELD_OBJECTS = {PARENT: [], "SE1": [obj(3, 2), obj(14, 1)], "SE2": [obj(3, 5), obj(12, 1)]}


def live_peers(site_incarnation: int = 1) -> dict[str, Node]:
    """The neighbours as they were when the site died: they have seen a lot of it."""
    def peer(code: str, role: Any, **link: Any) -> Node:
        state = LinkState(peer=SITE, role=role, their_incarnation=site_incarnation, **link)
        return Node(code, PEER_INCARNATION[code], PEER_TXN[code], {SITE: state},
                    watermark={SITE: {PARENT: 410, "SE1": 405, "SE2": 398}[code]})
    return {
        PARENT: peer(PARENT, "child", next_send_seq=58, acked_through=50, next_expected=44),
        "SE1": peer("SE1", "parent", next_send_seq=19, acked_through=18, next_expected=73),
        "SE2": peer("SE2", "parent", next_send_seq=7, acked_through=4, next_expected=66),
    }


def restored_site(incarnation: int = 1) -> tuple[Node, OwnCounters]:
    """The site as its old backup left it: every counter behind what the peers have seen."""
    links = {
        PARENT: LinkState(peer=PARENT, role="parent", next_send_seq=31, acked_through=30,
                          next_expected=40, their_incarnation=1),
        "SE1": LinkState(peer="SE1", role="child", next_send_seq=50, acked_through=41,
                         next_expected=12, their_incarnation=3),
        "SE2": LinkState(peer="SE2", role="child", next_send_seq=44, acked_through=44,
                         next_expected=5, their_incarnation=2),
    }
    node = Node(SITE, incarnation, 300, links, watermark={PARENT: 800, "SE1": 600, "SE2": 500})
    counters = OwnCounters(txn_id=300, incarnation=incarnation, object_next=10, scf_serial=5,
                           control_sent={"SE1": 3, "SE2": 5})
    return node, counters


def node_report(peer: Node, recovery_id: str) -> RecoveryReport:
    """The core's ``peer_report`` (what ``sites/recovery.py`` answers), from the peer's state."""
    return peer_report(
        site=peer.code, peer=SITE, incarnation=peer.incarnation, recovery_id=recovery_id,
        link=peer.links[SITE], txn_watermark=peer.watermark.get(SITE, 0), held_objects=HELD_OBJECTS[peer.code],
        scf_serial={PARENT: 9, "SE1": 0, "SE2": 0}[peer.code],
        control_serial={PARENT: 0, "SE1": 6, "SE2": 1}[peer.code], status_serial=0,
    )


def apply_plan(site: Node, plan: CounterPlan, now: float) -> None:
    """The plan's counters and links, as ``sites/recovery.py`` applies them (the core's
    ``reset_link_to_plan`` per link)."""
    site.txn = plan.txn_id
    site.incarnation = plan.incarnation
    for peer, lp in plan.links.items():
        reset_link_to_plan(site.links[peer], lp, now)


def exchange_acks(a: Node, b: Node, now: float) -> None:
    """Both ends acknowledge each other; nobody may look rolled back, in either mode."""
    for sender, receiver in ((a, b), (b, a)):
        ack = sender.ack_to(receiver.code)
        link = receiver.links[sender.code]
        assert ack.incarnation == link.their_incarnation, (sender.code, receiver.code)
        outcome = on_ack(link, ack, now=now, redelivered=False)
        assert outcome in (AckOutcome.PROGRESS, AckOutcome.NO_CHANGE), (sender.code, outcome)
        assert link.acked_through == link.sent_through or outcome is AckOutcome.NO_CHANGE
        assert link.rollbacks == 0


def run_recovery(site: Node, counters: OwnCounters, peers: dict[str, Node], mode: str,
                 *, resync_counts: dict[str, int] | None = None) -> CounterPlan:
    """The whole handshake, both sides, as the runtime drives it; returns the plan."""
    resync_counts = resync_counts or {PARENT: 3, "SE1": 2, "SE2": 1}
    a = agent()
    now = 1000.0
    for p in peers.values():
        p.links[SITE].paused = True
    # ANNOUNCE, with a kill and restart in the middle
    announced = a.should_announce(now, 1.0)
    assert announced == PEERS
    assert a.on_report(node_report(peers["SE2"], RID)) is False
    a = roundtrip(a)
    assert a.should_announce(now + 1, 1.0) == [PARENT, "SE1"]
    assert a.on_report(node_report(peers[PARENT], RID)) is False
    assert a.on_report(node_report(peers["SE1"], RID)) is True
    # COUNTERS
    plan = plan_counters(counters, a.parsed_reports(), margin=MARGIN)
    apply_plan(site, plan, now)
    a.advance(Phase.COUNTERS)
    a = roundtrip(a)
    # RESYNC: our resync messages, the peers' resync data, our own resync data
    for peer in a.peers:
        r = a.reports[peer]
        msg = RecoveryResync(source=SITE, dest=peer, incarnation=site.incarnation, recovery_id=RID,
                             next_send_seq=r["next_expected"], next_expected=r["last_sent"] + 1)
        assert (msg.next_send_seq, msg.next_expected) == (
            plan.links[peer].next_send_seq, plan.links[peer].next_expected)
        accept_resync(peers[peer].links[SITE], msg, now)
    for child in CHILDREN:  # syncchild: our objects down
        for i in range(2):
            env = site.make(child, key=f"obj-{i}")
            assert peers[child].receive(env, mode) is Verdict.APPLY
        a.our_marks[child] = site.links[child].sent_through
    a.advance(Phase.RESYNC)
    a = roundtrip(a)
    for code, count in resync_counts.items():  # the peers' resync data, then their done mark
        sender = peers[code]
        for i in range(count):
            env = sender.make(SITE, key=f"resync-{i}")
            assert site.receive(env, mode) is Verdict.APPLY, (code, i)
        a.on_resync_done(code, RID, sender.links[SITE].sent_through)
        a = roundtrip(a)
    applied = {p: l.applied_through for p, l in site.links.items()}
    acked = {p: l.acked_through for p, l in site.links.items()}
    assert a.waiting_for(applied, acked) == list(CHILDREN)  # our objects are not acked yet
    env = site.make(PARENT, key="syncparent")  # syncparent: site data up, once children are in
    assert peers[PARENT].receive(env, mode) is Verdict.APPLY
    a.our_marks[PARENT] = site.links[PARENT].sent_through
    assert a.waiting_for(applied, acked) == PEERS
    for p in peers.values():
        exchange_acks(site, p, now + 2)
    applied = {p: l.applied_through for p, l in site.links.items()}
    acked = {p: l.acked_through for p, l in site.links.items()}
    assert a.waiting_for(applied, acked) == []
    a.advance(Phase.COMPLETE)
    assert roundtrip(a).phase is Phase.COMPLETE
    return plan


@pytest.mark.parametrize("mode", ["sms20", "hardened"])
def test_without_recovery_the_links_are_broken(mode: str) -> None:
    """The KB's failure, as the core judges it: the hole one way, out of sequence the other."""
    site, _ = restored_site()
    peers = live_peers()
    for code, peer in peers.items():
        up = peer.verdict(site.make(code), mode)
        assert up in (Verdict.DUPLICATE, Verdict.CONFLICT), (code, up)  # new data dropped
        down = site.verdict(peer.make(SITE), mode)
        assert down is Verdict.GAP, (code, down)  # rejected as out of sequence


@pytest.mark.parametrize("mode", ["sms20", "hardened"])
def test_the_handshake_heals_every_link_both_ways(mode: str) -> None:
    site, counters = restored_site()
    peers = live_peers()
    plan = run_recovery(site, counters, peers, mode)
    assert plan.incarnation == 2
    assert plan.txn_id == 410 + MARGIN
    assert plan.object_next == 15
    assert [o["id"] for o in plan.adopt] == ["PR100003", "PR100012", "PR100014"]
    for code, peer in peers.items():
        # both ends of every link agree after the handshake
        ours, theirs = site.links[code], peer.links[SITE]
        assert ours.applied_through == theirs.sent_through
        assert theirs.applied_through == ours.sent_through
        assert ours.acked_through == ours.sent_through
        assert theirs.acked_through == theirs.sent_through
        assert theirs.their_incarnation == plan.incarnation
        assert ours.their_incarnation == peer.incarnation
        # and carry new data both ways, again and again, with any key
        for round_ in range(3):
            assert peer.receive(site.make(code, key=f"new-{round_}"), mode) is Verdict.APPLY
            assert site.receive(peer.make(SITE, key=f"new-{round_}"), mode) is Verdict.APPLY
            exchange_acks(site, peer, 2000.0 + round_)
        assert ours.duplicates == ours.gaps == ours.stale == ours.fenced == 0
        assert theirs.duplicates == theirs.gaps == theirs.stale == theirs.fenced == 0
        # every transaction ID we send now is above anything the peer has seen of us
        assert peer.watermark[SITE] > 410


def test_the_old_incarnation_is_fenced_after_recovery() -> None:
    site, counters = restored_site()
    peers = live_peers()
    old = counters.incarnation
    plan = run_recovery(site, counters, peers, "hardened")
    assert plan.incarnation != old
    for code, peer in peers.items():
        # an envelope of the dead incarnation, even at exactly the seq the peer expects
        ghost = site.make(code, incarnation=old, advance=False)
        assert ghost.link_seq == peer.links[SITE].next_expected
        assert peer.receive(ghost, "hardened") is Verdict.FENCED
        assert peer.links[SITE].fenced == 1
        # the link did not move: the new incarnation's envelope still applies
        assert peer.receive(site.make(code), "hardened") is Verdict.APPLY
        # sms20 has no fence: the same ghost would be taken as new data
        ghost = site.make(code, incarnation=old, advance=False)
        assert peer.verdict(ghost, "sms20") is Verdict.APPLY


def test_an_incarnation_used_before_the_backup_is_not_reused() -> None:
    site, counters = restored_site(incarnation=1)
    peers = live_peers(site_incarnation=2)  # the site had been recovered once after its backup
    plan = run_recovery(site, counters, peers, "hardened")
    for code, peer in peers.items():
        ghost = site.make(code, incarnation=2, advance=False)  # from the dead incarnation 2
        assert peer.verdict(ghost, "hardened") is Verdict.FENCED, (code, plan.incarnation)
