"""The acceptance rules of one link (judge, record, on_ack, resends, health) and the counters
of ``objects``, driven directly and table by table (h11's ``test_state.py`` style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from emulator.protocol.data import apply_control_change, keep_site_data
from emulator.protocol.envelope import DataClass, content_hash
from emulator.protocol.objects import (
    object_id,
    parse_object_id,
    recovered_counter,
    recovered_txn_id,
)
from emulator.protocol.sequencing import (
    AckOutcome,
    Verdict,
    health,
    judge,
    on_ack,
    record,
    resend_due,
    should_request_resend,
    sync_tick,
)
from tests.unit.helpers import ack, envelope, link

MODES = ("sms20", "hardened")
COUNTERS = ("applied", "duplicates", "conflicts", "gaps", "stale", "fenced", "refused")

# -- judge + record ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One received envelope: the link before, the envelope, and what must come of it."""

    name: str
    verdict: Verdict
    modes: tuple[str, ...] = MODES
    before: dict[str, Any] = field(default_factory=dict)  # LinkState fields
    seq: int = 5
    txn: int = 100
    incarnation: int = 0
    watermark: int = 0
    applied_hash: str | None = None  # None: the store has no hash for that seq
    counted: tuple[str, ...] = ()  # counters that go up by one; all others stay
    advances: bool = False
    gap_outstanding: bool = False


SAME = "same"  # placeholder for "the hash of the envelope itself"

CASES = [
    # in order
    Case("in order applies", Verdict.APPLY, before={"next_expected": 5},
         counted=("applied",), advances=True),
    Case("first envelope of a link", Verdict.APPLY, seq=1, txn=1,
         counted=("applied",), advances=True),
    Case("txn just above the watermark", Verdict.APPLY, before={"next_expected": 5},
         txn=51, watermark=50, counted=("applied",), advances=True),
    # duplicates and the hole
    Case("redelivery of an applied seq", Verdict.DUPLICATE, before={"next_expected": 8},
         applied_hash=SAME, counted=("duplicates",)),
    Case("old seq whose hash the store no longer has", Verdict.DUPLICATE,
         before={"next_expected": 8}, counted=("duplicates",)),
    Case("seq right below next_expected", Verdict.DUPLICATE, seq=7,
         before={"next_expected": 8}, applied_hash=SAME, counted=("duplicates",)),
    Case("other content at an applied seq", Verdict.CONFLICT, before={"next_expected": 8},
         applied_hash="0123456789abcdef", counted=("duplicates", "conflicts")),
    Case("duplicate wins over stale", Verdict.DUPLICATE, before={"next_expected": 8},
         txn=10, watermark=50, applied_hash=SAME, counted=("duplicates",)),
    # gaps
    Case("one ahead is a gap", Verdict.GAP, seq=6, before={"next_expected": 5},
         counted=("gaps",), gap_outstanding=True),
    Case("far ahead is a gap", Verdict.GAP, seq=500, before={"next_expected": 5},
         counted=("gaps",), gap_outstanding=True),
    Case("gap wins over stale", Verdict.GAP, seq=9, before={"next_expected": 5},
         txn=10, watermark=50, counted=("gaps",), gap_outstanding=True),
    # stale
    Case("txn at the watermark", Verdict.STALE, before={"next_expected": 5},
         txn=50, watermark=50, counted=("stale",), advances=True),
    Case("txn below the watermark", Verdict.STALE, before={"next_expected": 5},
         txn=3, watermark=50, counted=("stale",), advances=True),
    # hardened: incarnation and quarantine
    Case("older incarnation is fenced", Verdict.FENCED, modes=("hardened",),
         before={"next_expected": 5, "their_incarnation": 2}, incarnation=1, counted=("fenced",)),
    Case("newer incarnation is fenced", Verdict.FENCED, modes=("hardened",),
         before={"next_expected": 5, "their_incarnation": 2}, incarnation=3, counted=("fenced",)),
    Case("fenced wins over duplicate", Verdict.FENCED, modes=("hardened",),
         before={"next_expected": 8, "their_incarnation": 2}, incarnation=1,
         applied_hash="0123456789abcdef", counted=("fenced",)),
    Case("fenced wins over gap", Verdict.FENCED, modes=("hardened",), seq=9,
         before={"next_expected": 5, "their_incarnation": 2}, incarnation=1, counted=("fenced",)),
    Case("quarantined sender", Verdict.QUARANTINED, modes=("hardened",),
         before={"next_expected": 5, "quarantined": True}, counted=("refused",)),
    Case("quarantine wins over fencing", Verdict.QUARANTINED, modes=("hardened",),
         before={"next_expected": 5, "quarantined": True, "their_incarnation": 2},
         incarnation=7, counted=("refused",)),
    # sms20 knows nothing of incarnations or quarantine
    Case("sms20 ignores an older incarnation", Verdict.APPLY, modes=("sms20",),
         before={"next_expected": 5, "their_incarnation": 2}, incarnation=1,
         counted=("applied",), advances=True),
    Case("sms20 ignores a newer incarnation", Verdict.APPLY, modes=("sms20",),
         before={"next_expected": 5, "their_incarnation": 2}, incarnation=9,
         counted=("applied",), advances=True),
    Case("sms20 ignores the quarantine flag", Verdict.APPLY, modes=("sms20",),
         before={"next_expected": 5, "quarantined": True}, counted=("applied",), advances=True),
    Case("sms20 judges a gap from another incarnation", Verdict.GAP, modes=("sms20",), seq=7,
         before={"next_expected": 5, "their_incarnation": 2}, incarnation=0,
         counted=("gaps",), gap_outstanding=True),
]


