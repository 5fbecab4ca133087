"""Merging the sites' histories into history.jsonl: nothing twice, nothing skipped, across
runs that wrote nothing, restores of a store to an older copy, pruning and the harness log."""

from __future__ import annotations

import shutil
from pathlib import Path

from emulator import history
from emulator.lab import LabDir, LabInfo
from emulator.topology import parse_topology
from sites.store import SiteStore

TOPOLOGY = parse_topology("""
lab: hist
sites:
  - {code: CEN, type: central, clients: 0}
  - {code: P01, type: primary, parent: CEN}
""")


def lab(tmp_path: Path) -> tuple[LabDir, LabInfo]:
    lab_dir = LabDir(tmp_path / "lab")
    info = LabInfo(lab_id="hist-1", amqp_url="memory://", created=0.0, topology=TOPOLOGY)
    lab_dir.save(info)
    return lab_dir, info


def write(store: SiteStore, run: str, n: int, at: float = 0.0, kind: str = "applied") -> None:
    with store.transaction():
        store.begin_run(run, at)
        for i in range(n):
            store.add_event(run, at + i, kind, "P01->CEN", i + 1)


def merged(lab_dir: LabDir) -> list[tuple[str, str, int]]:
    return [(e.site, e.run, e.index) for e in history.read(lab_dir)]


def test_a_merge_takes_each_event_once(tmp_path: Path) -> None:
    lab_dir, info = lab(tmp_path)
    store = SiteStore(lab_dir.site_db("CEN"))
    write(store, "r1", 3)
    assert history.merge(lab_dir, info) == 3
    assert history.merge(lab_dir, info) == 0
    write(store, "r1", 2, at=10)
    assert history.merge(lab_dir, info) == 2
    assert [i for _, _, i in merged(lab_dir)] == [1, 2, 3, 4, 5]


def test_a_run_that_wrote_nothing_does_not_make_the_next_one_merge_twice(tmp_path: Path) -> None:
    lab_dir, info = lab(tmp_path)
    store = SiteStore(lab_dir.site_db("CEN"))
    write(store, "r1", 2)
    with store.transaction():
        store.begin_run("dead", 5.0)  # killed before its first event: same first index as the next
    write(store, "r2", 3, at=6)
    for _ in range(4):
        history.merge(lab_dir, info)
    assert [(r, i) for _, r, i in merged(lab_dir)] == [("r1", 1), ("r1", 2), ("r2", 3), ("r2", 4), ("r2", 5)]


def test_a_store_restored_to_an_older_copy_neither_skips_nor_repeats(tmp_path: Path) -> None:
    lab_dir, info = lab(tmp_path)
    db = lab_dir.site_db("P01")
    store = SiteStore(db)
    write(store, "r1", 5)
    store.backup_to(tmp_path / "backup.db")
    write(store, "r1", 5, at=10)  # indices 6..10, merged, then lost with the restore
    assert history.merge(lab_dir, info) == 10
    store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(tmp_path / "backup.db", db)
    store = SiteStore(db)
    write(store, "r2", 4, at=20)  # indices 6..9 again, of a new run
    assert history.merge(lab_dir, info) == 4
    assert history.merge(lab_dir, info) == 0
    runs = [(r, i) for _, r, i in merged(lab_dir)]
    assert runs[-4:] == [("r2", 6), ("r2", 7), ("r2", 8), ("r2", 9)] and len(runs) == 14


def test_events_pruned_before_they_were_merged_are_a_recorded_gap(tmp_path: Path) -> None:
    lab_dir, info = lab(tmp_path)
    store = SiteStore(lab_dir.site_db("CEN"))
    write(store, "r1", 10)
    with store.transaction():
        assert store.prune_events(before=6.0) == 6
    assert history.merge(lab_dir, info) == 4
    state = history.load_state(lab_dir)
    assert [(g.site, g.after, g.first_kept) for g in state.gaps] == [("CEN", 0, 7)]
    history.merge(lab_dir, info)
    assert len(history.load_state(lab_dir).gaps) == 1, "a gap is recorded once"


def test_harness_events_merge_with_the_sites_in_time_order(tmp_path: Path) -> None:
    lab_dir, info = lab(tmp_path)
    store = SiteStore(lab_dir.site_db("CEN"))
    write(store, "r1", 3, at=100)  # at 100, 101, 102
    history.record(lab_dir, "fault_on", link="P01<->CEN", fault="f1", at=101.5, detail={"kind": "partition"})
    history.merge(lab_dir, info)
    events = list(history.read(lab_dir))
    assert [e.kind for e in events] == ["applied", "applied", "fault_on", "applied"]
    assert events[2].fault == "f1" and events[2].site == history.HARNESS
    assert "fault f1" in history.render(events[2])


def test_load_reads_what_was_appended_since_and_a_replaced_file_again(tmp_path: Path) -> None:
    lab_dir, info = lab(tmp_path)
    store = SiteStore(lab_dir.site_db("CEN"))
    write(store, "r1", 3)
    assert [e.index for e in history.load(lab_dir, info)] == [1, 2, 3]
    write(store, "r1", 2, at=10)
    first = history.load(lab_dir, info)
    assert [e.index for e in first] == [1, 2, 3, 4, 5]
    first.clear()  # a caller's list is its own
    assert len(history.load(lab_dir, info)) == 5
    path = history.history_path(lab_dir)
    with path.open("a") as handle:  # a writer mid-line: only whole lines are taken
        handle.write('{"time": 1.0, "site": "CEN"')
    assert len(history.load(lab_dir, info, merge_first=False)) == 5
    lines = path.read_text().splitlines(keepends=True)[:2]
    replacement = path.with_suffix(".new")
    replacement.write_text("".join(lines))
    replacement.replace(path)  # another file under the same name
    assert [e.index for e in history.load(lab_dir, info, merge_first=False)] == [1, 2]


def test_what_a_merge_appends_is_what_a_fresh_read_finds(tmp_path: Path) -> None:
    lab_dir, info = lab(tmp_path)
    store = SiteStore(lab_dir.site_db("CEN"))
    write(store, "r1", 4)
    history.load(lab_dir, info)
    write(store, "r1", 3, at=20, kind="sent")
    assert history.merge(lab_dir, info) == 3  # appended and kept by this process
    assert history.load(lab_dir, info, merge_first=False) == list(history.read(lab_dir))
