"""The core's decisions, as the runtime executes them: what follows each verdict and each ack
(``sequencing.receive`` / ``take_ack`` / ``serve_resend`` / ``tick``), and the peers' side of the
recovery handshake (``PeerRecovery`` and its handlers), table by table."""

from __future__ import annotations

import pytest

from emulator.errors import LocalProtocolError
from emulator.protocol import sequencing as seq
from emulator.protocol.envelope import LinkAck, RejectReason, ResendRequest
from emulator.protocol.recovery import (
    PEER_TRANSITIONS,
    PeerPhase,
    PeerRecovery,
    _move,
    peer_on_announce,
    peer_on_complete,
    peer_on_resync,
    peer_pause_expired,
    peer_resynced,
    peer_upload_step,
)
from tests.unit.helpers import CHILD, PARENT, ack, envelope, link

# verdict, mode -> (ack, drop, reject)
RECEIPTS = [
    ("apply", "sms20", True, None, None),
    ("apply", "hardened", True, None, None),
    ("stale", "sms20", True, "stale", None),
    ("stale", "hardened", True, "stale", RejectReason.STALE),
    ("duplicate", "sms20", True, None, None),
    ("duplicate", "hardened", True, None, RejectReason.DUPLICATE),
    ("conflict", "sms20", True, "conflict", None),
    ("conflict", "hardened", True, "conflict", RejectReason.QUARANTINED),
    ("gap", "sms20", False, None, None),
    ("gap", "hardened", False, None, RejectReason.GAP),
    ("fenced", "hardened", False, "fenced", RejectReason.FENCED),
    ("quarantined", "hardened", False, "quarantined", RejectReason.QUARANTINED),
]


def situation(verdict: str) -> tuple[seq.LinkState, dict[str, object], dict[str, object]]:
    """A link, an envelope and the store's answers that make ``verdict``."""
    state = link(next_expected=5, their_incarnation=1)
    env: dict[str, object] = {"link_seq": 5, "txn_id": 50, "incarnation": 1}
    store: dict[str, object] = {"watermark": 10, "applied_hash": None}
    if verdict == "stale":
        store["watermark"] = 60
    elif verdict in ("duplicate", "conflict"):
        env["link_seq"] = 3
        e = envelope(**env)  # type: ignore[arg-type]
        store["applied_hash"] = e.hash if verdict == "duplicate" else "0" * 16
    elif verdict == "gap":
        env["link_seq"] = 7
    elif verdict == "fenced":
        env["incarnation"] = 0
    elif verdict == "quarantined":
        state.quarantined = True
    return state, env, store


@pytest.mark.parametrize("verdict, mode, acks, drop, reject", RECEIPTS)
def test_what_follows_each_verdict(verdict: str, mode: str, acks: bool, drop: str | None,
                                   reject: RejectReason | None) -> None:
    state, env, store = situation(verdict)
    receipt = seq.receive(state, envelope(**env), mode=mode, now=100.0, sync_interval=1.0,  # type: ignore[arg-type]
                          **store)  # type: ignore[arg-type]
    assert receipt.verdict.value == verdict
    assert (receipt.ack, receipt.drop, receipt.reject) == (acks, drop, reject)
    assert receipt.apply == (verdict == "apply")
    assert (receipt.resend_from is not None) == (verdict == "gap")
    assert (receipt.quarantine is not None) == (verdict == "conflict" and mode == "hardened")


def test_a_paused_link_takes_nothing_and_moves_nothing() -> None:
    state = link(next_expected=5, paused=True)
    receipt = seq.receive(state, envelope(link_seq=5), mode="sms20", watermark=0, applied_hash=None,
                          now=1.0, sync_interval=1.0)
    assert receipt == seq.Receipt(seq.Verdict.PAUSED)
    assert state.next_expected == 5 and state.applied == 0


def test_a_gap_is_asked_for_once_per_sync_interval() -> None:
    state = link(next_expected=5)
    asks = [seq.receive(state, envelope(link_seq=9), mode="sms20", watermark=0, applied_hash=None,
                        now=t, sync_interval=1.0).resend_from for t in (10.0, 10.5, 11.2)]
    assert asks == [5, None, 5]


