"""Steady-state sequencing of one link between two sites: the acceptance rules.

Theory of operation
-------------------
Every pair of neighbouring sites (parent and child) has two directed links. ``LinkState``
holds both ends as one site sees them: what we send (``next_send_seq``, ``acked_through``)
and what we receive (``next_expected``, ``their_incarnation``), plus the drop counters and
the health of the link.

A received ``Envelope`` gets exactly one ``Verdict``, decided in this order:

    quarantined sender (hardened)           -> QUARANTINED  not applied, link does not move
    incarnation != the one we know (hard.)  -> FENCED       not applied, link does not move
    link_seq <  next_expected, same hash    -> DUPLICATE    a redelivery or a resend; dropped
    link_seq <  next_expected, other hash   -> CONFLICT     the "hole": new data reusing a
                                                            number we already applied. sms20
                                                            drops it silently (counted);
                                                            hardened calls it a rollback and
                                                            quarantines the sender
    link_seq >  next_expected               -> GAP          held back; we ask for a resend
    txn_id <= watermark(source, class, key) -> STALE        the link moves on, data not applied
    otherwise                               -> APPLY        the link moves on, data applied

Only APPLY and STALE advance ``next_expected``: the receiver consumes exactly
``next_expected``. Every drop is counted here, so a test sees what SMS 2.0 hid.

A ``LinkAck`` says "applied through N" and "I have sent through M". A sender purges its
outbox through N. Counters that go backwards within one incarnation (an ack below what was
already acknowledged, or a peer that says it sent less than we already applied) mean the
peer was rolled back: ``ROLLBACK`` (hardened mode quarantines it; sms20 only counts it).
An ack above what we ever sent is refused: it purges nothing (SMS 2.0 took it as
acknowledging everything, and a forged one emptied the outbox of data nobody had). Acks
that keep saying so for ``suspect_for`` seconds mean *we* were rolled back
(``SELF_ROLLBACK``: evidence hardened mode quarantines this site on; still nothing purged).
A resend request from a number we never sent is refused the same way.

Health follows ConfigMgr's link states: ``degraded_after`` consecutive failed syncs make a
link degraded, ``failed_after`` make it failed, one success makes it active again.

Decisions
---------
The runtime does not interpret verdicts itself: ``receive``, ``take_ack``, ``serve_resend``
and ``tick`` move the link state and return what to do, as values the runtime executes and
records as history events:

    verdict        ack sender   record drop   hardened: reject   hardened: quarantine   resend
    APPLY          yes          -             -                  -                      -
    STALE          yes          stale         stale              -                      -
    DUPLICATE      yes          -             duplicate          -                      -
    CONFLICT       yes          conflict      quarantined        the sender             -
    GAP            -            -             gap                -                      ask again
    FENCED         -            fenced        fenced             -                      -
    QUARANTINED    -            quarantined   quarantined        -                      -
    PAUSED         -            -             -                  -                      -

(``PAUSED``: a recovery handshake holds the link; nothing moves, the sender resends later.)
An envelope that is well formed but cannot be applied is consumed anyway (``unappliable``):
one bad envelope never blocks its link.

Nothing here does I/O or reads a clock: time comes in as ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from emulator.protocol.envelope import Envelope, LinkAck, RejectReason, ResendRequest

Mode = Literal["sms20", "hardened"]


class Verdict(str, Enum):
    APPLY = "apply"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    GAP = "gap"
    STALE = "stale"
    FENCED = "fenced"
    QUARANTINED = "quarantined"
    PAUSED = "paused"

    @property
    def consumes(self) -> bool:
        """Whether the envelope moves the receive sequence on."""
        return self in (Verdict.APPLY, Verdict.STALE)


class AckOutcome(str, Enum):
    PROGRESS = "progress"
    NO_CHANGE = "no_change"
    ROLLBACK = "rollback"  # the peer's counters went backwards
    AHEAD = "ahead"  # the peer acknowledges more than we ever sent: refused, evidence
    SELF_ROLLBACK = "self_rollback"  # ... and has kept saying so for ``suspect_for``


@dataclass
class LinkState:
    """One site's view of the two directed links with one neighbour."""

    peer: str
    role: Literal["parent", "child"]  # what the peer is to us
    # us -> peer
    next_send_seq: int = 1
    acked_through: int = 0
    # peer -> us
    next_expected: int = 1
    their_incarnation: int = 0
    # link management
    paused: bool = False  # a recovery handshake holds the link
    quarantined: bool = False
    out_failed_syncs: int = 0
    in_failed_syncs: int = 0
    gap_outstanding: bool = False
    last_progress: float = 0.0  # last ack progress on our outbound side
    last_resend: float = 0.0
    last_resend_request: float = 0.0
    backward_since: float | None = None  # acks have said less than we know since then
    ahead_since: float | None = None  # acks have said more than we sent since then
    ahead_last: float = 0.0  # the last of them (a run with a pause longer than suspect_for restarts)
    # counters, all visible in diagnostics
    sent: int = 0
    applied: int = 0
    duplicates: int = 0
    conflicts: int = 0
    gaps: int = 0
    stale: int = 0
    fenced: int = 0
    refused: int = 0
    resends: int = 0
    resend_unavailable: int = 0
    rollbacks: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sent_through(self) -> int:
        return self.next_send_seq - 1

    @property
    def applied_through(self) -> int:
        return self.next_expected - 1

    def to_row(self) -> dict[str, Any]:
        """Every field, as the store keeps it (a copy: changing it changes nothing here)."""
        row = dict(self.__dict__)
        row["extra"] = dict(self.extra)
        return row

    def clone(self) -> LinkState:
        """A copy to put back if a transaction is undone (cheaper than a deep copy: the only
        mutable field is ``extra``, a flat mapping of counters)."""
        twin = object.__new__(LinkState)
        twin.__dict__.update(self.__dict__)
        twin.extra = dict(self.extra)
        return twin

    def fingerprint(self) -> tuple[Any, ...]:
        """Equal for two states that would be saved the same."""
        return (*self.__dict__.values(), *sorted(self.extra.items()))


