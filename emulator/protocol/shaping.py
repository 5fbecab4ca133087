"""What a link fault does to the messages of one directed link: pure decisions, seeded.

Theory of operation
-------------------
While a link fault is on, the broker routes the link's messages (packets of envelopes, acks,
handshake messages) to a relay queue instead of the receiver's inbox. The lab's fault daemon
takes each message from the relay and tells the link's ``Shaper`` (``arrive``); the shaper
answers with the messages to release now, each with a number of copies (0 is a drop). Held
messages come out later through ``due`` (at ``next_due``), and all of them at once when the
fault is healed (``release_all``, in arrival order). The daemon does exactly that and nothing
else, so a fault never loses or invents a message beyond what its kind says:

    partition   hold every message until the fault is healed (then they arrive, late)
    drop        drop each message with probability ``rate``
    duplicate   forward each message, and with probability ``rate`` one more copy
    reorder     keep up to ``window`` messages and release a random one of them whenever one
                more arrives; none waits more than ``max_hold`` seconds
    delay       hold each message ``ms`` milliseconds, plus or minus ``jitter``

Every decision comes from the fault's own ``random.Random(seed)``: the same seed and the same
arrivals give the same decisions. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import heapq
import json
import random
from dataclasses import dataclass, field
from typing import Literal

LinkFaultKind = Literal["partition", "drop", "duplicate", "reorder", "delay"]
LINK_FAULTS: tuple[LinkFaultKind, ...] = ("partition", "drop", "duplicate", "reorder", "delay")


@dataclass(frozen=True)
class Release:
    """Forward message ``mid`` ``copies`` times (0: it is dropped)."""

    mid: int
    copies: int = 1


@dataclass
class Shaper:
    kind: LinkFaultKind
    seed: int
    rate: float = 0.0
    window: int = 20
    max_hold: float = 2.0
    ms: float = 0.0
    jitter: float = 0.0
    rng: random.Random = field(init=False, repr=False)
    _timed: list[tuple[float, int, int]] = field(default_factory=list, init=False)  # (release at, order, mid)
    _window: list[tuple[int, float]] = field(default_factory=list, init=False)  # reorder: (mid, arrived)
    _order: int = field(default=0, init=False)
    _arrived: list[int] = field(default_factory=list, init=False)  # held, in arrival order

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def arrive(self, mid: int, now: float) -> list[Release]:
        """Message ``mid`` arrived at the relay at ``now``: what to release now."""
        if self.kind == "partition":
            self._arrived.append(mid)
            return []
        if self.kind == "drop":
            return [Release(mid, 0 if self.rng.random() < self.rate else 1)]
        if self.kind == "duplicate":
            return [Release(mid, 2 if self.rng.random() < self.rate else 1)]
        if self.kind == "delay":
            spread = self.rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0
            self._order += 1
            heapq.heappush(self._timed, (now + max(0.0, self.ms + spread) / 1000.0, self._order, mid))
            self._arrived.append(mid)
            return []
        self._window.append((mid, now))
        self._arrived.append(mid)
        if len(self._window) <= self.window:
            return []
        chosen, _ = self._window.pop(self.rng.randrange(len(self._window)))
        self._arrived.remove(chosen)
        return [Release(chosen)]

    def next_due(self) -> float | None:
        """When a held message is next due (None: not before the heal)."""
        if self.kind == "delay":
            return self._timed[0][0] if self._timed else None
        if self.kind == "reorder" and self._window:
            return min(arrived for _, arrived in self._window) + self.max_hold
        return None

    def due(self, now: float) -> list[Release]:
        out: list[Release] = []
        if self.kind == "delay":
            while self._timed and self._timed[0][0] <= now:
                _, _, mid = heapq.heappop(self._timed)
                out.append(Release(mid))
        elif self.kind == "reorder":
            late = [(mid, t) for mid, t in self._window if t + self.max_hold <= now]
            for item in late:
                self._window.remove(item)
                out.append(Release(item[0]))
        for r in out:
            self._arrived.remove(r.mid)
        return out

    def release_all(self) -> list[Release]:
        """The fault is healed: everything held goes, in the order it arrived."""
        out = [Release(mid) for mid in self._arrived]
        self._arrived.clear()
        self._timed.clear()
        self._window.clear()
        return out

    @property
    def holding(self) -> int:
        return len(self._arrived)


def envelopes_in(body: bytes) -> tuple[int, int | None, int | None]:
    """How many data envelopes a packet carries, and their first and last link seq."""
    try:
        packet = json.loads(body)
        seqs = [m["link_seq"] for m in packet.get("messages", []) if m.get("kind") == "data"]
    except (ValueError, AttributeError, KeyError, TypeError):
        return 0, None, None
    return len(seqs), (min(seqs) if seqs else None), (max(seqs) if seqs else None)