def test_a_conflict_quarantines_the_sender_once() -> None:
    state = link(next_expected=5)
    first = seq.receive(state, envelope(link_seq=2), mode="hardened", watermark=0, applied_hash="x" * 16,
                        now=1.0, sync_interval=1.0)
    again = seq.receive(state, envelope(link_seq=3), mode="hardened", watermark=0, applied_hash="y" * 16,
                        now=2.0, sync_interval=1.0)
    assert first.quarantine and state.quarantined
    assert again.verdict is seq.Verdict.QUARANTINED and again.quarantine is None


def test_an_unappliable_envelope_is_consumed_acked_and_recorded() -> None:
    state = link(next_expected=5)
    receipt = seq.unappliable(state, envelope(link_seq=5))
    assert (receipt.ack, receipt.drop, state.next_expected, state.extra["unappliable"]) == (True, "unappliable", 6, 1)


ACKS = [
    # (link state, ack through / sent_through, mode) -> effect, purge, quarantine peer, quarantine self
    ({"next_send_seq": 11, "acked_through": 4}, (8, 0), "sms20", seq.AckEffect.PROGRESS, 8, False, False),
    ({"next_send_seq": 11, "acked_through": 8}, (8, 0), "sms20", seq.AckEffect.NO_CHANGE, None, False, False),
    ({"next_send_seq": 11, "acked_through": 8}, (3, 0), "sms20", seq.AckEffect.ROLLBACK, None, False, False),
    ({"next_send_seq": 11, "acked_through": 8}, (3, 0), "hardened", seq.AckEffect.ROLLBACK, None, True, False),
    # an ack of more than we sent purges nothing (a forged one emptied the outbox)
    ({"next_send_seq": 5, "acked_through": 2}, (9, 0), "sms20", seq.AckEffect.SELF_ROLLBACK, None, False, False),
    ({"next_send_seq": 5, "acked_through": 2}, (9, 0), "hardened", seq.AckEffect.SELF_ROLLBACK, None, False, True),
    ({"next_send_seq": 11, "acked_through": 4, "paused": True}, (8, 0), "sms20", seq.AckEffect.PAUSED, None, False, False),
]


@pytest.mark.parametrize("state, numbers, mode, effect, purge, q_peer, q_self", ACKS)
def test_what_follows_each_ack(state: dict[str, object], numbers: tuple[int, int], mode: str,
                               effect: seq.AckEffect, purge: int | None, q_peer: bool, q_self: bool) -> None:
    ours = link(their_incarnation=0, **state)
    decision = seq.take_ack(ours, ack(through=numbers[0], sent_through=numbers[1]), mode=mode,  # type: ignore[arg-type]
                            now=5.0, redelivered=False)
    assert decision.effect is effect
    assert decision.purge_through == purge
    assert bool(decision.quarantine_peer) == q_peer and bool(decision.quarantine_self) == q_self
    if effect is seq.AckEffect.SELF_ROLLBACK:
        assert ours.acked_through == state["acked_through"]  # not taken as acknowledged, as SMS 2.0 did
        assert ours.extra["ack_ahead"] == 1


@pytest.mark.parametrize("mode", ["sms20", "hardened"])
def test_a_forged_ack_beyond_what_was_sent_is_refused_and_only_evidence(mode: str) -> None:
    """One ack of more than we sent (a forgery, or the first heartbeat of a peer that has seen
    a later us) purges nothing and quarantines nobody; a sane ack ends the suspicion."""
    ours = link(next_send_seq=11, acked_through=4, their_incarnation=0)
    forged = seq.take_ack(ours, ack(through=2**40, sent_through=0), mode=mode,  # type: ignore[arg-type]
                          now=10.0, redelivered=False, suspect_for=3.0)
    assert forged == seq.AckDecision(seq.AckEffect.REFUSED)
    assert (ours.acked_through, ours.ahead_since, ours.extra["ack_ahead"]) == (4, 10.0, 1)
    real = seq.take_ack(ours, ack(through=6, sent_through=0), mode=mode,  # type: ignore[arg-type]
                        now=11.0, redelivered=False, suspect_for=3.0)
    assert real.effect is seq.AckEffect.PROGRESS and real.purge_through == 6 and ours.ahead_since is None
    again = seq.take_ack(ours, ack(through=99, sent_through=0), mode=mode,  # type: ignore[arg-type]
                         now=20.0, redelivered=False, suspect_for=3.0)
    assert again.effect is seq.AckEffect.REFUSED, "the suspicion starts again from the last sane ack"