def judge(
    link: LinkState,
    env: Envelope,
    *,
    mode: Mode,
    watermark: int,
    applied_hash: str | None,
) -> Verdict:
    """Decide what to do with one received envelope (see the module docstring)."""
    if mode == "hardened":
        if link.quarantined:
            return Verdict.QUARANTINED
        if env.incarnation != link.their_incarnation:
            return Verdict.FENCED
    if env.link_seq < link.next_expected:
        if applied_hash is not None and applied_hash != env.hash:
            return Verdict.CONFLICT
        return Verdict.DUPLICATE
    if env.link_seq > link.next_expected:
        return Verdict.GAP
    if env.txn_id <= watermark:
        return Verdict.STALE
    return Verdict.APPLY


def record(link: LinkState, verdict: Verdict) -> None:
    """Move the receive side of the link according to a verdict and count it."""
    if verdict.consumes:
        link.next_expected += 1
        link.gap_outstanding = False
        link.in_failed_syncs = 0
    counter = {
        Verdict.APPLY: "applied",
        Verdict.DUPLICATE: "duplicates",
        Verdict.CONFLICT: "duplicates",
        Verdict.GAP: "gaps",
        Verdict.STALE: "stale",
        Verdict.FENCED: "fenced",
        Verdict.QUARANTINED: "refused",
        Verdict.PAUSED: "",
    }[verdict]
    if not counter:
        return
    setattr(link, counter, getattr(link, counter) + 1)
    if verdict is Verdict.CONFLICT:
        link.conflicts += 1
    if verdict is Verdict.GAP:
        link.gap_outstanding = True


def should_request_resend(link: LinkState, now: float, sync_interval: float) -> bool:
    """A gap is asked for again at most once per sync interval."""
    if now - link.last_resend_request < sync_interval:
        return False
    link.last_resend_request = now
    return True


