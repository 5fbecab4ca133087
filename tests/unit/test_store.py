"""The site store's reads for a packet: what ``prefetch`` finds is what the tables hold (and
what is pending in the transaction), and each lookup uses the primary key, so the cost of a
packet does not grow with the store."""

from __future__ import annotations

from pathlib import Path

from sites.store import SiteStore


def store_with(tmp_path: Path, rows: int) -> SiteStore:
    store = SiteStore(tmp_path / "site.db")
    with store.transaction():
        store.db.executemany("INSERT INTO watermark VALUES ('S01', 'inventory', ?, ?)",
                             [(f"k{i:06d}", i) for i in range(rows)])
        store.db.executemany("INSERT INTO site_data VALUES ('inventory', ?, 'S01', ?, '{}', 0)",
                             [(f"k{i:06d}", i % 7 + 1) for i in range(rows)])
    return store


def test_prefetch_finds_present_and_absent_records(tmp_path: Path) -> None:
    store = store_with(tmp_path, 1000)
    pairs = [("inventory", "k000010"), ("inventory", "nope"), ("discovery", "k000010"), ("inventory", "k000999")]
    store.prefetch("S01", pairs, pairs)
    assert store._known_wm == {("S01", "inventory", "k000010"): 10, ("S01", "inventory", "nope"): None,
                               ("S01", "discovery", "k000010"): None, ("S01", "inventory", "k000999"): 999}
    assert store._known_sd == {("inventory", "k000010"): 4, ("inventory", "nope"): None,
                               ("discovery", "k000010"): None, ("inventory", "k000999"): 6}
    store.prefetch("P02", pairs[:1], [])
    assert store._known_wm[("P02", "inventory", "k000010")] is None


def test_prefetch_looks_each_record_up_by_its_key_not_by_a_scan(tmp_path: Path) -> None:
    store = store_with(tmp_path, 50)
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    pairs = [("inventory", f"k{i:06d}") for i in range(0, 50, 5)]
    store.prefetch("S01", pairs, pairs)
    store.db.set_trace_callback(None)
    selects = [s for s in statements if s.lstrip().upper().startswith("WITH") or "SELECT" in s.upper()]
    assert len(selects) == 2
    plans = []
    for sql in selects:  # the traced text has the values in it: plan it as it ran
        plans.append(" | ".join(row[3] for row in store.db.execute(f"EXPLAIN QUERY PLAN {sql}")))
    for plan in plans:
        assert "USING PRIMARY KEY" in plan, plan
        assert "SCAN watermark" not in plan and "SCAN site_data" not in plan, plan
        assert "(source=?)" not in plan, plan  # not one source's whole range either


def test_prefetch_is_still_right_on_a_big_store(tmp_path: Path) -> None:
    store = store_with(tmp_path, 20000)
    pairs = [("inventory", f"k{i:06d}") for i in range(19000, 19800)]  # two chunks of 400
    store.prefetch("S01", pairs, pairs)
    assert all(store._known_wm[("S01", c, k)] == int(k[1:]) for c, k in pairs)
    assert all(store._known_sd[(c, k)] == int(k[1:]) % 7 + 1 for c, k in pairs)