@pytest.mark.parametrize("mode, quarantine_self", [("sms20", False), ("hardened", True)])
def test_acks_beyond_what_was_sent_that_persist_are_a_self_rollback_that_purges_nothing(
        mode: str, quarantine_self: bool) -> None:
    ours = link(next_send_seq=5, acked_through=2, their_incarnation=0)
    effects = [seq.take_ack(ours, ack(through=9, sent_through=0), mode=mode,  # type: ignore[arg-type]
                            now=t, redelivered=False, suspect_for=3.0) for t in (1.0, 2.0, 3.0, 4.0)]
    assert [d.effect for d in effects] == [seq.AckEffect.REFUSED] * 3 + [seq.AckEffect.SELF_ROLLBACK]
    assert all(d.purge_through is None for d in effects) and ours.acked_through == 2
    assert bool(effects[-1].quarantine_self) == quarantine_self and ours.extra["ack_ahead"] == 4


def test_acks_beyond_what_was_sent_far_apart_are_not_one_run() -> None:
    ours = link(next_send_seq=5, acked_through=2, their_incarnation=0)
    effects = [seq.take_ack(ours, ack(through=9, sent_through=0), mode="hardened", now=t, redelivered=False,
                            suspect_for=3.0).effect for t in (1.0, 100.0, 200.0, 300.0)]
    assert effects == [seq.AckEffect.REFUSED] * 4 and ours.ahead_since == 300.0


def test_a_resend_request_for_what_was_never_sent_is_refused() -> None:
    ours = link(next_send_seq=11)
    for asked in (11, 2**40):
        decision = seq.serve_resend(ours, ResendRequest(source=PARENT, dest=CHILD, incarnation=0, from_seq=asked), 5)
        assert decision == seq.ResendDecision(None, refused=True)
    assert ours.extra["resend_refused"] == 2 and ours.resend_unavailable == 0


def test_an_ack_of_another_incarnation_is_fenced_in_hardened_mode() -> None:
    ours = link(next_send_seq=11, acked_through=4, their_incarnation=2)
    decision = seq.take_ack(ours, ack(through=8, incarnation=1), mode="hardened", now=1.0, redelivered=False)
    assert decision.effect is seq.AckEffect.FENCED and ours.acked_through == 4 and ours.fenced == 1


@pytest.mark.parametrize("first, asked, start, unavailable", [
    (5, 7, 7, 0), (5, 3, 5, 1), (None, 3, None, 1)])
def test_a_resend_request_is_served_from_what_the_outbox_keeps(first: int | None, asked: int,
                                                              start: int | None, unavailable: int) -> None:
    ours = link(next_send_seq=11)
    req = ResendRequest(source=PARENT, dest=CHILD, incarnation=0, from_seq=asked)
    assert seq.serve_resend(ours, req, first) == seq.ResendDecision(start, unavailable=bool(unavailable))
    assert ours.resend_unavailable == unavailable


def test_a_tick_resends_counts_failed_syncs_and_reports_health_changes() -> None:
    ours = link(next_send_seq=11, acked_through=4, last_progress=0.0, out_failed_syncs=1)
    d = seq.tick(ours, now=10.0, unacked=6, resend_after=3.0, sync_interval=1.0, degraded_after=2, failed_after=4)
    assert d.resend and d.heartbeat and d.health_before == "active" and d.health_after == "degraded"
    assert d.health_changed
    calm = seq.tick(link(), now=10.0, unacked=0, resend_after=3.0, sync_interval=1.0, degraded_after=2,
                    failed_after=4)
    assert not calm.resend and calm.request_resend_from is None and not calm.health_changed


