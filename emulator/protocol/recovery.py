"""The site recovery handshake, a state machine of its own beside steady-state sequencing.

Theory of operation
-------------------
A site restored from a backup (or rebuilt from nothing) comes back under its old site code
with counters that went backwards. Its neighbours have seen higher numbers, so without
recovery they drop its new data as already seen, and it rejects theirs as out of sequence
(Q201603, Q288970). The recovery agent rejoins under the reused code and runs:

    ANNOUNCE   the recovering site sends RecoveryAnnounce(recovery_id, restored counters) to
               its parent and every child, again every retry interval until each answers.
               Each peer pauses the link and answers RecoveryReport: the next seq it expects
               from the site, the last seq it sent to it, its highest transaction-ID
               watermark for it, the highest object number of the site it has seen, the
               site's SCF serial and site-control serial as it knows them, and (children)
               the site's own objects it holds.
    COUNTERS   with every report in, ``plan_counters`` moves every counter past everything
               any peer has seen (transaction ID: the peers' maximum plus a margin, 20 by
               default, as the KB workaround does), bumps the incarnation, and resets each
               link's sequences to what the peer expects. The plan is committed in one
               transaction with the phase, so a rerun never bumps twice.
    RESYNC     RecoveryResync(new link sequences, new incarnation) to every peer. The parent
               reinitializes the site data it holds from the site's subtree and sends all
               global data down (syncchild); children resend their site data and SCFs up
               (syncparent); the site resends its own objects down and asks its clients for
               a full inventory. Each peer ends with RecoveryResyncDone(through=last seq of
               its resync data).
    COMPLETE   once the site has applied every peer's resync data and every peer has
               acknowledged the site's own, it sends RecoveryComplete; links are active and
               the old incarnation is fenced (hardened mode).

The peers' side is a state machine of its own, one ``PeerRecovery`` per recovering
neighbour, with its transitions in ``PEER_TRANSITIONS``:

    (none)     --announce-->                 PAUSED     link paused, report sent
    PAUSED     --announce (same recovery)--> PAUSED     the report again (the first was lost)
    PAUSED     --resync (site is our child)--> RESYNCED reinit its subtree's data, global data
                                                        down, then Done(through)
    PAUSED     --resync (site is our parent)-> RESYNCING our site data up, in steps
    RESYNCING  --last step-->                RESYNCED   Done(through)
    RESYNCED   --announce or resync-->       RESYNCED   Done again (the first was lost)
    RESYNCED   --complete-->                 (none)     forgotten; the link is active
    PAUSED     --pause timeout-->            PAUSED     expired: the link runs again
    any        --announce (a new recovery)-->  PAUSED   the old one is abandoned

A late announce or resync of the same recovery (a duplicate, or delayed on the way) never
pauses a link that is resyncing again.

Forgeries: anyone who can publish to a site's inbox can send an announce, so an announce
only pauses, and a pause is bounded: a recovery that has not resynced ``pause timeout``
seconds after its announce is let go (``peer_pause_expired``: the link resumes, the
entry stays so the real recovery, late, can still go on; its announces no longer pause).
What destroys data (a resync makes a parent reinitialize its copy of the child's subtree;
a resync and a complete reset or free the link) must prove it read the peer's report: each
report carries a random ``challenge`` that the resync and the complete echo. A resync or a
complete with no recovery under way here, another recovery ID, the wrong challenge, or (a
resync) an incarnation that does not move past the one known is refused, with its reason,
and changes nothing. Each handler returns a ``PeerStep``: what the runtime
does, in order, and the new state to persist.

Everything here is pure: the runtime persists the agent's state (``to_state`` /
``from_state``) and does the I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

from emulator.errors import LocalProtocolError
from emulator.protocol.envelope import RecoveryReport, RecoveryResync
from emulator.protocol.objects import parse_object_id, recovered_counter, recovered_txn_id
from emulator.protocol.sequencing import LinkState


class Phase(str, Enum):
    ANNOUNCE = "announce"
    COUNTERS = "counters"
    RESYNC = "resync"
    COMPLETE = "complete"


# Which phase may follow which: the whole handshake in one table.
TRANSITIONS: dict[Phase, set[Phase]] = {
    Phase.ANNOUNCE: {Phase.COUNTERS},
    Phase.COUNTERS: {Phase.RESYNC},
    Phase.RESYNC: {Phase.COMPLETE},
    Phase.COMPLETE: set(),
}


@dataclass(frozen=True)
class OwnCounters:
    """The recovering site's counters as restored."""

    txn_id: int
    incarnation: int
    object_next: int  # next object number the allocator would give
    scf_serial: int
    control_sent: dict[str, int]  # per child, last site-control delta serial sent
    status_serial: int = 0


