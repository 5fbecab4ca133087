"""What each link fault does to messages (the pure shaper the relay obeys): only what its kind
says, nothing lost or invented beyond it, and the same seed gives the same decisions."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.protocol.shaping import LINK_FAULTS, Release, Shaper


def run(shaper: Shaper, arrivals: list[float], end: float) -> list[Release]:
    """Feed messages 1..n at the given times, then let time run to ``end``."""
    out: list[Release] = []
    for mid, t in enumerate(arrivals, 1):
        out.extend(shaper.due(t))
        out.extend(shaper.arrive(mid, t))
    out.extend(shaper.due(end))
    return out


def test_a_partition_holds_everything_until_the_heal_then_releases_in_order() -> None:
    s = Shaper("partition", seed=1)
    assert run(s, [0.0, 0.1, 0.2], 100.0) == []
    assert s.holding == 3 and s.next_due() is None
    assert [r.mid for r in s.release_all()] == [1, 2, 3]


def test_drop_and_duplicate_follow_their_rate() -> None:
    drops = run(Shaper("drop", seed=3, rate=0.25), [float(i) for i in range(4000)], 5000.0)
    assert len(drops) == 4000 and 800 < sum(r.copies == 0 for r in drops) < 1200
    dups = run(Shaper("duplicate", seed=3, rate=0.5), [float(i) for i in range(4000)], 5000.0)
    assert {r.copies for r in dups} == {1, 2} and 1800 < sum(r.copies == 2 for r in dups) < 2200
    assert [r.copies for r in run(Shaper("drop", seed=3, rate=0.0), [0.0] * 50, 1.0)] == [1] * 50


def test_delay_holds_each_message_its_time() -> None:
    s = Shaper("delay", seed=1, ms=500)
    assert s.arrive(1, 10.0) == [] and s.next_due() == pytest.approx(10.5)
    assert s.due(10.4) == [] and s.due(10.5) == [Release(1)]


def test_delay_with_jitter_holds_each_message_within_ms_plus_or_minus_jitter_and_uses_the_range() -> None:
    s = Shaper("delay", seed=4, ms=300, jitter=100)
    held = {}
    for mid in range(1, 501):
        s.arrive(mid, float(mid))  # a second apart: each one's own hold is its release time - arrival
        due = s.next_due()
        assert due is not None
        held[mid] = (due - mid) * 1000
        assert s.due(due) == [Release(mid)]
    assert all(200 - 1e-6 <= ms <= 400 + 1e-6 for ms in held.values())
    assert min(held.values()) < 220 and max(held.values()) > 380  # the whole spread, not a constant


def test_reorder_releases_out_of_arrival_order() -> None:
    s = Shaper("reorder", seed=2, window=5, max_hold=10.0)
    out = run(s, [i * 0.01 for i in range(200)], 1.0) + s.release_all()
    order = [r.mid for r in out]
    assert sorted(order) == list(range(1, 201)) and order != sorted(order)
    assert sum(1 for a, b in itertools.pairwise(order) if b < a) > 50


def test_reorder_keeps_a_window_and_never_holds_past_max_hold() -> None:
    s = Shaper("reorder", seed=5, window=3, max_hold=1.0)
    assert [s.arrive(m, 0.0) for m in (1, 2, 3)] == [[], [], []]
    released = s.arrive(4, 0.1)
    assert len(released) == 1 and s.holding == 3
    late = s.due(1.05)  # 1, 2 and 3 have waited 1.05 s: none is still held
    out = sorted(r.mid for r in late + released)
    assert {1, 2, 3} <= set(out) and len(out) + s.holding == 4


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(LINK_FAULTS), seed=st.integers(0, 2**31),
       gaps=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=60))
def test_every_message_comes_out_exactly_as_the_kind_says(kind: str, seed: int, gaps: list[float]) -> None:
    """Released now, later, or at the heal: each message exactly once (dropped and duplicated
    ones with 0 and 2 copies), none invented."""
    times = [sum(gaps[:i + 1]) for i in range(len(gaps))]
    s = Shaper(kind, seed=seed, rate=0.3, window=4, max_hold=0.7, ms=200, jitter=100)  # type: ignore[arg-type]
    out = run(s, times, times[-1] + 0.1) + s.release_all()
    assert sorted(r.mid for r in out) == list(range(1, len(times) + 1))
    if kind not in ("drop", "duplicate"):
        assert all(r.copies == 1 for r in out)


@pytest.mark.parametrize("kind", LINK_FAULTS)
def test_the_same_seed_gives_the_same_decisions(kind: str) -> None:
    times = [i * 0.05 for i in range(300)]

    def decisions(seed: int) -> list[tuple[int, int]]:
        s = Shaper(kind, seed=seed, rate=0.3, window=5, max_hold=0.5, ms=100, jitter=80)  # type: ignore[arg-type]
        return [(r.mid, r.copies) for r in run(s, times, 100.0) + s.release_all()]

    assert decisions(9) == decisions(9)
    if kind != "partition":
        assert decisions(9) != decisions(10)