def _params() -> list[Any]:
    return [
        pytest.param(case, mode, id=f"{mode}: {case.name}")
        for case in CASES
        for mode in case.modes
    ]


@pytest.mark.parametrize(("case", "mode"), _params())
def test_judge_and_record(case: Case, mode: str) -> None:
    state = link(**case.before)
    env = envelope(link_seq=case.seq, txn_id=case.txn, incarnation=case.incarnation)
    applied_hash = env.hash if case.applied_hash == SAME else case.applied_hash
    before = state.to_row()

    verdict = judge(state, env, mode=mode, watermark=case.watermark, applied_hash=applied_hash)  # type: ignore[arg-type]

    assert verdict is case.verdict
    assert state.to_row() == before, "judge only decides; it never moves the link"

    record(state, verdict)

    after = state.to_row()
    expected_next = before["next_expected"] + (1 if case.advances else 0)
    assert after["next_expected"] == expected_next
    assert verdict.consumes is case.advances
    assert after["gap_outstanding"] is case.gap_outstanding
    for name in COUNTERS:
        bump = 1 if name in case.counted else 0
        assert after[name] == before[name] + bump, name
    # the send side never moves on receipt
    for name in ("next_send_seq", "acked_through", "their_incarnation", "quarantined", "paused"):
        assert after[name] == before[name], name


@pytest.mark.parametrize("verdict", [Verdict.APPLY, Verdict.STALE])
def test_consuming_clears_an_outstanding_gap(verdict: Verdict) -> None:
    state = link(next_expected=5, gap_outstanding=True, in_failed_syncs=7)
    record(state, verdict)
    assert state.next_expected == 6
    assert state.gap_outstanding is False
    assert state.in_failed_syncs == 0


@pytest.mark.parametrize(
    "verdict",
    [Verdict.DUPLICATE, Verdict.CONFLICT, Verdict.GAP, Verdict.FENCED, Verdict.QUARANTINED],
)
def test_not_consuming_keeps_the_gap_and_failures(verdict: Verdict) -> None:
    state = link(next_expected=5, gap_outstanding=True, in_failed_syncs=7)
    record(state, verdict)
    assert state.next_expected == 5
    assert state.gap_outstanding is True
    assert state.in_failed_syncs == 7