@dataclass(frozen=True)
class LinkPlan:
    peer: str
    next_send_seq: int  # what the peer expects next from us
    next_expected: int  # what we expect next from the peer
    their_incarnation: int


@dataclass(frozen=True)
class CounterPlan:
    txn_id: int
    incarnation: int
    object_next: int
    scf_serial: int
    control_sent: dict[str, int]
    links: dict[str, LinkPlan]
    status_serial: int
    adopt: list[dict[str, Any]]  # our own objects that peers hold and we lost


def plan_counters(
    own: OwnCounters,
    reports: dict[str, RecoveryReport],
    *,
    margin: int,
    reference: str | None = None,
) -> CounterPlan:
    """Step 3 of the handshake: move every counter past everything any peer has seen."""
    txn = recovered_txn_id(own.txn_id, [r.txn_watermark for r in reports.values()], margin)
    object_next = recovered_counter(
        own.object_next, [r.max_object_ids.get("object", 0) + 1 for r in reports.values()]
    )
    scf = recovered_counter(own.scf_serial, [r.scf_serial for r in reports.values()])
    status = recovered_counter(own.status_serial, [r.status_serial for r in reports.values()])
    control = dict(own.control_sent)
    for peer, report in reports.items():
        control[peer] = max(control.get(peer, 0), report.control_serial)
    links = {
        peer: LinkPlan(peer, next_send_seq=r.next_expected, next_expected=r.last_sent + 1,
                       their_incarnation=r.incarnation)
        for peer, r in reports.items()
    }
    adopt: dict[str, dict[str, Any]] = {}
    sources = [reference] if reference else sorted(reports)
    for peer in sources:
        source = reports.get(peer)
        if source is None:
            raise LocalProtocolError(f"reference site {peer} sent no report")
        for obj in source.objects:
            held = adopt.get(obj["id"])
            if held is None or obj.get("revision", 0) > held.get("revision", 0):
                adopt[obj["id"]] = obj
    return CounterPlan(
        txn_id=txn,
        # Past every incarnation any peer knows: a backup taken before an earlier recovery
        # must not come back as an incarnation the peers have already seen.
        incarnation=max([own.incarnation, *(r.their_incarnation for r in reports.values())]) + 1,
        object_next=object_next,
        scf_serial=scf,
        control_sent=control,
        links=links,
        status_serial=status,
        adopt=sorted(adopt.values(), key=lambda o: o["id"]),
    )


def reset_link_to_plan(link: LinkState, plan: LinkPlan, now: float) -> None:
    """Step 3 at the recovering site: the link restarts from what the peer expects."""
    link.next_send_seq = plan.next_send_seq
    link.acked_through = plan.next_send_seq - 1
    link.next_expected = plan.next_expected
    link.their_incarnation = plan.their_incarnation
    _clear_trouble(link, now)


def accept_resync(link: LinkState, msg: RecoveryResync, now: float) -> int:
    """Step 4 at a peer: take the recovering site's new link sequences and incarnation.

    Returns the sequence through which the peer's outbox to the site is void: those
    envelopes were meant for the old incarnation, and the resync sends their data again.
    """
    link.next_expected = msg.next_send_seq
    link.acked_through = max(0, msg.next_expected - 1)
    link.their_incarnation = msg.incarnation
    link.paused = False
    _clear_trouble(link, now)
    return link.acked_through


def _clear_trouble(link: LinkState, now: float) -> None:
    link.gap_outstanding = False
    link.in_failed_syncs = link.out_failed_syncs = 0
    link.quarantined = False
    link.last_progress = now


