"""Merging the sites' histories into history.jsonl: nothing twice, nothing skipped, across
runs that wrote nothing, restores of a store to an older copy, pruning and the harness log."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

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


def test_a_process_that_only_merges_keeps_no_events_in_memory(tmp_path: Path) -> None:
    # the lab's daemon merges every second for the life of the lab: it held every event of the
    # history (1.3 GB after 460,000 events) when its first merge started the file
    lab_dir, info = lab(tmp_path)
    store = SiteStore(lab_dir.site_db("CEN"))
    for at in (0, 10, 20):
        write(store, "r1", 3, at=at)
        assert history.merge(lab_dir, info) == 3
    assert history.history_path(lab_dir).resolve() not in history._LOADED
    assert [e.index for e in history.load(lab_dir, info)] == list(range(1, 10))


def test_what_a_merge_appends_is_what_a_fresh_read_finds(tmp_path: Path) -> None:
    lab_dir, info = lab(tmp_path)
    store = SiteStore(lab_dir.site_db("CEN"))
    write(store, "r1", 4)
    history.load(lab_dir, info)
    write(store, "r1", 3, at=20, kind="sent")
    assert history.merge(lab_dir, info) == 3  # appended and kept by this process
    assert history.load(lab_dir, info, merge_first=False) == list(history.read(lab_dir))


def test_read_new_takes_whole_lines_once_while_another_process_appends(tmp_path: Path) -> None:
    """What ``history --follow`` prints: a line being written waits, nothing comes twice."""
    lab_dir, info = lab(tmp_path)
    store = SiteStore(lab_dir.site_db("CEN"))
    write(store, "r1", 3)
    history.merge(lab_dir, info)
    first, offset = history.read_new(lab_dir, 0)
    assert [e.index for e in first] == [1, 2, 3]
    path = history.history_path(lab_dir)
    line = history.Event(time=9.0, site="CEN", index=4, run="r1", kind="applied").to_json()
    with path.open("a") as handle:
        handle.write(line[:20])  # the daemon mid-write
    assert history.read_new(lab_dir, offset) == ([], offset)
    with path.open("a") as handle:
        handle.write(line[20:] + "\n")
    more, offset = history.read_new(lab_dir, offset)
    assert [e.index for e in more] == [4]
    assert history.read_new(lab_dir, offset) == ([], offset)


def test_the_history_command_filters_by_site_and_kind_and_prints_json(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from emulator.cli import main

    lab_dir, _ = lab(tmp_path)
    cen = SiteStore(lab_dir.site_db("CEN"))
    p01 = SiteStore(lab_dir.site_db("P01"))
    with p01.transaction():
        p01.begin_run("p", 1.0)
        for seq in (1, 2, 3):
            p01.add_event("p", 1.0 + seq, "sent", "P01->CEN", seq)
    with cen.transaction():
        cen.begin_run("c", 1.0)
        for seq in (1, 2, 3):
            cen.add_event("c", 1.5 + seq, "applied", "P01->CEN", seq)
    history.record(lab_dir, "fault_on", link="broker", fault="f1", at=2.0, detail={"kind": "alarm"})

    def run(*argv: str) -> list[dict[str, object]]:
        assert main(["--lab", str(lab_dir.path), "history", "--json", *argv]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    everything = run()
    assert [(e["site"], e["kind"]) for e in everything][:3] == [("P01", "sent"), ("lab", "fault_on"), ("CEN", "applied")]
    assert len(everything) == 7
    assert {e["kind"] for e in run("--kind", "applied")} == {"applied"}
    assert [e["seq"] for e in run("--kind", "sent", "--limit", "2")] == [2, 3]
    assert [e["kind"] for e in run("--kind", "fault_on", "--kind", "fault_off")] == ["fault_on"]
    assert [e["kind"] for e in run("--kind", "fault_on,fault_off")] == ["fault_on"]
    about_cen = run("--site", "CEN")  # at CEN, or on a link of CEN's
    assert len(about_cen) == 6 and all(e["site"] in ("CEN", "P01") for e in about_cen)
    assert {e["site"] for e in run("--site", "cen", "--kind", "sent")} == {"P01"}
    for wrong in (["--site", "X99"], ["--kind", "nope"], ["--kind", "applied,nope"]):
        assert main(["--lab", str(lab_dir.path), "history", *wrong]) == 2
        assert "unknown" in capsys.readouterr().err


def test_the_checker_reads_the_gap_a_prune_left_and_says_the_history_checks_are_incomplete(tmp_path: Path) -> None:
    from emulator import checker

    lab_dir, info = lab(tmp_path)
    store = SiteStore(lab_dir.site_db("CEN"))
    write(store, "r1", 10)
    with store.transaction():
        store.prune_events(before=6.0)  # history_retention let them go before anyone merged them
    state = checker.read_state(lab_dir, info, running=set(TOPOLOGY.codes))
    assert [(g.site, g.after, g.first_kept) for g in state.history.gaps] == [("CEN", 0, 7)]  # type: ignore[union-attr]
    gaps = checker.history_gaps(state)
    assert [v.kind for v in gaps] == ["history"] and "events 1..6 of CEN" in gaps[0].detail
    assert checker.judge(state).verdict != "valid"


def test_the_history_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path: Path) -> None:
    import subprocess
    import sys

    lab_dir, info = lab(tmp_path)
    write(SiteStore(lab_dir.site_db("CEN")), "r1", 5000)
    history.merge(lab_dir, info)
    shown = subprocess.Popen([sys.executable, "-m", "emulator", "--lab", str(lab_dir.path), "history"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert shown.stdout is not None and shown.stderr is not None
    assert shown.stdout.readline()  # smslab history | head -1
    shown.stdout.close()
    err = shown.stderr.read().decode()
    assert shown.wait(timeout=60) == 141 and "Traceback" not in err, err


def test_history_follow_ends_when_its_reader_stops_even_if_nothing_new_comes(tmp_path: Path) -> None:
    """``smslab history --follow | head -1`` on a quiet lab: the closed pipe is noticed without a
    line to write into it; the command ends quietly (141, no traceback) instead of following forever."""
    import subprocess
    import sys

    lab_dir, info = lab(tmp_path)
    write(SiteStore(lab_dir.site_db("CEN")), "r1", 50)
    history.merge(lab_dir, info)
    shown = subprocess.Popen([sys.executable, "-m", "emulator", "--lab", str(lab_dir.path), "history", "--follow",
                              "--limit", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert shown.stdout is not None and shown.stderr is not None
    try:
        assert shown.stdout.readline()
        shown.stdout.close()
        code = shown.wait(timeout=20)
    finally:
        if shown.poll() is None:
            shown.kill()
            shown.wait()
    err = shown.stderr.read().decode()
    assert code == 141 and "Traceback" not in err, err