@pytest.mark.parametrize("mode", MODES)
def test_a_stream_with_a_hole_is_held_then_healed(mode: str) -> None:
    """1, 2, (3 lost), 4, 5, then 3 resent, 4 and 5 resent: applied exactly 1..5 once each."""
    state = link()
    hashes: dict[int, str] = {}
    applied: list[int] = []

    def receive(seq: int) -> Verdict:
        env = envelope(link_seq=seq, txn_id=seq * 10)
        got = hashes.get(seq) if seq < state.next_expected else None
        verdict = judge(state, env, mode=mode, watermark=0, applied_hash=got)  # type: ignore[arg-type]
        record(state, verdict)
        if verdict is Verdict.APPLY:
            hashes[seq] = env.hash
            applied.append(seq)
        return verdict

    got = [receive(s) for s in (1, 2, 4, 5, 2, 3, 4, 5, 5)]
    assert got == [
        Verdict.APPLY, Verdict.APPLY, Verdict.GAP, Verdict.GAP, Verdict.DUPLICATE,
        Verdict.APPLY, Verdict.APPLY, Verdict.APPLY, Verdict.DUPLICATE,
    ]
    assert applied == [1, 2, 3, 4, 5]
    assert (state.applied, state.gaps, state.duplicates) == (5, 2, 2)
    assert state.gap_outstanding is False


def test_hash_used_for_conflict_is_the_payload_hash() -> None:
    """Two envelopes with one seq and different payloads are told apart by their hash."""
    a = envelope(link_seq=3, payload={"v": 1})
    b = envelope(link_seq=3, payload={"v": 2})
    assert a.hash == content_hash({"v": 1}) != b.hash
    state = link(next_expected=4)
    assert judge(state, b, mode="sms20", watermark=0, applied_hash=a.hash) is Verdict.CONFLICT
    assert judge(state, a, mode="sms20", watermark=0, applied_hash=a.hash) is Verdict.DUPLICATE


# -- on_ack -----------------------------------------------------------------------------------

# Our side: we sent through 10 (next_send_seq 11) and the peer has acknowledged through 4;
# we applied through 5 of what the peer sent us (next_expected 6).
ACK_BASE = {"next_send_seq": 11, "acked_through": 4, "next_expected": 6, "out_failed_syncs": 3,
            "last_progress": 10.0}


@pytest.mark.parametrize(
    ("through", "sent_through", "redelivered", "outcome", "acked_after", "rollbacks"),
    [
        pytest.param(7, 5, False, AckOutcome.PROGRESS, 7, 0, id="progress"),
        pytest.param(10, 5, False, AckOutcome.PROGRESS, 10, 0, id="acks everything sent"),
        pytest.param(5, 9, False, AckOutcome.PROGRESS, 5, 0, id="peer sent more than we got"),
        pytest.param(7, 5, True, AckOutcome.PROGRESS, 7, 0, id="redelivered progress counts"),
        pytest.param(4, 5, False, AckOutcome.NO_CHANGE, 4, 0, id="heartbeat, no change"),
        pytest.param(4, 5, True, AckOutcome.NO_CHANGE, 4, 0, id="redelivered heartbeat"),
        pytest.param(3, 5, False, AckOutcome.ROLLBACK, 4, 1, id="ack goes backwards"),
        pytest.param(0, 5, False, AckOutcome.ROLLBACK, 4, 1, id="ack back to zero"),
        pytest.param(3, 5, True, AckOutcome.NO_CHANGE, 4, 0, id="redelivered older ack"),
        pytest.param(4, 4, False, AckOutcome.ROLLBACK, 4, 1, id="peer sent less than we applied"),
        pytest.param(7, 0, False, AckOutcome.ROLLBACK, 4, 1, id="peer sent nothing, we applied 5"),
        pytest.param(11, 5, False, AckOutcome.SELF_ROLLBACK, 4, 0, id="acks more than we sent"),
        pytest.param(11, 5, True, AckOutcome.SELF_ROLLBACK, 4, 0, id="redelivered, still ahead"),
    ],
)
def test_on_ack(
    through: int, sent_through: int, redelivered: bool, outcome: AckOutcome,
    acked_after: int, rollbacks: int,
) -> None:
    state = link(**ACK_BASE)
    got = on_ack(state, ack(through=through, sent_through=sent_through), now=99.0,
                 redelivered=redelivered)
    assert got is outcome
    assert state.acked_through == acked_after
    assert state.rollbacks == rollbacks
    if outcome is AckOutcome.PROGRESS:
        assert state.last_progress == 99.0
        assert state.out_failed_syncs == 0
    else:
        assert state.last_progress == 10.0
        assert state.out_failed_syncs == 3
    # an ack never touches the receive side
    assert state.next_expected == 6 and state.next_send_seq == 11