@dataclass
class RecoveryAgent:
    """The recovering site's side of the handshake."""

    recovery_id: str
    site: str
    peers: list[str]
    phase: Phase = Phase.ANNOUNCE
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    done_marks: dict[str, int] = field(default_factory=dict)  # peer -> last seq of its resync
    our_marks: dict[str, int] = field(default_factory=dict)  # peer -> last seq of our resync
    last_announce: float = 0.0
    announces: int = 0  # rounds of announces sent (the retry interval backs off)
    # resync up: every site data record the site holds goes to its parent again, in steps
    upload_cursor: list[str] | None = None  # (data class, key) of the last record queued
    upload_done: bool = False

    def advance(self, to: Phase) -> None:
        if to not in TRANSITIONS[self.phase]:
            raise LocalProtocolError(f"recovery of {self.site}: {self.phase.value} cannot go to {to.value}")
        self.phase = to

    def missing_reports(self) -> list[str]:
        return [p for p in self.peers if p not in self.reports]

    def should_announce(self, now: float, retry: float) -> list[str]:
        """Peers to (re)announce to now: those that have not answered, once per retry."""
        if self.phase is not Phase.ANNOUNCE or now - self.last_announce < retry:
            return []
        self.last_announce = now
        missing = self.missing_reports()
        if missing:
            self.announces += 1
        return missing

    def announce_retry(self, base: float, cap: float = 8.0) -> float:
        """1, 2, 4, 8 s...: a peer that is down is not sent an announce every second."""
        return float(min(cap, base * 2 ** max(0, self.announces - 1)))

    def on_report(self, report: RecoveryReport) -> bool:
        """Take a peer's report; True when every peer has answered."""
        if report.recovery_id != self.recovery_id or report.source not in self.peers:
            return False
        if self.phase is not Phase.ANNOUNCE or report.source in self.reports:
            return False  # a duplicate never completes the set a second time
        self.reports[report.source] = report.model_dump(mode="json")
        return not self.missing_reports()

    def parsed_reports(self) -> dict[str, RecoveryReport]:
        return {p: RecoveryReport.model_validate(r) for p, r in self.reports.items()}

    def on_resync_done(self, peer: str, recovery_id: str, through: int) -> None:
        if recovery_id == self.recovery_id and peer in self.peers:
            self.done_marks[peer] = through

    def waiting_for(self, applied: dict[str, int], acked: dict[str, int]) -> list[str]:
        """Peers whose resync is not finished: (their data applied here, ours acked there)."""
        waiting = []
        for peer in self.peers:
            mark = self.done_marks.get(peer)
            if mark is None or applied.get(peer, 0) < mark or acked.get(peer, 0) < self.our_marks.get(peer, 0):
                waiting.append(peer)
        return waiting

    def to_state(self) -> dict[str, Any]:
        state = asdict(self)
        state["phase"] = self.phase.value
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RecoveryAgent:
        state = dict(state)
        state["phase"] = Phase(state["phase"])
        return cls(**state)


# -- the peers' side ---------------------------------------------------------------------------


class PeerPhase(str, Enum):
    PAUSED = "paused"  # the announce came: the link is paused, our report sent
    RESYNCING = "resyncing"  # resync accepted; our site data goes up to the site in steps
    RESYNCED = "resynced"  # all our resync data is queued, through ``mark``; Done sent


PEER_TRANSITIONS: dict[PeerPhase | None, set[PeerPhase | None]] = {
    None: {PeerPhase.PAUSED},
    PeerPhase.PAUSED: {PeerPhase.PAUSED, PeerPhase.RESYNCING, PeerPhase.RESYNCED},
    PeerPhase.RESYNCING: {PeerPhase.RESYNCING, PeerPhase.RESYNCED, PeerPhase.PAUSED},
    PeerPhase.RESYNCED: {PeerPhase.RESYNCED, PeerPhase.PAUSED, None},
}


