"""What a site may forget: the retention rules (pure; the store executes them, the checker
reads them to tell a pruned record from a lost one).

Theory of operation
-------------------
Every table of a site store is kept for a reason; retention prunes a row only once that
reason is gone, or once it is older than the window the lab promises to honour:

    applied      the hash of each applied envelope, per (sender, link seq): it tells a CONFLICT
                 (a restored sender reusing a number with other content) from a DUPLICATE.
                 Only a sender restored from a backup reuses numbers, so a row older than
                 ``applied_retention`` matters only for a backup older than that: its reused
                 numbers are then dropped as duplicates (still never applied twice) instead of
                 counted as conflicts; hardened mode still sees the rollback in the acks.
    drops,       evidence and idempotency records of the same window (a control command is
    commands     redelivered within seconds of its first run, never an hour later).
    status       status messages are history: kept ``status_retention`` seconds by the time
                 their site made them (the same time at every site, so every ancestor lets a
                 message go at the same moment), the newest of each site always (it carries
                 the serial a recovery moves past).
    tombstones   a deleted object stays a tombstone ``tombstone_lifetime`` seconds after its
                 owner deleted it (``deleted_at``, carried with the object), then it is purged
                 with its ID history: Active Directory's tombstone lifetime. A backup older than
                 that is AD's USN-rollback story: its recovery can bring back objects deleted
                 since (lingering objects), and a restore without recovery can reuse IDs the
                 checker no longer remembers.
    watermark    the ``.trs`` rows of records that are gone (pruned status, purged tombstones,
                 site control changes applied longer ago than ``applied_retention``) are folded
                 into one floor per (sender, data class): the highest transaction ID folded.
                 A key without a row is judged against the floor, so a replay of anything
                 pruned is still stale. A sender's transaction IDs only grow (a recovery moves
                 them past every peer's maximum, floors included), so nothing it sends later
                 is at or below the floor; only a sender restored from a backup older than the
                 retention can be, and then its new keys are dropped as stale too (what AD's
                 up-to-dateness vector does).
    events       the history: ``history_retention`` (pruned before being merged is a recorded
                 gap, which the checker reports as ``unknown``).

Never pruned: counters, links, the outbox (purged by acks only), site data other than status
messages (one row per client, site or key: bounded by the lab), live objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Site control changes (keys ``<target>:<serial>``) are never held as records: their watermark
# rows are folded once applied longer ago than ``applied_retention``.
FOLDED_BY_AGE = ("site_control",)
STATUS = "status"
OBJECT_CLASSES = ("package", "advertisement", "collection")
# Slack for the checker's clock against the sites' (one host; a cluster's clocks are synced).
CLOCK_SLACK = 1.0


@dataclass(frozen=True)
class Retention:
    """The retention settings of a lab, in seconds (0: keep forever)."""

    applied: float = 3600.0
    status: float = 3600.0
    tombstone: float = 86400.0
    history: float = 3600.0

    @classmethod
    def of(cls, settings: Any) -> Retention:
        """From a topology's ``Settings``."""
        return cls(applied=settings.applied_retention, status=settings.status_retention,
                   tombstone=settings.tombstone_lifetime, history=settings.history_retention)


@dataclass(frozen=True)
class Cutoffs:
    """What may go at one moment: rows older than each time (None: nothing of that kind)."""

    applied_before: float | None
    status_before: float | None
    tombstones_before: float | None
    events_before: float | None


def _before(now: float, period: float) -> float | None:
    return now - period if period > 0 else None


def cutoffs(retention: Retention, now: float) -> Cutoffs:
    return Cutoffs(_before(now, retention.applied), _before(now, retention.status),
                   _before(now, retention.tombstone), _before(now, retention.history))


def status_prunable(at: float, version: int, newest_version: int, before: float | None) -> bool:
    """A status message (made at ``at``, serial ``version``) may go: older than the cutoff, and
    not the newest its site has here."""
    return before is not None and at < before and version < newest_version


def tombstone_prunable(obj: dict[str, Any], before: float | None) -> bool:
    """A deleted object may be purged: its owner deleted it before the cutoff. A tombstone
    without ``deleted_at`` (made before it was carried) is kept."""
    if before is None or not obj.get("deleted"):
        return False
    at = obj.get("deleted_at")
    return isinstance(at, (int, float)) and not isinstance(at, bool) and at < before


def applied_prunable(at: float, before: float | None) -> bool:
    """An applied envelope's record (and a drop, a command answer) may go."""
    return before is not None and at < before


def watermark_after_prune(row: int | None, floor: int) -> int:
    """The watermark of a key: its row, else the floor of its (sender, data class)."""
    return row if row is not None else floor


def fold(floor: int, folded: list[int]) -> int:
    """The new floor of a (sender, data class) once these rows' transaction IDs are folded."""
    return max([floor, *folded])


# -- what the checker excuses -------------------------------------------------------------------


def status_expired(at: float | None, now: float, retention: Retention) -> bool:
    """A status message its ancestors may have let go by ``now`` (so its absence is no loss)."""
    return retention.status > 0 and at is not None and at < now - retention.status + CLOCK_SLACK


def tombstone_expired(obj: dict[str, Any], now: float, retention: Retention) -> bool:
    """A tombstone another site may have purged by ``now`` (so its absence is no divergence)."""
    if retention.tombstone <= 0:
        return False
    return tombstone_prunable(obj, now - retention.tombstone + CLOCK_SLACK)
