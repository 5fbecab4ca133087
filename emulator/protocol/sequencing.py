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
An ack above what we ever sent means *we* were rolled back (``SELF_ROLLBACK``).

Health follows ConfigMgr's link states: ``degraded_after`` consecutive failed syncs make a
link degraded, ``failed_after`` make it failed, one success makes it active again.

Nothing here does I/O or reads a clock: time comes in as ``now``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Literal

from emulator.protocol.envelope import Envelope, LinkAck

Mode = Literal["sms20", "hardened"]


class Verdict(str, Enum):
    APPLY = "apply"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    GAP = "gap"
    STALE = "stale"
    FENCED = "fenced"
    QUARANTINED = "quarantined"

    @property
    def consumes(self) -> bool:
        """Whether the envelope moves the receive sequence on."""
        return self in (Verdict.APPLY, Verdict.STALE)


class AckOutcome(str, Enum):
    PROGRESS = "progress"
    NO_CHANGE = "no_change"
    ROLLBACK = "rollback"  # the peer's counters went backwards
    SELF_ROLLBACK = "self_rollback"  # the peer acknowledges more than we ever sent


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
        return asdict(self)


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
    }[verdict]
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


def on_ack(link: LinkState, ack: LinkAck, *, now: float, redelivered: bool) -> AckOutcome:
    """Take the peer's acknowledgement (and heartbeat) into the link state."""
    if ack.through > link.sent_through:
        return AckOutcome.SELF_ROLLBACK
    if ack.sent_through < link.applied_through or ack.through < link.acked_through:
        if redelivered:  # an ack we already took, delivered again after a reconnect
            return AckOutcome.NO_CHANGE
        link.rollbacks += 1
        return AckOutcome.ROLLBACK
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