@dataclass(frozen=True)
class PeerRecovery:
    """A neighbour's view of one recovery of the site at the other end of a link."""

    recovery_id: str
    phase: PeerPhase = PeerPhase.PAUSED
    mark: int = 0  # the last seq of our resync data (RESYNCED)
    cursor: tuple[str, str] | None = None  # (data class, key) of the last record sent up
    challenge: str = ""  # sent in our report; the resync and the complete must echo it
    paused_at: float = 0.0  # when the announce paused the link
    expired: bool = False  # the pause timed out: the link runs; announces no longer pause it

    def to_state(self) -> dict[str, Any]:
        return {"recovery_id": self.recovery_id, "phase": self.phase.value, "mark": self.mark,
                "cursor": list(self.cursor) if self.cursor else None, "challenge": self.challenge,
                "paused_at": self.paused_at, "expired": self.expired}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PeerRecovery:
        cursor = state.get("cursor")
        return cls(recovery_id=str(state["recovery_id"]), phase=PeerPhase(state["phase"]),
                   mark=int(state.get("mark", 0)), cursor=(cursor[0], cursor[1]) if cursor else None,
                   challenge=str(state.get("challenge", "")), paused_at=float(state.get("paused_at", 0.0)),
                   expired=bool(state.get("expired", False)))


@dataclass(frozen=True)
class PeerStep:
    """What a peer does on one handshake message, in this order, and its state afterwards."""

    entry: PeerRecovery | None
    started: bool = False  # a new recovery of the neighbour: say so
    pause: bool = False
    report: bool = False  # answer RecoveryReport
    accept: bool = False  # take the new link sequences and incarnation (``accept_resync``)
    reinit_child: bool = False  # our child: reinitialize its subtree's site data, global data down
    start_upload: bool = False  # our parent: send our site data up, in steps
    done_through: int | None = None  # answer RecoveryResyncDone(through)
    unpause: bool = False
    completed: bool = False  # forget the recovery: the link is active
    timed_out: bool = False  # the pause expired: say so
    ignored: str | None = None  # why nothing was done
    refused: str | None = None  # why nothing was done, counted as evidence of a forgery


def _move(entry: PeerRecovery | None, to: PeerRecovery | None) -> PeerRecovery | None:
    before = entry.phase if entry else None
    after = to.phase if to else None
    if after not in PEER_TRANSITIONS[before]:
        raise LocalProtocolError(f"peer recovery: {before} cannot go to {after}")
    return to


def peer_on_announce(entry: PeerRecovery | None, recovery_id: str, *, challenge: str = "",
                     now: float = 0.0) -> PeerStep:
    """``challenge``: a fresh random string, kept in a new entry and sent in its reports."""
    if entry is None or entry.recovery_id != recovery_id:
        fresh = PeerRecovery(recovery_id, challenge=challenge, paused_at=now)
        return PeerStep(_move(entry, fresh), started=True, pause=True, report=True)
    if entry.phase is PeerPhase.RESYNCED:
        return PeerStep(entry, done_through=entry.mark, unpause=True)
    if entry.phase is PeerPhase.RESYNCING:
        return PeerStep(entry, ignored="already sending our resync data; Done follows the last step")
    return PeerStep(entry, pause=not entry.expired, report=True)


def peer_pause_expired(entry: PeerRecovery | None, *, now: float, timeout: float) -> PeerStep | None:
    """A link paused by an announce and not resynced within ``timeout`` runs again (the entry
    stays: the real recovery can still go on when its resync comes)."""
    if entry is None or entry.phase is not PeerPhase.PAUSED or entry.expired or now - entry.paused_at < timeout:
        return None
    return PeerStep(_move(entry, replace(entry, expired=True)), unpause=True, timed_out=True)


def _unproven(entry: PeerRecovery, challenge: str, what: str) -> str | None:
    if entry.challenge and challenge != entry.challenge:
        return f"a {what} for recovery {entry.recovery_id} that does not echo the challenge of this site's report"
    return None