def test_redelivered_old_ack_is_not_a_rollback_even_if_the_peer_sent_more_since() -> None:
    # The peer acked through 4 while having sent us through 5; we applied 5, then the peer sent
    # 6 and 7 and acked through 9. The connection drops before our basic.acks reach the broker:
    # the old ack (through 4, sent_through 5) comes again, flagged redelivered, after we have
    # applied through 7.
    state = link(next_send_seq=11, acked_through=9, next_expected=8)
    got = on_ack(state, ack(through=4, sent_through=5), now=50.0, redelivered=True)
    assert got is AckOutcome.NO_CHANGE
    assert state.rollbacks == 0


# -- resends ----------------------------------------------------------------------------------


def test_no_resend_before_resend_after() -> None:
    state = link(next_send_seq=6, acked_through=2, last_progress=100.0)
    assert not resend_due(state, now=100.0, resend_after=30.0, unacked=3)
    assert not resend_due(state, now=129.9, resend_after=30.0, unacked=3)
    assert (state.resends, state.out_failed_syncs) == (0, 0)
    assert resend_due(state, now=130.0, resend_after=30.0, unacked=3)
    assert (state.resends, state.out_failed_syncs, state.last_resend) == (1, 1, 130.0)


def test_resends_repeat_once_per_resend_after_and_count_failed_syncs() -> None:
    state = link(next_send_seq=6, acked_through=2, last_progress=0.0)
    due = [t for t in range(0, 101, 5) if resend_due(state, now=float(t), resend_after=20.0, unacked=3)]
    assert due == [20, 40, 60, 80, 100]
    assert state.resends == 5
    assert state.out_failed_syncs == 5


def test_progress_restarts_the_resend_timer_and_clears_failures() -> None:
    state = link(next_send_seq=6, acked_through=2)
    assert resend_due(state, now=20.0, resend_after=20.0, unacked=3)
    assert on_ack(state, ack(through=4), now=30.0, redelivered=False) is AckOutcome.PROGRESS
    assert state.out_failed_syncs == 0
    assert not resend_due(state, now=45.0, resend_after=20.0, unacked=1)  # 15 s after progress
    assert resend_due(state, now=50.0, resend_after=20.0, unacked=1)


def test_nothing_unacked_resets_the_failed_syncs() -> None:
    state = link(next_send_seq=6, acked_through=5, out_failed_syncs=9)
    assert not resend_due(state, now=1000.0, resend_after=20.0, unacked=0)
    assert state.out_failed_syncs == 0
    assert state.resends == 0


def test_no_resend_while_paused() -> None:
    state = link(next_send_seq=6, acked_through=2, paused=True)
    assert not resend_due(state, now=1000.0, resend_after=20.0, unacked=3)
    assert state.resends == 0
    assert state.last_resend == 0.0
    assert health(state, degraded_after=1, failed_after=2) == "paused"