def test_a_heartbeat_goes_every_tick_until_both_sides_agree_then_every_idle_heartbeat() -> None:
    ours = link(next_send_seq=11, acked_through=10, next_expected=8)  # sent 10, applied 7
    beat = seq.Beat()
    due = lambda now: seq.heartbeat_due(ours, beat, now=now, idle_heartbeat=5.0)
    assert seq.heartbeat_due(ours, None, now=0.0, idle_heartbeat=5.0)  # a new process tells at once
    seq.told(beat, ack(through=7, sent_through=10), 0.0)
    assert due(1.0)  # the peer has not echoed us yet
    seq.heard(beat, ack(through=10, sent_through=7))
    assert not due(1.0) and not due(4.9) and due(5.0)  # both agree: only a keepalive
    for differs in (ack(through=9, sent_through=7), ack(through=10, sent_through=8)):
        seq.heard(beat, differs)  # the peer lacks one of ours, or has sent one we lack
        assert due(1.0)
    seq.heard(beat, ack(through=10, sent_through=7))
    ours.next_expected = 9  # we applied one more: the peer must hear it
    assert due(1.0)
    ours.next_expected, ours.backward_since = 8, 0.5  # a run of backward acks: the rollback rule
    assert due(1.0)  # needs them heartbeat after heartbeat
    ours.backward_since, ours.paused = None, True
    assert not due(9.0)
    ours.paused = False
    d = seq.tick(ours, now=2.0, unacked=0, resend_after=3.0, sync_interval=1.0, degraded_after=2,
                 failed_after=4, beat=beat, idle_heartbeat=5.0)
    assert not d.heartbeat
    fresh = LinkAck(source=CHILD, dest=PARENT, incarnation=0, through=10, sent_through=7, fresh=True)
    seq.heard(beat, fresh)  # the peer's process started: it waits on our answer to attach
    assert due(2.0)


# -- the peers' side of the recovery handshake ----------------------------------------------------


def test_the_peer_table_allows_only_the_documented_moves() -> None:
    assert PEER_TRANSITIONS[None] == {PeerPhase.PAUSED}
    assert None in PEER_TRANSITIONS[PeerPhase.RESYNCED]
    with pytest.raises(LocalProtocolError):
        _move(None, PeerRecovery("r", PeerPhase.RESYNCED))
    with pytest.raises(LocalProtocolError):
        _move(PeerRecovery("r", PeerPhase.PAUSED), None)


def test_a_child_peer_walks_announce_resync_complete() -> None:
    step = peer_on_announce(None, "r1")
    assert step.started and step.pause and step.report and step.entry == PeerRecovery("r1")
    again = peer_on_announce(step.entry, "r1")  # our report was lost: again, nothing else
    assert again.report and not again.started
    resync = peer_on_resync(again.entry, "r1", site_is_child=True)
    assert resync.accept and resync.reinit_child and resync.done_through is None
    assert resync.entry is not None
    done = peer_resynced(resync.entry, 42)
    assert done.done_through == 42 and done.entry == PeerRecovery("r1", PeerPhase.RESYNCED, 42)
    late = peer_on_announce(done.entry, "r1")  # a late announce: Done again, the link goes on
    assert late.done_through == 42 and late.unpause and not late.pause
    complete = peer_on_complete(done.entry, "r1")
    assert complete.completed and complete.entry is None


def test_a_parent_peer_sends_its_data_up_in_steps_and_is_never_paused_again_by_a_late_announce() -> None:
    entry = peer_on_announce(None, "r1").entry
    step = peer_on_resync(entry, "r1", site_is_child=False)
    assert step.accept and step.start_upload and step.entry is not None
    assert step.entry.phase is PeerPhase.RESYNCING
    late = peer_on_announce(step.entry, "r1")
    assert late.ignored and not late.pause, "a delayed announce must not pause a link that is resyncing"
    assert peer_on_resync(step.entry, "r1", site_is_child=False).ignored
    half = peer_upload_step(step.entry, ("inventory", "k1"), last=False, mark=0)
    assert half.entry is not None and half.entry.cursor == ("inventory", "k1") and half.done_through is None
    last = peer_upload_step(half.entry, ("status", "x"), last=True, mark=77)
    assert last.done_through == 77 and last.entry is not None and last.entry.phase is PeerPhase.RESYNCED