def on_ack(link: LinkState, ack: LinkAck, *, now: float, redelivered: bool,
           suspect_for: float = 0.0) -> AckOutcome:
    """Take the peer's acknowledgement (and heartbeat) into the link state.

    An ack that says less than we already know is either old (late, reordered on the way,
    redelivered) or from a peer that went back. Acks of a peer that went back keep saying
    less, heartbeat after heartbeat; a late one is followed by newer ones. So only acks that
    stay backwards for ``suspect_for`` seconds are a rollback; until then they change nothing.
    An ack of more than we sent changes nothing either: it is counted, and when acks keep
    saying so for ``suspect_for`` seconds, with no sane ack between, we were rolled back.
    """
    if ack.through > link.sent_through:
        link.extra["ack_ahead"] = link.extra.get("ack_ahead", 0) + 1
        if link.ahead_since is None or now - link.ahead_last > suspect_for:
            link.ahead_since = now  # a peer that went back says so every heartbeat: two forged
        link.ahead_last = now  # acks far apart are not one run
        if now - link.ahead_since < suspect_for:
            return AckOutcome.AHEAD
        return AckOutcome.SELF_ROLLBACK
    link.ahead_since = None
    if ack.sent_through < link.applied_through or ack.through < link.acked_through:
        if redelivered:  # an ack we already took, delivered again after a reconnect
            return AckOutcome.NO_CHANGE
        if link.backward_since is None:
            link.backward_since = now
        if now - link.backward_since < suspect_for:
            return AckOutcome.NO_CHANGE
        link.rollbacks += 1
        return AckOutcome.ROLLBACK
    link.backward_since = None
    if ack.through == link.acked_through:
        return AckOutcome.NO_CHANGE
    link.acked_through = ack.through
    link.last_progress = now
    link.out_failed_syncs = 0
    return AckOutcome.PROGRESS


def resend_due(link: LinkState, *, now: float, resend_after: float, unacked: int) -> bool:
    """Whether unacknowledged envelopes have waited long enough to be sent again.

    A due resend counts as one failed sync of the outbound side.
    """
    if unacked == 0 or link.paused:
        link.out_failed_syncs = 0
        return False
    if now - max(link.last_progress, link.last_resend) < resend_after:
        return False
    link.last_resend = now
    link.resends += 1
    link.out_failed_syncs += 1
    return True


def sync_tick(link: LinkState) -> None:
    """Once per sync interval: an outstanding gap is one more failed sync."""
    if link.gap_outstanding and not link.paused:
        link.in_failed_syncs += 1


Health = Literal["active", "degraded", "failed", "paused", "quarantined"]


def health(link: LinkState, *, degraded_after: int, failed_after: int) -> Health:
    if link.quarantined:
        return "quarantined"
    if link.paused:
        return "paused"
    failed = max(link.out_failed_syncs, link.in_failed_syncs)
    if failed >= failed_after:
        return "failed"
    if failed >= degraded_after:
        return "degraded"
    return "active"


# -- decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    """What a receiver does with one envelope (the table in the module docstring)."""

    verdict: Verdict
    ack: bool = False  # acknowledge the sender: the envelope moved the link or was a repeat
    drop: str | None = None  # record the envelope as dropped, with this reason
    reject: RejectReason | None = None  # hardened: tell the sender why it was refused
    resend_from: int | None = None  # ask the sender to send again from this seq
    quarantine: str | None = None  # hardened: quarantine the sender, saying why

    @property
    def apply(self) -> bool:
        return self.verdict is Verdict.APPLY


_REJECT_FOR = {
    Verdict.DUPLICATE: RejectReason.DUPLICATE,
    Verdict.CONFLICT: RejectReason.QUARANTINED,
    Verdict.STALE: RejectReason.STALE,
    Verdict.GAP: RejectReason.GAP,
    Verdict.FENCED: RejectReason.FENCED,
    Verdict.QUARANTINED: RejectReason.QUARANTINED,
}
_DROPPED = frozenset({Verdict.STALE, Verdict.CONFLICT, Verdict.FENCED, Verdict.QUARANTINED})
_ACKED = frozenset({Verdict.APPLY, Verdict.STALE, Verdict.DUPLICATE, Verdict.CONFLICT})