def test_should_request_resend_is_rate_limited_per_sync_interval() -> None:
    state = link(gap_outstanding=True)
    asked = [t for t in (100.0, 101.0, 104.9, 105.0, 105.1, 111.0, 112.0)
             if should_request_resend(state, t, 5.0)]
    assert asked == [100.0, 105.0, 111.0]
    assert state.last_resend_request == 111.0


# -- sync_tick and health ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gap_outstanding", "paused", "failed_after_tick"),
    [(True, False, 4), (False, False, 3), (True, True, 3)],
    ids=["gap counts", "no gap", "paused gap does not count"],
)
def test_sync_tick(gap_outstanding: bool, paused: bool, failed_after_tick: int) -> None:
    state = link(gap_outstanding=gap_outstanding, paused=paused, in_failed_syncs=3)
    sync_tick(state)
    assert state.in_failed_syncs == failed_after_tick
    assert state.out_failed_syncs == 0


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({}, "active"),
        ({"out_failed_syncs": 11}, "active"),
        ({"out_failed_syncs": 12}, "degraded"),
        ({"in_failed_syncs": 12}, "degraded"),
        ({"in_failed_syncs": 23, "out_failed_syncs": 2}, "degraded"),
        ({"out_failed_syncs": 24}, "failed"),
        ({"in_failed_syncs": 5, "out_failed_syncs": 24}, "failed"),
        ({"in_failed_syncs": 1000}, "failed"),
        ({"paused": True, "out_failed_syncs": 30}, "paused"),
        ({"quarantined": True}, "quarantined"),
        ({"quarantined": True, "paused": True, "in_failed_syncs": 30}, "quarantined"),
    ],
)
def test_health_thresholds(state: dict[str, Any], expected: str) -> None:
    assert health(link(**state), degraded_after=12, failed_after=24) == expected


def test_health_is_configurable() -> None:
    state = link(out_failed_syncs=3)
    assert health(state, degraded_after=3, failed_after=5) == "degraded"
    assert health(state, degraded_after=4, failed_after=5) == "active"
    assert health(state, degraded_after=2, failed_after=3) == "failed"


def test_outbound_failures_degrade_then_fail_then_one_ack_restores() -> None:
    """A peer that never acks: 12 resends degrade the link, 24 fail it, one ack heals it."""
    state = link(next_send_seq=4, acked_through=0)
    seen = []
    for tick in range(1, 25):
        assert resend_due(state, now=tick * 10.0, resend_after=10.0, unacked=3)
        seen.append(health(state, degraded_after=12, failed_after=24))
    assert seen[10] == "active" and seen[11] == "degraded"
    assert seen[22] == "degraded" and seen[23] == "failed"
    assert on_ack(state, ack(through=1), now=250.0, redelivered=False) is AckOutcome.PROGRESS
    assert health(state, degraded_after=12, failed_after=24) == "active"


def test_inbound_gap_degrades_then_fails_then_the_missing_seq_restores() -> None:
    state = link(next_expected=3)
    record(state, judge(state, envelope(link_seq=5), mode="sms20", watermark=0, applied_hash=None))
    seen = []
    for _ in range(24):
        sync_tick(state)
        seen.append(health(state, degraded_after=12, failed_after=24))
    assert seen[10] == "active" and seen[11] == "degraded" and seen[23] == "failed"
    verdict = judge(state, envelope(link_seq=3, txn_id=7), mode="sms20", watermark=0, applied_hash=None)
    assert verdict is Verdict.APPLY
    record(state, verdict)
    assert health(state, degraded_after=12, failed_after=24) == "active"
    sync_tick(state)
    assert state.in_failed_syncs == 0, "no gap outstanding once the missing seq is applied"


