"""Retention (issue 10, bounded growth): the pure rules, the store executing them on hand-made
stores, and a simulated lab pruned under its workload that the checker still judges valid and
that still converges valid after a recovery from a backup taken before the pruning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from emulator import sim
from emulator.checker import LabState, global_objects, site_data_lost
from emulator.lab import LabDir
from emulator.protocol import retention as rules
from emulator.topology import Topology, load_topology
from sites.store import SiteStore, snapshot

ROOT = Path(__file__).resolve().parents[2]
NOW = 10_000.0


# -- the rules -----------------------------------------------------------------------------------


def test_a_retention_of_zero_keeps_everything() -> None:
    cut = rules.cutoffs(rules.Retention(applied=0, status=0, tombstone=0, history=0), NOW)
    assert cut == rules.Cutoffs(None, None, None, None)
    assert not rules.applied_prunable(0.0, cut.applied_before)
    assert not rules.status_prunable(0.0, 1, 9, cut.status_before)
    assert not rules.tombstone_prunable({"deleted": True, "deleted_at": 0.0}, cut.tombstones_before)


@pytest.mark.parametrize("at, version, newest, prunable", [
    (NOW - 100, 1, 5, True),     # old and not the newest of its site
    (NOW - 100, 5, 5, False),    # the newest of its site stays, however old
    (NOW - 10, 1, 5, False),     # younger than the retention
    (NOW - 60, 1, 5, False),     # exactly at the cutoff: kept
])
def test_status_messages_go_by_the_time_they_were_made_but_never_the_newest(
        at: float, version: int, newest: int, prunable: bool) -> None:
    assert rules.status_prunable(at, version, newest, NOW - 60) is prunable


@pytest.mark.parametrize("obj, prunable", [
    ({"deleted": True, "deleted_at": NOW - 100}, True),
    ({"deleted": True, "deleted_at": NOW - 10}, False),
    ({"deleted": False, "deleted_at": NOW - 100}, False),   # undeleted? never purged
    ({"deleted": True}, False),                             # a tombstone from before deleted_at
    ({"deleted": True, "deleted_at": True}, False),         # not a time
])
def test_tombstones_are_purged_once_their_lifetime_has_passed(obj: dict[str, Any], prunable: bool) -> None:
    assert rules.tombstone_prunable(obj, NOW - 60) is prunable


def test_a_folded_watermark_row_leaves_its_floor_so_a_replay_is_still_stale() -> None:
    floor = rules.fold(0, [7, 12, 9])
    assert floor == 12
    assert rules.fold(floor, [3]) == 12  # a floor never goes down
    assert rules.watermark_after_prune(None, floor) == 12
    assert rules.watermark_after_prune(30, floor) == 30


def test_the_checker_excuses_only_what_a_site_may_have_let_go() -> None:
    r = rules.Retention(status=60, tombstone=60)
    assert rules.status_expired(NOW - 61, NOW, r)
    assert not rules.status_expired(NOW - 30, NOW, r)
    assert not rules.status_expired(None, NOW, r)
    assert not rules.status_expired(NOW - 1e6, NOW, rules.Retention(status=0))
    assert rules.tombstone_expired({"deleted": True, "deleted_at": NOW - 61}, NOW, r)
    assert not rules.tombstone_expired({"deleted": True, "deleted_at": NOW - 30}, NOW, r)
    assert not rules.tombstone_expired({"deleted": False}, NOW, r)


# -- the store executes them ---------------------------------------------------------------------


def hand_made(tmp_path: Path) -> SiteStore:
    """A central site's store: applied envelopes old and new, P01's status messages old and
    new with their watermarks, site control watermarks, a live object, tombstones old and new."""
    store = SiteStore(tmp_path / "site.db")
    with store.transaction():
        for seq in range(1, 11):  # seq 1..5 applied long ago, 6..10 just now
            at = NOW - 500 if seq <= 5 else NOW - 5
            store.record_applied("P01", seq, 100 + seq, f"h{seq}", "status", f"P01:{seq}", "P01", seq, at)
        for serial in range(1, 6):
            at = NOW - 500 if serial <= 4 else NOW - 400  # all old; serial 5 is the newest of P01
            payload = {"site": "P01", "version": serial, "at": at, "message_id": 5000}
            store.upsert_site_data("status", f"P01:{serial}", "P01", serial, payload, at)
            store.set_watermark("P01", "status", f"P01:{serial}", 100 + serial)
        store.upsert_site_data("status", "P02:1", "P02", 1, {"site": "P02", "version": 1, "at": NOW - 1}, NOW)
        store.set_watermark("P01", "site_control", "S01:1", 102)  # applied before the cutoff
        store.set_watermark("P01", "site_control", "S01:2", 109)  # applied just now
        store.set_watermark("P01", "inventory", "c1", 103)
        store.upsert_site_data("inventory", "c1", "P01", 1, {"client": "c1", "version": 1}, NOW - 500)
        objects = [("P0100001", False, None), ("P0100002", True, NOW - 500), ("P0100003", True, NOW - 5),
                   ("P0100004", True, None)]
        for oid, deleted, deleted_at in objects:
            obj = {"id": oid, "kind": "package", "origin": "P01", "def_uid": oid.lower(), "name": oid,
                   "revision": 2, "deleted": deleted, **({"deleted_at": deleted_at} if deleted_at else {})}
            store.upsert_object(obj, via="P01", now=NOW - 500)
            store.set_watermark("P01", "package", oid, 90 + int(oid[-1]))
        store.add_status("scm", 5000, "info", "old", NOW - 500)
        store.add_status("scm", 5000, "info", "new", NOW - 5)
        store.record_drop("P01", 3, 103, 1, "stale", "status", "P01:3", "P01", "h3", NOW - 500)
        store.record_command("c-old", {"ok": True}, NOW - 500)
        store.record_command("c-new", {"ok": True}, NOW - 5)
    return store


def count(store: SiteStore, sql: str, *args: Any) -> int:
    return int(store.db.execute(sql, args).fetchone()[0])


def test_the_store_prunes_what_the_rules_let_go_and_keeps_the_rest(tmp_path: Path) -> None:
    store = hand_made(tmp_path)
    max_before = store.max_watermark("P01")
    with store.transaction():
        gone = store.prune(rules.cutoffs(rules.Retention(applied=60, status=60, tombstone=60), NOW))
    assert [s for (s,) in store.db.execute("SELECT seq FROM applied ORDER BY seq")] == [6, 7, 8, 9, 10]
    # status: the old ones go, the newest of P01 and the young one of P02 stay
    assert sorted(k for (k,) in store.db.execute("SELECT key FROM site_data WHERE data_class='status'")) == [
        "P01:5", "P02:1"]
    assert [t for (t,) in store.db.execute("SELECT text FROM status_messages")] == ["new"]
    # tombstones: the expired one goes with its ID history; the young one, the one without
    # deleted_at and the live object stay
    assert [i for (i,) in store.db.execute("SELECT id FROM objects ORDER BY id")] == [
        "P0100001", "P0100003", "P0100004"]
    assert count(store, "SELECT COUNT(*) FROM object_history WHERE id='P0100002'") == 0
    assert count(store, "SELECT COUNT(*) FROM drops") == 0
    assert [c for (c,) in store.db.execute("SELECT id FROM commands")] == ["c-new"]
    # the .trs rows of what went are folded into floors; the rest are kept
    wm = {(c, k) for c, k in store.db.execute("SELECT data_class, key FROM watermark")}
    assert wm == {("status", "P01:5"), ("site_control", "S01:2"), ("inventory", "c1"),
                  ("package", "P0100001"), ("package", "P0100003"), ("package", "P0100004")}
    assert store.floors() == {("P01", "status"): 104, ("P01", "site_control"): 102, ("P01", "package"): 92}
    assert gone["applied"] == 5 and gone["objects"] == 1 and gone["site_data"] == 4
    # nothing pruned can apply again: a replay of it is at or below the floor
    for cls, key, txn in (("status", "P01:2", 102), ("site_control", "S01:1", 102), ("package", "P0100002", 92)):
        assert txn <= store.watermark("P01", cls, key), (cls, key)
    # what P01 sends next (higher transaction IDs) applies; the recovery's maximum is unchanged
    assert store.watermark("P01", "status", "P01:6") < 111
    assert store.max_watermark("P01") == max_before
    store.close()
    # the floors are in the store: a restart (or a backup) keeps them
    again = SiteStore(tmp_path / "site.db")
    assert again.floors() == {("P01", "status"): 104, ("P01", "site_control"): 102, ("P01", "package"): 92}
    assert again.watermark("P01", "status", "P01:3") == 104
    again.prefetch("P01", [("status", "P01:3"), ("status", "P01:5")], [])
    assert again.watermark("P01", "status", "P01:3") == 104 and again.watermark("P01", "status", "P01:5") == 105
    assert snapshot(again).max_txn["P01"] == max_before
    again.close()


def test_pruning_twice_changes_nothing_more_and_zero_retention_prunes_nothing(tmp_path: Path) -> None:
    store = hand_made(tmp_path)
    with store.transaction():
        assert store.prune(rules.cutoffs(rules.Retention(applied=0, status=0, tombstone=0), NOW)) == {}
        store.prune(rules.cutoffs(rules.Retention(applied=60, status=60, tombstone=60), NOW))
    with store.transaction():
        assert store.prune(rules.cutoffs(rules.Retention(applied=60, status=60, tombstone=60), NOW)) == {}
    store.close()


def test_table_sizes_count_rows_and_bytes_of_every_table(tmp_path: Path) -> None:
    store = hand_made(tmp_path)
    sizes = store.table_sizes()
    assert sizes["applied"]["rows"] == 10 and sizes["objects"]["rows"] == 4
    assert all(t["bytes"] > 0 for t in sizes.values())
    store.close()


# -- the checker on pruned stores ----------------------------------------------------------------


def two_site_state(tmp_path: Path, *, child_status_at: float, owner_tombstone_at: float) -> LabState:
    """P01 holds a status message its parent CEN no longer holds; CEN owns a tombstone P01 no
    longer holds."""
    topo = Topology.model_validate({"lab": "t", "settings": {"status_retention": 60, "tombstone_lifetime": 60},
                                    "sites": [{"code": "CEN", "type": "central"},
                                              {"code": "P01", "type": "primary", "parent": "CEN"}]})
    cen, p01 = SiteStore(tmp_path / "cen.db"), SiteStore(tmp_path / "p01.db")
    with p01.transaction():
        p01.upsert_site_data("status", "P01:1", "P01", 1, {"version": 1, "at": child_status_at}, NOW)
        p01.upsert_site_data("status", "P01:2", "P01", 2, {"version": 2, "at": NOW}, NOW)
    with cen.transaction():
        cen.upsert_site_data("status", "P01:2", "P01", 2, {"version": 2, "at": NOW}, NOW)
        cen.upsert_object({"id": "CEN00001", "kind": "package", "origin": "CEN", "def_uid": "u", "name": "n",
                           "revision": 2, "deleted": True, "deleted_at": owner_tombstone_at}, via="CEN", now=NOW)
    return LabState(topo, {"CEN": snapshot(cen), "P01": snapshot(p01)}, {"CEN", "P01"}, now=NOW)


def test_the_checker_does_not_call_pruned_status_or_purged_tombstones_lost(tmp_path: Path) -> None:
    state = two_site_state(tmp_path / "a", child_status_at=NOW - 100, owner_tombstone_at=NOW - 100)
    assert site_data_lost(state) == [] and global_objects(state) == []


def test_the_checker_still_names_young_status_and_tombstones_that_went_missing(tmp_path: Path) -> None:
    state = two_site_state(tmp_path / "b", child_status_at=NOW - 10, owner_tombstone_at=NOW - 10)
    assert [v.kind for v in site_data_lost(state)] == ["lost"]
    assert [v.kind for v in global_objects(state)] == ["missing"]


# -- a simulated lab pruned under its workload ---------------------------------------------------


def retention_topology(tmp_path: Path, *, tombstone_lifetime: float) -> Topology:
    doc = yaml.safe_load((ROOT / "examples" / "lab.yaml").read_text())
    doc["defaults"]["workload"].update({"object_interval": 0.5, "max_objects": 4, "status_interval": 0.5})
    doc["settings"] = {**doc.get("settings", {}), "applied_retention": 5, "status_retention": 5,
                       "tombstone_lifetime": tombstone_lifetime, "retention_interval": 1, "history_retention": 0}
    path = tmp_path / "retention.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_topology(path)


def settle(lab: sim.SimLab, timeout: float = 120.0) -> list[str]:
    """Pause the workload, wait until the lab is valid (or the deadline: then the violations
    are returned), resume the workload."""
    for code in sorted(lab.running_codes()):
        assert lab.control(code, {"cmd": "pause-workload"})["ok"]
    last: list[str] = []

    def valid() -> bool:
        nonlocal last
        report = lab.check()
        last = [f"{v.kind} {v.site}: {v.detail}" for v in report.violations if v.hard or report.verdict != "valid"]
        return report.verdict == "valid"

    ok = lab.wait_for(valid, timeout=timeout, poll=1.0)
    for code in sorted(lab.running_codes()):
        assert lab.control(code, {"cmd": "resume-workload"})["ok"]
    return [] if ok else last


def query(lab: sim.SimLab, code: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    site = lab.sites[code]
    site.store.flush_pending()
    return site.store.db.execute(sql, args).fetchall()


def purged_tombstones(lab: sim.SimLab, code: str) -> int:
    """How many (sender, object class) floors a site has: > 0 once it purged a tombstone."""
    return int(query(lab, code, "SELECT COUNT(*) FROM watermark_floor WHERE data_class IN"
                                " ('package', 'advertisement', 'collection')")[0][0])


def test_a_pruned_lab_is_judged_valid_and_a_recovery_after_pruning_converges_valid(tmp_path: Path) -> None:
    lab = sim.SimLab(LabDir(tmp_path / "lab"), retention_topology(tmp_path, tombstone_lifetime=20), seed=3)
    lab.start_all()
    lab.run(40)
    # pruned everywhere: expired tombstones purged, old status messages and their .trs rows gone
    assert purged_tombstones(lab, "S01") > 0 and purged_tombstones(lab, "P01") > 0
    assert query(lab, "CEN", "SELECT txn FROM watermark_floor WHERE source='P01' AND data_class='status'")
    assert settle(lab) == []  # the checker: valid on a pruned lab
    before = lab.backup("P01")  # a backup of a pruned store, younger than the tombstone lifetime
    made = lab.now
    lab.run(10)
    # CEN remembers nothing it applied before the backup: the restored P01 reuses numbers CEN
    # can no longer tell from duplicates, and the recovery must not need them
    assert query(lab, "CEN", "SELECT MIN(at) FROM applied")[0][0] > made
    assert query(lab, "CEN", "SELECT COUNT(*) FROM site_data WHERE data_class='status' AND origin='P01'"
                 " AND json_extract(payload, '$.at') < ?", made)[0][0] <= 1

    lab.kill("P01")
    lab.recover("P01", backup_id=before.id)
    lab.run(5)
    assert settle(lab) == []
    assert query(lab, "P01", "SELECT v FROM meta WHERE k='recovery_phase'") == [("complete",)]
    lab.close()


def test_a_recovery_from_a_backup_older_than_the_tombstone_lifetime_brings_back_deleted_objects(
        tmp_path: Path) -> None:
    """AD's lingering objects: deleted after the backup, purged before the recovery, so nothing
    tells the restored site they were deleted. Not silent: the checker names them (``orphan``:
    held below, not at their owner any more)."""
    lab = sim.SimLab(LabDir(tmp_path / "lab"), retention_topology(tmp_path, tombstone_lifetime=8), seed=3)
    lab.start_all()
    lab.run(5)
    before = lab.backup("P01")
    lab.run(40)
    lab.kill("P01")
    lab.recover("P01", backup_id=before.id)
    lab.run(5)
    left = settle(lab, timeout=60)
    assert left and all(v.startswith("orphan ") for v in left), left
    lab.close()