def receive(
    link: LinkState,
    env: Envelope,
    *,
    mode: Mode,
    watermark: int,
    applied_hash: str | None,
    now: float,
    sync_interval: float,
) -> Receipt:
    """Judge one envelope, move the link, and decide what follows (see the table above)."""
    if link.paused:
        return Receipt(Verdict.PAUSED)
    verdict = judge(link, env, mode=mode, watermark=watermark, applied_hash=applied_hash)
    record(link, verdict)
    hardened = mode == "hardened"
    resend = None
    if verdict is Verdict.GAP and should_request_resend(link, now, sync_interval):
        resend = link.next_expected
    quarantine = None
    if verdict is Verdict.CONFLICT and hardened and not link.quarantined:
        link.quarantined = True
        quarantine = f"link seq {env.link_seq} reused with other content"
    return Receipt(
        verdict,
        ack=verdict in _ACKED,
        drop=verdict.value if verdict in _DROPPED else None,
        reject=_REJECT_FOR.get(verdict) if hardened else None,
        resend_from=resend,
        quarantine=quarantine,
    )


def unappliable(link: LinkState, env: Envelope, drop: str = "unappliable") -> Receipt:
    """A well-formed envelope whose data cannot be applied (or, hardened, is signed with a
    retired key: ``drop="retired_key"``) is consumed all the same, so one bad envelope never
    blocks its link; it is recorded and dead-lettered."""
    link.next_expected = env.link_seq + 1
    link.extra[drop] = link.extra.get(drop, 0) + 1
    return Receipt(Verdict.APPLY, ack=True, drop=drop)


class AckEffect(str, Enum):
    PROGRESS = "progress"  # purge the outbox through ``through``
    NO_CHANGE = "no_change"
    PAUSED = "paused"  # a recovery handshake holds the link: acks wait
    FENCED = "fenced"  # hardened: an ack of another incarnation of the peer
    ROLLBACK = "rollback"  # the peer's counters went backwards
    REFUSED = "refused"  # the peer acknowledges more than we ever sent: nothing purged, counted
    SELF_ROLLBACK = "self_rollback"  # ... for ``suspect_for`` seconds: we went back; nothing purged


@dataclass(frozen=True)
class AckDecision:
    effect: AckEffect
    purge_through: int | None = None  # outbox envelopes to this peer through this seq are done
    quarantine_peer: str | None = None  # hardened: the peer went back (AD event 2095 analog)
    quarantine_self: str | None = None  # hardened: we were restored without recovery


def take_ack(link: LinkState, ack: LinkAck, *, mode: Mode, now: float, redelivered: bool,
             suspect_for: float = 0.0) -> AckDecision:
    """Take the peer's acknowledgement (and heartbeat) and decide what follows."""
    if link.paused:
        return AckDecision(AckEffect.PAUSED)
    hardened = mode == "hardened"
    if hardened and ack.incarnation != link.their_incarnation:
        link.fenced += 1
        return AckDecision(AckEffect.FENCED)
    outcome = on_ack(link, ack, now=now, redelivered=redelivered, suspect_for=suspect_for)
    if outcome is AckOutcome.PROGRESS:
        return AckDecision(AckEffect.PROGRESS, purge_through=link.acked_through)
    if outcome is AckOutcome.AHEAD:
        return AckDecision(AckEffect.REFUSED)
    if outcome is AckOutcome.SELF_ROLLBACK:
        # SMS 2.0 took what it had sent as acknowledged, and its new data was silently dropped
        # as already seen. Here nothing is purged on the peer's word: what the outbox holds is
        # sent again, and what reused a number the peer applied is still the hole it drops.
        why = (f"{link.peer} acknowledges seq {ack.through} but this site has sent only"
               f" {link.sent_through}: restored without recovery")
        return AckDecision(AckEffect.SELF_ROLLBACK, quarantine_self=why if hardened else None)
    if outcome is AckOutcome.ROLLBACK:
        quarantine = None
        if hardened and not link.quarantined:
            link.quarantined = True
            quarantine = f"its counters went backwards (acks {ack.through}, sent {ack.sent_through})"
        return AckDecision(AckEffect.ROLLBACK, quarantine_peer=quarantine)
    return AckDecision(AckEffect.NO_CHANGE)


@dataclass(frozen=True)
class ResendDecision:
    """What follows a peer's resend request."""

    start: int | None  # republish the outbox from this seq (None: nothing to send)
    refused: bool = False  # we never sent that number: refused and counted (``resend_refused``)
    unavailable: bool = False  # some of what was asked is no longer kept (SMS's "cannot resend")