def peer_on_resync(entry: PeerRecovery | None, recovery_id: str, *, site_is_child: bool, challenge: str = "",
                   incarnation: int = 1, known_incarnation: int = 0) -> PeerStep:
    """``incarnation``: the resync's; ``known_incarnation``: the site's as this peer knows it
    (a recovery always moves past it)."""
    if entry is None or entry.recovery_id != recovery_id:
        return PeerStep(entry, refused=f"a resync for recovery {recovery_id}, which is not under way here")
    if entry.phase is PeerPhase.RESYNCED:
        return PeerStep(entry, done_through=entry.mark)
    if entry.phase is PeerPhase.RESYNCING:
        return PeerStep(entry, ignored="already sending our resync data; Done follows the last step")
    unproven = _unproven(entry, challenge, "resync")
    if unproven:
        return PeerStep(entry, refused=unproven)
    if incarnation <= known_incarnation:
        return PeerStep(entry, refused=f"a resync for recovery {recovery_id} at incarnation {incarnation},"
                                       f" which does not move past {known_incarnation}")
    if site_is_child:
        # the caller reinitializes, sends global data down, then calls ``peer_resynced``
        return PeerStep(entry, accept=True, reinit_child=True)
    return PeerStep(_move(entry, replace(entry, phase=PeerPhase.RESYNCING, cursor=None)), accept=True,
                    start_upload=True)


def peer_resynced(entry: PeerRecovery, mark: int) -> PeerStep:
    """Our resync data for the recovering site is all queued, through ``mark``."""
    return PeerStep(_move(entry, replace(entry, phase=PeerPhase.RESYNCED, mark=mark)), done_through=mark)


def peer_upload_step(entry: PeerRecovery, cursor: tuple[str, str] | None, *, last: bool, mark: int) -> PeerStep:
    """One step of our site data went up; on the last, we are resynced."""
    if entry.phase is not PeerPhase.RESYNCING:
        return PeerStep(entry, ignored=f"not sending resync data ({entry.phase.value})")
    moved = replace(entry, cursor=cursor or entry.cursor)
    if not last:
        return PeerStep(_move(entry, moved))
    return PeerStep(_move(entry, replace(moved, phase=PeerPhase.RESYNCED, mark=mark)), done_through=mark)


def peer_on_complete(entry: PeerRecovery | None, recovery_id: str, *, challenge: str = "") -> PeerStep:
    if entry is None or entry.recovery_id != recovery_id:
        return PeerStep(entry, ignored=f"complete for recovery {recovery_id}, which is not under way here")
    unproven = _unproven(entry, challenge, "complete")
    if unproven:
        return PeerStep(entry, refused=unproven)
    if entry.phase is not PeerPhase.RESYNCED:
        # the site completed without our Done (it was counted before a crash): we are done too
        entry = replace(entry, phase=PeerPhase.RESYNCED)
    return PeerStep(_move(entry, None), completed=True, unpause=True)


def peer_report(
    *,
    site: str,
    peer: str,
    incarnation: int,
    recovery_id: str,
    link: LinkState,
    txn_watermark: int,
    held_objects: list[dict[str, Any]],
    scf_serial: int,
    control_serial: int,
    status_serial: int,
    challenge: str = "",
) -> RecoveryReport:
    """Phase 2 at a peer: what we know of the recovering site ``peer``. ``held_objects`` are
    the objects we hold that the site (or its ancestors, when it is our child) made."""
    numbers = [p[1] for o in held_objects if (p := parse_object_id(o["id"])) and p[0] == peer]
    return RecoveryReport(
        source=site, dest=peer, incarnation=incarnation, recovery_id=recovery_id,
        next_expected=link.next_expected, last_sent=link.sent_through,
        txn_watermark=txn_watermark,
        max_object_ids={"object": max(numbers, default=0)},
        scf_serial=scf_serial, control_serial=control_serial, their_incarnation=link.their_incarnation,
        status_serial=status_serial,
        objects=[o for o in held_objects if o["origin"] == peer],
        challenge=challenge,
    )


def left_to_children(site: str, subtree: list[str]) -> frozenset[str]:
    """The origins whose records a recovering site does not send up again in its resync:
    every site below it. Each child resends all it holds in the same handshake (the agent
    waits for every child's report) and holds each of those records at least at the version
    the recovering site does, so sending them too would move the subtree's data twice."""
    return frozenset(subtree) - {site}