# -- objects ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("site", "number", "text"),
    [("CEN", 14, "CEN00014"), ("PR1", 1, "PR100001"), ("A0Z", 0, "A0Z00000"),
     ("CEN", 99999, "CEN99999")],
)
def test_object_id_round_trip(site: str, number: int, text: str) -> None:
    assert object_id(site, number) == text
    assert parse_object_id(text) == (site, number)


@pytest.mark.parametrize(
    "text",
    ["", "CEN", "CEN0014", "CEN000014", "cen00014", "CE00014", "CEN0001A", "CEN-0014",
     " CEN00014", "CENTRAL00014"],
)
def test_parse_object_id_refuses(text: str) -> None:
    assert parse_object_id(text) is None


def test_parse_object_id_refuses_a_trailing_newline() -> None:
    assert parse_object_id("CEN00014\n") is None


@pytest.mark.parametrize(
    ("own", "peers", "margin", "expected"),
    [
        (50, [70, 60], 1000, 1070),  # a peer holds more than our restored counter
        (100, [70, 60], 1000, 1100),  # we are already past every peer: still move on
        (100, [], 10, 110),  # no peer answered
        (0, [0], 1, 1),
        (5, [5], 0, 5),
    ],
)
def test_recovered_txn_id(own: int, peers: list[int], margin: int, expected: int) -> None:
    got = recovered_txn_id(own, peers, margin)
    assert got == expected
    assert got >= own and all(got > p for p in peers if margin > 0)


@pytest.mark.parametrize(
    ("own", "seen", "expected"),
    [(14, [12, 17], 17), (20, [12, 17], 20), (3, [], 3), (0, [0, 0], 0)],
)
def test_recovered_counter(own: int, seen: list[int], expected: int) -> None:
    assert recovered_counter(own, seen) == expected


@pytest.mark.parametrize(
    ("data_class", "version", "held", "recovering", "keep"),
    [
        (DataClass.INVENTORY, 3, None, False, True),   # first copy
        (DataClass.INVENTORY, 4, 3, False, True),      # newer
        (DataClass.INVENTORY, 3, 3, False, True),      # the same version again (a resync) passes on
        (DataClass.INVENTORY, 2, 3, False, False),     # older than held: not stored, not forwarded
        (DataClass.SCF, 5, 5, False, False),           # an SCF at the serial held is a repeat
        (DataClass.SCF, 5, 5, True, True),             # ... but a recovering site forwards it
        (DataClass.SCF, 4, 5, True, False),            # an older SCF never
    ],
)
def test_site_data_versions(data_class: DataClass, version: int, held: int | None, recovering: bool, keep: bool) -> None:
    assert keep_site_data(data_class, version, held, recovering=recovering) is keep


def test_a_delta_site_control_file_at_or_below_the_last_processed_is_ignored() -> None:
    assert apply_control_change(12, 11)
    assert not apply_control_change(11, 11)
    assert not apply_control_change(10, 11)


def test_a_late_backward_ack_is_not_a_rollback_one_that_stays_backward_is() -> None:
    # acked through 4 of 10 sent; an old ack (through 2) arrives late, then fresh ones
    state = link(next_send_seq=11, acked_through=4, next_expected=6)
    assert on_ack(state, ack(through=2, sent_through=5), now=10.0, redelivered=False,
                  suspect_for=3.0) is AckOutcome.NO_CHANGE
    assert on_ack(state, ack(through=6, sent_through=5), now=10.5, redelivered=False,
                  suspect_for=3.0) is AckOutcome.PROGRESS
    assert state.rollbacks == 0 and state.backward_since is None
    # a peer that went back keeps acking less, heartbeat after heartbeat
    outcomes = [on_ack(state, ack(through=1, sent_through=5), now=t, redelivered=False, suspect_for=3.0)
                for t in (20.0, 21.0, 22.0, 23.0)]
    assert outcomes == [AckOutcome.NO_CHANGE] * 3 + [AckOutcome.ROLLBACK]
    assert state.rollbacks == 1 and state.acked_through == 6