def serve_resend(link: LinkState, req: ResendRequest, first_in_outbox: int | None) -> ResendDecision:
    """A peer asks for envelopes again from ``req.from_seq``: republish from there, or from
    the first one still kept; none when none of them is kept (SMS's parent "cannot resend
    them": the link stays broken) or when we never sent that number (refused)."""
    if req.from_seq > link.sent_through:
        link.extra["resend_refused"] = link.extra.get("resend_refused", 0) + 1
        return ResendDecision(None, refused=True)
    if first_in_outbox is None or req.from_seq < first_in_outbox:
        link.resend_unavailable += 1
        if first_in_outbox is None:
            return ResendDecision(None, unavailable=True)
        return ResendDecision(first_in_outbox, unavailable=True)
    return ResendDecision(req.from_seq)


@dataclass
class Beat:
    """What a site last told a peer in an ack, and what the peer last told it: whether a
    heartbeat would tell the peer anything. Kept in memory only: a process that starts has told
    nobody anything, so it heartbeats at once."""

    told: tuple[int, int] | None = None  # (through, sent_through) of our last ack sent
    told_at: float = float("-inf")
    heard: tuple[int, int] | None = None  # (through, sent_through) of the peer's last ack


def told(beat: Beat, ack: LinkAck, now: float) -> None:
    """An ack of ours was published to the peer."""
    beat.told = (ack.through, ack.sent_through)
    beat.told_at = now


def heard(beat: Beat, ack: LinkAck) -> None:
    """An ack of the peer's arrived. A fresh one (its process started and has not heard from
    us) is answered at the next tick, agreement or not: it waits on us to attach."""
    beat.heard = (ack.through, ack.sent_through)
    if ack.fresh:
        beat.told = None


def agreed(link: LinkState, beat: Beat) -> bool:
    """A heartbeat would tell the peer nothing: our last ack told it all we applied, its last
    ack acknowledged all we sent (so our ``sent_through`` is no news), and it has sent nothing
    we have not applied; no gap, no run of backward or ahead acks (the rollback rules need
    those heartbeat after heartbeat). An ack of ours the peer lost costs a resend of what it
    acknowledged, which we acknowledge again."""
    return (beat.told is not None and beat.told[0] == link.applied_through
            and beat.heard is not None and beat.heard[0] == link.sent_through
            and beat.heard[1] <= link.applied_through
            and not link.gap_outstanding and link.backward_since is None and link.ahead_since is None)


def heartbeat_due(link: LinkState, beat: Beat | None, *, now: float, idle_heartbeat: float) -> bool:
    """Every sync interval while the two sides disagree in anything (a restored peer's counters
    going backwards are seen heartbeat after heartbeat, which the rollback rule needs); every
    ``idle_heartbeat`` seconds on a link where both agree, so that a quiet lab stays quiet."""
    if link.paused:
        return False
    if beat is None or not agreed(link, beat):
        return True
    return now - beat.told_at >= idle_heartbeat


@dataclass(frozen=True)
class TickDecision:
    resend: bool  # republish unacknowledged envelopes from the last acknowledgement
    request_resend_from: int | None  # ask the peer again for a gap
    heartbeat: bool  # send our ack (and heartbeat) to the peer
    health_before: Health
    health_after: Health

    @property
    def health_changed(self) -> bool:
        return self.health_before != self.health_after


def tick(link: LinkState, *, now: float, unacked: int, resend_after: float, sync_interval: float,
         degraded_after: int, failed_after: int, beat: Beat | None = None,
         idle_heartbeat: float = 0.0) -> TickDecision:
    """Once per sync interval, per link: resends, gap accounting, heartbeats, health."""
    before = health(link, degraded_after=degraded_after, failed_after=failed_after)
    resend = resend_due(link, now=now, resend_after=resend_after, unacked=unacked)
    sync_tick(link)
    request = None
    if link.gap_outstanding and should_request_resend(link, now, sync_interval):
        request = link.next_expected
    after = health(link, degraded_after=degraded_after, failed_after=failed_after)
    beats = heartbeat_due(link, beat, now=now, idle_heartbeat=idle_heartbeat)
    return TickDecision(resend, request, heartbeat=beats, health_before=before, health_after=after)