def test_messages_of_another_recovery_are_refused_ignored_or_start_anew() -> None:
    entry = peer_resynced(PeerRecovery("r1"), 5).entry
    assert peer_on_resync(entry, "r2", site_is_child=True).refused  # a resync without a matching recovery
    assert peer_on_resync(None, "r2", site_is_child=True).refused
    assert peer_on_complete(entry, "r2").ignored
    anew = peer_on_announce(entry, "r2")
    assert anew.started and anew.entry == PeerRecovery("r2")


def test_peer_state_roundtrips() -> None:
    entry = PeerRecovery("r1", PeerPhase.RESYNCING, 3, ("inventory", "k"), challenge="c0ffee", paused_at=7.5,
                         expired=True)
    assert PeerRecovery.from_state(entry.to_state()) == entry
    old = {"recovery_id": "r1", "phase": "paused", "mark": 0, "cursor": None}  # written before issue 10
    assert PeerRecovery.from_state(old) == PeerRecovery("r1")


# -- forged handshake messages (issue 10) -----------------------------------------------------------


def test_a_resync_must_echo_the_challenge_of_our_report() -> None:
    entry = peer_on_announce(None, "r1", challenge="sekrit", now=1.0).entry
    assert entry is not None and entry.challenge == "sekrit" and entry.paused_at == 1.0
    for forged in ("", "guess"):
        step = peer_on_resync(entry, "r1", site_is_child=True, challenge=forged, incarnation=9, known_incarnation=1)
        assert step.refused and "challenge" in step.refused
        assert not (step.accept or step.reinit_child or step.start_upload or step.unpause or step.done_through)
        assert step.entry == entry
    real = peer_on_resync(entry, "r1", site_is_child=True, challenge="sekrit", incarnation=2, known_incarnation=1)
    assert real.accept and real.reinit_child and not real.refused


@pytest.mark.parametrize("site_is_child", [True, False])
def test_a_resync_that_does_not_move_the_incarnation_on_is_refused(site_is_child: bool) -> None:
    entry = peer_on_announce(None, "r1", challenge="c").entry
    step = peer_on_resync(entry, "r1", site_is_child=site_is_child, challenge="c", incarnation=3, known_incarnation=3)
    assert step.refused and "incarnation" in step.refused and not step.accept and step.entry == entry


def test_a_complete_must_echo_the_challenge_too() -> None:
    entry = peer_resynced(peer_on_announce(None, "r1", challenge="c").entry, 5).entry  # type: ignore[arg-type]
    forged = peer_on_complete(entry, "r1", challenge="x")
    assert forged.refused and not forged.completed and not forged.unpause and forged.entry == entry
    assert peer_on_complete(entry, "r1", challenge="c").completed


def test_an_entry_written_before_challenges_takes_any() -> None:
    entry = PeerRecovery("r1")
    assert peer_on_resync(entry, "r1", site_is_child=True, incarnation=2, known_incarnation=1).accept


def test_a_pause_expires_once_and_a_late_real_resync_still_goes_on() -> None:
    entry = peer_on_announce(None, "r1", challenge="c", now=100.0).entry
    assert peer_pause_expired(entry, now=219.9, timeout=120.0) is None
    step = peer_pause_expired(entry, now=220.0, timeout=120.0)
    assert step is not None and step.unpause and step.timed_out
    expired = step.entry
    assert expired is not None and expired.expired and expired.phase is PeerPhase.PAUSED
    assert peer_pause_expired(expired, now=999.0, timeout=120.0) is None, "once"
    again = peer_on_announce(expired, "r1", challenge="new", now=300.0)
    assert again.report and not again.pause, "announces of an expired recovery no longer pause the link"
    assert again.entry is not None and again.entry.challenge == "c"
    late = peer_on_resync(expired, "r1", site_is_child=False, challenge="c", incarnation=2, known_incarnation=1)
    assert late.accept and late.start_upload
    anew = peer_on_announce(expired, "r2", challenge="d", now=400.0)
    assert anew.pause and anew.entry == PeerRecovery("r2", challenge="d", paused_at=400.0)


def test_only_a_paused_entry_expires() -> None:
    resyncing = peer_on_resync(PeerRecovery("r1"), "r1", site_is_child=False, incarnation=2).entry
    assert peer_pause_expired(resyncing, now=1e9, timeout=1.0) is None
    assert peer_pause_expired(None, now=1e9, timeout=1.0) is None
