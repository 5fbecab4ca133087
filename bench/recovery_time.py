"""Recovery time of a primary restored from an old backup: handshake plus resynchronization.

    python bench/recovery_time.py [--records 100000] [--after 10000] [--amqp URL]
                                  [--deadline S] [--profile DIR] [--json]

A benchmark, not a test: it prints figures and asserts nothing about them.

1. A three-site lab (CEN central, P01 primary under CEN, S01 secondary under P01, no clients,
   every workload interval 0, default settings) is brought up with the orchestrator.
2. S01 is told to ``burst`` N inventory envelopes of N distinct synthetic clients (version 1),
   and the run waits until CEN holds all N records of S01 and every outbox is empty.
3. P01 is backed up (``emulator.backup.create``, what ``smslab backup P01`` does).
   Its rate (records / fill time) is the link's steady rate on the path the recovery takes;
   the report gives the recovery's rate as a ratio of it (goal: at least 1.0).
4. A second burst of A envelopes goes through P01 after the backup, so the backup is A
   envelopes old. ``_burst`` numbers versions from 1 in every command (version =
   n // keys + 1), so the second burst uses ``keys = A // 2``: its first half re-sends
   version 1 of clients 0..A/2-1 (same content, newer transaction IDs), its second half
   carries version 2 of them, data newer than anything in the backup. The run waits until
   CEN holds those versions and every outbox is empty.
5. P01 is killed (SIGKILL). The clock starts at the call of ``emulator.recover.recover(lab,
   'P01', backup_id=...)`` (verify and restore the backup, start the agent, announce,
   counters, resync, complete), and stops when ``emulator.checker.check`` first returns
   ``valid`` after it. The checker does not look at the burst's synthetic clients (they are
   in no ``clients.db``), so the run also compares CEN's and P01's inventory with S01's
   (the originator) record by record, and reports when that was true.
6. Per phase, read afterwards from the stores: P01's status messages (5300 recovery started,
   5301 counters, 5302 complete), CEN's 5320 (subtree data reinitialized), the ``applied``
   log of P01 (S01's resync) and of CEN (what P01 forwarded), with their timestamps.

``--profile DIR`` also runs ``py-spy record`` (raw, no line numbers, non-blocking) on CEN and
S01 from the kill and on P01 from its spawn until the lab is valid, writes the raw stacks to
DIR and prints each site's top functions (self and inclusive, % of on-CPU samples). Profile
in a separate run from the one you quote figures from: the samplers share the CPUs.

The lab and every broker object it made are deleted at the end, also on errors, Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

# bench/ on sys.path for _common, which puts this checkout first on sys.path and on PYTHONPATH
# (the site processes are started with ``python -m sites``) before broker/, emulator/, sites/.
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from _common import (
    BenchError,
    BusyMeter,
    add_amqp_option,
    add_json_option,
    broker_pids,
    busy_before_run,
    check_sites_alive,
    cpu_deltas,
    cpu_seconds,
    cpu_snapshot,
    fmt_pct,
    fmt_s,
    log,
    machine_facts,
    run_cli,
    temp_lab,
)

from broker import admin
from emulator import backup, checker, orchestrator, recover
from emulator.lab import LabDir, LabInfo
from sites import status_ids as sid

POLL = 0.25  # seconds between two looks at the stores while filling (COUNT over N rows)
CHECK_POLL = 0.05  # seconds between two checker runs after the recover call
SITES = ("CEN", "P01", "S01")
BURST_CHUNK = 2000

TOPOLOGY = """\
# written by bench/recovery_time.py: a primary with a secondary, no workload, only the bursts
lab: bench-recovery
mode: sms20
defaults:
  clients: 0
  workload:
    inventory_interval: 0
    discovery_interval: 0
    status_interval: 0
    object_interval: 0
    scf_interval: 0
sites:
  - code: CEN
    type: central
    clients: 0
  - code: P01
    type: primary
    parent: CEN
    clients: 0
  - code: S01
    type: secondary
    parent: P01
    clients: 0
"""


# ----------------------------------------------------------------------------------------
# reading the stores (read-only, a fresh connection per look: P01's file is replaced by
# the restore, so a connection kept open would go on reading the old one)
# ----------------------------------------------------------------------------------------


def query(lab_dir: LabDir, site: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{lab_dir.site_db(site)}?mode=ro", uri=True, timeout=10)
    try:
        conn.execute("PRAGMA busy_timeout=10000")
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def one(lab_dir: LabDir, site: str, sql: str, *args: Any) -> Any:
    rows = query(lab_dir, site, sql, *args)
    return rows[0][0] if rows else None


def link_state(lab_dir: LabDir, site: str, peer: str) -> dict[str, Any]:
    state = one(lab_dir, site, "SELECT state FROM link WHERE peer=?", peer)
    return json.loads(state) if state else {}


def outboxes(lab_dir: LabDir) -> dict[str, int]:
    return {code: one(lab_dir, code, "SELECT COUNT(*) FROM outbox") or 0 for code in SITES}


def inventory_of(lab_dir: LabDir, site: str, origin: str = "S01") -> dict[str, int]:
    return dict(query(lab_dir, site, "SELECT key, version FROM site_data"
                      " WHERE data_class='inventory' AND origin=?", origin))


def inventory_count(lab_dir: LabDir, site: str, min_version: int = 1) -> int:
    return int(one(lab_dir, site, "SELECT COUNT(*) FROM site_data WHERE data_class='inventory'"
                   " AND origin='S01' AND version>=?", min_version) or 0)


def differences(want: dict[str, int], have: dict[str, int]) -> dict[str, int]:
    return {
        "missing": sum(1 for k in want if k not in have),
        "older": sum(1 for k, v in want.items() if k in have and have[k] < v),
        "newer": sum(1 for k, v in want.items() if k in have and have[k] > v),
        "extra": sum(1 for k in have if k not in want),
    }


def wait_until(what: str, lab_dir: LabDir, done: Any, deadline: float,
               describe: Any = None, poll: float = POLL) -> float:
    """Poll ``done()`` until true; the seconds it took. Fails at the deadline or if a site exits."""
    t0 = time.monotonic()
    last_report = t0
    while True:
        if done():
            return time.monotonic() - t0
        now = time.monotonic()
        check_sites_alive(lab_dir, SITES, what)
        if now - t0 > deadline:
            raise BenchError(f"{what}: not done within {deadline:.0f}s"
                             + (f" ({describe()})" if describe else ""))
        if describe and now - last_report >= 5:
            last_report = now
            log(f"{what}: {now - t0:5.1f}s  {describe()}")
        time.sleep(poll)


# ----------------------------------------------------------------------------------------
# py-spy (--profile)
# ----------------------------------------------------------------------------------------


class Profiler:
    """``py-spy record`` of the three sites; P01's sampler starts when its new process does."""

    def __init__(self, out_dir: Path | None) -> None:
        self.out_dir = out_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, float] = {}
        self._watch: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, code: str, pid: int) -> None:
        if self.out_dir is None:
            return
        out = self.out_dir / f"{code}.txt"
        with open(self.out_dir / f"{code}.py-spy.log", "wb") as err:  # the child keeps its copy
            self.procs[code] = subprocess.Popen(
                ["py-spy", "record", "-p", str(pid), "-o", str(out), "--format", "raw", "--nolineno",
                 "--nonblocking", "--rate", "100"],
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            )
        self.started[code] = time.monotonic()

    def start_when_spawned(self, lab_dir: LabDir, code: str, old_pid: int | None) -> None:
        if self.out_dir is None:
            return

        def watch() -> None:
            while not self._stop.is_set():
                pid = lab_dir.pid(code)
                if pid and pid != old_pid:
                    self.start(code, pid)
                    return
                time.sleep(0.005)

        self._watch = threading.Thread(target=watch, daemon=True)
        self._watch.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._watch is not None:
            self._watch.join(timeout=5)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self.out_dir is None:
            return {}
        return {code: summarize_stacks(self.out_dir / f"{code}.txt") for code in self.procs}


def _frame_name(frame: str) -> str:
    # "flush (sites/runtime.py)" -> "sites/runtime.py:flush"
    name, _, rest = frame.partition(" (")
    return f"{rest.rstrip(')')}:{name}" if rest else name


def summarize_stacks(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive % of samples per function, from py-spy's raw (collapsed) output."""
    if not path.exists():
        return {"error": f"{path} was not written (see {path.with_suffix('.py-spy.log')})"}
    self_count: Counter[str] = Counter()
    incl_count: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith("process ")]  # py-spy's process label
        if not frames:
            continue
        total += count
        self_count[frames[-1]] += count
        for f in set(frames):
            incl_count[f] += count

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100 * n / total, 1)) for f, n in c.most_common(top)] if total else []

    # Inclusive: this checkout's functions, without the entry points every sample goes through.
    ours = Counter({f: n for f, n in incl_count.items()
                    if f.startswith(("sites/", "emulator/", "broker/")) and n < 0.97 * total})
    return {"samples": total, "file": str(path), "self": pct(self_count), "inclusive": pct(ours)}


# ----------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------


def run(url: str, records: int, after: int, deadline: float, profile_dir: Path | None) -> dict[str, Any]:
    profiler = Profiler(profile_dir)
    with temp_lab("smslab-bench-recovery-", TOPOLOGY) as (topo, lab_dir):
        try:
            log(f"bringing up CEN, P01 (primary), S01 (secondary) in {lab_dir.path}")
            t = time.monotonic()
            info = orchestrator.up(topo, lab_dir, url, progress=lambda m: log(m.strip()))
            log(f"lab {info.lab_id} up in {time.monotonic() - t:.1f}s")
            return _measure(url, info, lab_dir, records, after, deadline, profiler)
        finally:
            profiler.stop()  # before the lab goes down


def _burst(_url: str, info: LabInfo, count: int, keys: int) -> None:
    # as the lab's controller (info.amqp_url): in a lab with per-site identities a site takes
    # commands from no one else
    answer = admin.control_request(info.amqp_url, info.lab_id, "S01", {
        "cmd": "burst", "count": count, "keys": keys, "chunk": BURST_CHUNK}, timeout=30)
    if not answer.get("ok", False):
        raise BenchError(f"S01 refused the burst: {answer}")


def _measure(url: str, info: LabInfo, lab_dir: LabDir, records: int, after: int,
             deadline: float, profiler: Profiler) -> dict[str, Any]:
    # -- 2. fill: N distinct records in S01's subtree, all the way to CEN --------------------
    def fill_state() -> str:
        return (f"CEN holds {inventory_count(lab_dir, 'CEN'):,}/{records:,},"
                f" P01 holds {inventory_count(lab_dir, 'P01'):,}, outboxes {outboxes(lab_dir)}")

    log(f"fill: burst of {records:,} records (keys {records:,}, chunk {BURST_CHUNK}) from S01")
    _burst(url, info, records, records)
    fill_s = wait_until(
        "fill", lab_dir,
        lambda: inventory_count(lab_dir, "CEN") >= records and not any(outboxes(lab_dir).values()),
        deadline, fill_state)
    log(f"fill: CEN holds all {records:,} records, outboxes empty, in {fill_s:.1f}s"
        f" ({records / fill_s:,.0f} records/s over two hops)")

    # -- 3. the backup ----------------------------------------------------------------------
    t = time.monotonic()
    record = backup.create(lab_dir, info, "P01")
    backup_s = time.monotonic() - t
    backup_bytes = (lab_dir.backup_dir(record.id) / "site.db").stat().st_size
    log(f"backup {record.id}: {backup_bytes / 1e6:.1f} MB in {backup_s:.2f}s"
        f" (P01 transaction ID {record.txn_id})")

    # -- 4. A envelopes through P01 after the backup ----------------------------------------
    keys2 = max(1, after // 2)
    final: dict[int, int] = {}
    for n in range(after):  # what _burst makes: client n % keys, version n // keys + 1
        final[n % keys2] = n // keys2 + 1
    newer = sum(1 for v in final.values() if v >= 2)
    cen_from_p01 = link_state(lab_dir, "CEN", "P01")["next_expected"] - 1
    log(f"after: burst of {after:,} envelopes (keys {keys2:,}): {newer:,} of them carry version 2")
    _burst(url, info, after, keys2)
    after_s = wait_until(
        "after", lab_dir,
        lambda: (link_state(lab_dir, "CEN", "P01")["next_expected"] - 1 >= cen_from_p01 + after
                 and inventory_count(lab_dir, "CEN", 2) >= newer
                 and not any(outboxes(lab_dir).values())),
        deadline,
        lambda: (f"CEN applied {link_state(lab_dir, 'CEN', 'P01')['next_expected'] - 1 - cen_from_p01:,}"
                 f"/{after:,} from P01, holds {inventory_count(lab_dir, 'CEN', 2):,}/{newer:,} at version 2"))
    log(f"after: CEN applied them in {after_s:.1f}s")

    # How old the backup is, in each link's sequence numbers.
    p01_cen = link_state(lab_dir, "P01", "CEN")
    p01_s01 = link_state(lab_dir, "P01", "S01")
    age = {
        "P01->CEN": p01_cen["next_send_seq"] - record.links["CEN"]["next_send_seq"],
        "S01->P01": p01_s01["next_expected"] - record.links["S01"]["next_expected"],
        "txn_id": int(one(lab_dir, "P01", "SELECT v FROM meta WHERE k='txn_id'")) - record.txn_id,
    }
    truth = inventory_of(lab_dir, "S01")  # the originator's records: what CEN must hold
    if len(truth) != records:
        raise BenchError(f"S01 holds {len(truth)} inventory records, expected {records}")
    held = differences(truth, inventory_of(lab_dir, "CEN"))
    if any(held.values()):
        raise BenchError(f"before the kill, CEN does not hold S01's records: {held}")
    log(f"backup age: {age}")

    # -- 5. kill P01, recover it from the backup, until the checker says valid ---------------
    sites_pids = {code: lab_dir.pid(code) for code in ("CEN", "S01")}
    beam = broker_pids()
    old_p01 = orchestrator.kill(lab_dir, "P01")
    log(f"killed P01 (pid {old_p01})")
    for code, pid in sites_pids.items():
        if pid:
            profiler.start(code, pid)
    profiler.start_when_spawned(lab_dir, "P01", old_p01)
    cpu0 = cpu_snapshot(sites_pids, beam)
    busy = BusyMeter()
    bench_cpu0 = time.process_time()

    marks: list[tuple[float, str]] = []

    def progress(msg: str) -> None:
        marks.append((time.time(), msg.strip()))
        log(f"recover: {msg.strip()}")

    busy.start()
    w0 = time.time()
    t0 = time.monotonic()
    recover.recover(lab_dir, "P01", backup_id=record.id, timeout=deadline, progress=progress)
    t_returned = time.monotonic()
    new_p01 = lab_dir.pid("P01")
    checks = 0
    check_s: list[float] = []
    while True:
        c0 = time.monotonic()
        report = checker.check(lab_dir, info)
        c1 = time.monotonic()
        checks += 1
        check_s.append(c1 - c0)
        if report.verdict == "valid":
            break
        if c1 - t0 > deadline:
            raise BenchError(f"the lab was not valid {deadline:.0f}s after the recover call:\n"
                             + report.render(limit=10))
        if lab_dir.pid("P01") is None:
            raise BenchError(f"P01 exited after its recovery; see {lab_dir.log_file('P01')}")
        time.sleep(CHECK_POLL)
    t_valid = c1
    busy_frac = busy.stop()
    bench_cpu = time.process_time() - bench_cpu0
    cpu = cpu_deltas(cpu0, cpu_snapshot(sites_pids, beam))
    cpu["P01"] = round(cpu_seconds([new_p01]) or 0, 3) if new_p01 else None  # all of its life
    cpu["bench_checker"] = round(bench_cpu, 3)
    profile = profiler.stop()
    total_s = t_valid - t0
    recover_s = t_returned - t0
    log(f"valid {total_s:.2f}s after the recover call (recover returned at {recover_s:.2f}s,"
        f" {checks} checker run(s))")

    # The records themselves (the checker does not look at the burst's synthetic clients).
    d = time.monotonic()
    cen_diff = differences(truth, inventory_of(lab_dir, "CEN"))
    p01_diff = differences(truth, inventory_of(lab_dir, "P01"))
    data_complete_at_valid = not any(cen_diff.values()) and not any(p01_diff.values())
    data_s: float | None = None
    if data_complete_at_valid:
        data_s = total_s
    else:
        log(f"WARNING: valid, but CEN differs from S01: {cen_diff}; P01: {p01_diff}; waiting")
        wait_until("data", lab_dir, lambda: not any(differences(truth, inventory_of(lab_dir, "CEN")).values())
                   and not any(differences(truth, inventory_of(lab_dir, "P01")).values()),
                   deadline, lambda: str(differences(truth, inventory_of(lab_dir, "CEN"))), poll=0.5)
        data_s = time.monotonic() - t0
        cen_diff = differences(truth, inventory_of(lab_dir, "CEN"))
        p01_diff = differences(truth, inventory_of(lab_dir, "P01"))
    data_check_s = time.monotonic() - d

    # -- 6. phases, read from the stores ----------------------------------------------------
    def rel(at: float | None) -> float | None:
        return round(at - w0, 3) if at is not None else None

    def mark(text: str) -> float | None:
        return next((rel(at) for at, m in marks if text in m), None)

    status = {mid: rel(at) for mid, at in query(
        lab_dir, "P01", "SELECT message_id, MIN(at) FROM status_messages WHERE at>=?"
        " AND message_id IN (?, ?, ?) GROUP BY message_id",
        w0, sid.RECOVERY_STARTED, sid.RECOVERY_PHASE, sid.RECOVERY_COMPLETE)}
    cen_reinit = query(lab_dir, "CEN", "SELECT MIN(at), text FROM status_messages WHERE at>=?"
                       " AND message_id=?", w0, sid.SITE_DELETED)
    applied = {}
    for site, source in (("P01", "S01"), ("CEN", "P01")):
        # One row per batch (``at`` is the batch's time): the records' stream and its stalls.
        batches = query(lab_dir, site, "SELECT at, COUNT(*) FROM applied WHERE source=? AND at>=?"
                        " AND data_class='inventory' GROUP BY at ORDER BY at", source, w0)
        n = sum(c for _, c in batches)
        first: float | None = batches[0][0] if batches else None
        last: float | None = batches[-1][0] if batches else None
        gap, gap_at = max(((b[0] - a[0], a[0]) for a, b in itertools.pairwise(batches)), default=(0.0, None))
        span = last - first if first is not None and last is not None else 0.0
        applied[f"{source}->{site}"] = {
            "envelopes": one(lab_dir, site, "SELECT COUNT(*) FROM applied WHERE source=? AND at>=?",
                             source, w0),
            "inventory": n, "batches": len(batches), "first_s": rel(first), "last_s": rel(last),
            "per_s": round(n / span, 1) if n and span > 0 else None,
            "max_gap_s": round(gap, 3), "max_gap_after_s": rel(gap_at),
            "per_half_second": _bins([(a - w0, c) for a, c in batches], 0.5),
        }
    drops = {site: dict(query(lab_dir, site, "SELECT reason, COUNT(*) FROM drops WHERE at>=?"
                              " GROUP BY reason", w0)) for site in SITES}
    links = {}
    for site, peer in (("P01", "S01"), ("P01", "CEN"), ("CEN", "P01"), ("S01", "P01")):
        st = link_state(lab_dir, site, peer)
        links[f"{site}<-{peer}"] = {k: st.get(k) for k in ("duplicates", "stale", "gaps", "resends")}
    phases = {
        "restored": mark("restored P01 from backup"),
        "agent_spawned": mark("the agent joins"),
        "agent_started_5300": status.get(sid.RECOVERY_STARTED),
        "counters_5301": status.get(sid.RECOVERY_PHASE),
        "cen_reinitialized_5320": rel(cen_reinit[0][0]) if cen_reinit and cen_reinit[0][0] else None,
        "records_first_applied_at_p01": applied["S01->P01"]["first_s"],
        "records_last_applied_at_p01": applied["S01->P01"]["last_s"],
        "records_first_applied_at_cen": applied["P01->CEN"]["first_s"],
        "records_last_applied_at_cen": applied["P01->CEN"]["last_s"],
        "complete_5302": status.get(sid.RECOVERY_COMPLETE),
        "recover_returned": round(recover_s, 3),
        "checker_valid": round(total_s, 3),
    }
    resynced = records  # every record of S01's subtree travels S01 -> P01 -> CEN again
    return {
        "records": records,
        "after": after,
        "after_keys": keys2,
        "after_newer_versions": newer,
        "backup_id": record.id,
        "backup_bytes": backup_bytes,
        "backup_s": round(backup_s, 3),
        "backup_age": age,
        "fill_s": round(fill_s, 3),
        "after_s": round(after_s, 3),
        "total_s": round(total_s, 3),
        "recover_s": round(recover_s, 3),
        "after_recover_s": round(total_s - recover_s, 3),
        "records_per_s": round(resynced / total_s, 1),
        # the same records on the same path (S01 -> P01 -> CEN) at steady state, in this run
        "link_per_s": round(records / fill_s, 1),
        "recovery_to_link": round((resynced / total_s) / (records / fill_s), 3),
        "checker_runs": checks,
        "checker_last_s": round(check_s[-1], 3),
        "data_complete_at_valid": data_complete_at_valid,
        "data_complete_s": round(data_s, 3) if data_s is not None else None,
        "data_check_s": round(data_check_s, 3),
        "cen_vs_s01": cen_diff,
        "p01_vs_s01": p01_diff,
        "phases_s": phases,
        "cen_reinitialized": cen_reinit[0][1] if cen_reinit and cen_reinit[0][1] else None,
        "applied": applied,
        "drops": drops,
        "links": links,
        "cpu_s": cpu,
        "cpu_busy_during": busy_frac,
        "profile": profile,
    }


def _bins(points: list[tuple[float, int]], width: float) -> dict[str, int]:
    bins: dict[str, int] = {}
    for t, n in points:
        key = f"{int(t // width) * width:.1f}"
        bins[key] = bins.get(key, 0) + n
    return bins


# ----------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------


def print_table(report: dict[str, Any]) -> None:
    r, m = report["run"], report["machine"]
    goal = report["goal_s"]
    print(f"smslab recovery time: P01 restored from a backup {r['backup_age']['P01->CEN']:,} envelopes old"
          f" (P01->CEN), its subtree holding {r['records']:,} inventory records")
    rows = [
        ("total: recover call + until checker valid", f"{r['total_s']:.2f} s",
         "under the goal" if r["total_s"] < goal else f"OVER the {goal:.0f} s goal"),
        ("  recover call (restore..complete)", f"{r['recover_s']:.2f} s", ""),
        ("  after it, until valid", f"{r['after_recover_s']:.2f} s",
         f"{r['checker_runs']} checker run(s), last took {r['checker_last_s']:.2f} s"),
        ("records resynchronized / s", f"{r['records_per_s']:,.0f}", f"{r['records']:,} / total"),
        ("steady link, same path / s", f"{r['link_per_s']:,.0f}", "the fill: S01 -> P01 -> CEN, this run"),
        ("recovery rate / link rate", f"{r['recovery_to_link']:.2f}", "goal >= 1.0"),
        ("records complete at CEN and P01", f"{fmt_s(r['data_complete_s'])} s",
         "at valid" if r["data_complete_at_valid"] else "AFTER valid"),
    ]
    w0 = max(len(a) for a, _, _ in rows)
    for a, b, c in rows:
        print(f"  {a:<{w0}}  {b:>10}  {c}".rstrip())
    print("  phases, seconds from the recover call (P01 status messages, applied logs):")
    labels = {
        "restored": "backup verified and restored",
        "agent_spawned": "agent process spawned",
        "agent_started_5300": "5300 recovery started (store open)",
        "counters_5301": "5301 counters (every report in)",
        "cen_reinitialized_5320": "5320 CEN reinitialized P01's subtree",
        "records_first_applied_at_p01": "records: first applied at P01",
        "records_first_applied_at_cen": "records: first applied at CEN",
        "records_last_applied_at_p01": "records: last applied at P01",
        "records_last_applied_at_cen": "records: last applied at CEN",
        "complete_5302": "5302 recovery complete",
        "recover_returned": "recover() returned",
        "checker_valid": "checker valid",
    }
    w1 = max(len(v) for v in labels.values())
    print(f"    {'':<{w1}}  {'at':>7}  {'step':>6}")
    prev = 0.0
    for k, label in labels.items():
        at = r["phases_s"].get(k)
        step = f"{at - prev:+.2f}" if at is not None else ""
        print(f"    {label:<{w1}}  {fmt_s(at):>7}  {step:>6}")
        prev = at if at is not None else prev
    for name, a in r["applied"].items():
        rate = f", {a['per_s']:,.0f}/s" if a["per_s"] else ""
        print(f"  applied {name}: {a['inventory']:,} records ({a['envelopes']:,} envelopes in all)"
              f" in {a['batches']} batches between {fmt_s(a['first_s'])} and {fmt_s(a['last_s'])} s{rate};"
              f" longest pause {a['max_gap_s']:.2f} s after {fmt_s(a['max_gap_after_s'])} s")
    print(f"  CEN vs S01 after: {r['cen_vs_s01']}; P01 vs S01: {r['p01_vs_s01']}")
    drops = {k: v for k, v in r["drops"].items() if v}
    print(f"  drops during the recovery: {drops or 'none'}; links: "
          + "; ".join(f"{k} {v}" for k, v in r["links"].items()))
    c = r["cpu_s"]
    print(f"  CPU s from the kill to valid ({r['total_s']:.2f} s wall, machine {fmt_pct(r['cpu_busy_during'])} busy):"
          f" P01 {fmt_s(c.get('P01'))}, CEN {fmt_s(c.get('CEN'))}, S01 {fmt_s(c.get('S01'))},"
          f" broker {fmt_s(c.get('broker'))}, bench (checker) {fmt_s(c.get('bench_checker'))}")
    print(f"  setup: fill {r['records']:,} records in {r['fill_s']:.1f} s; backup"
          f" {r['backup_bytes'] / 1e6:.1f} MB in {r['backup_s']:.2f} s; {r['after']:,} envelopes after it"
          f" ({r['after_newer_versions']:,} at version 2) in {r['after_s']:.1f} s; backup age {r['backup_age']}")
    print(f"  machine: {m['cores']} cores ({m['cpu'] or '?'}), python {m['python']}, pika {m['pika']},"
          f" SQLite {m['sqlite']}, RabbitMQ {m['rabbitmq'] or '?'}, busy before {fmt_pct(m['cpu_busy_before'])},"
          f" commit {m['commit'] or '?'}")
    for code, prof in (r.get("profile") or {}).items():
        if "error" in prof:
            print(f"  py-spy {code}: {prof['error']}")
            continue
        print(f"  py-spy {code}: {prof['samples']:,} on-CPU samples ({prof['file']})")
        print("    self:      " + "; ".join(f"{f} {p}%" for f, p in prof["self"][:10]))
        print("    inclusive: " + "; ".join(f"{f} {p}%" for f, p in prof["inclusive"][:12]))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    load = busy_before_run(args.amqp)
    result = run(args.amqp, args.records, args.after, args.deadline, args.profile)
    return {"goal_s": args.goal, "run": result,
            "machine": machine_facts(args.amqp, load, sqlite=True, commit=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100000,
                        help="distinct inventory records in P01's subtree (default 100000)")
    parser.add_argument("--after", type=int, default=10000,
                        help="envelopes through P01 after the backup (default 10000)")
    add_amqp_option(parser)
    parser.add_argument("--deadline", type=float, default=600.0,
                        help="seconds each wait (fill, recovery) may take before the run fails (default 600)")
    parser.add_argument("--goal", type=float, default=20.0, help="the product goal, seconds (default 20)")
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="also run py-spy on the three sites during the recovery; raw stacks to DIR")
    add_json_option(parser)
    args = parser.parse_args(argv)
    if args.records < 1:
        parser.error("--records must be at least 1")
    if args.after < 2 or args.after > 2 * args.records:
        parser.error("--after must be 2..2*records (its keys are after/2 of the records' clients)")
    if args.profile:
        if not shutil.which("py-spy"):
            parser.error("--profile needs py-spy on PATH")
        args.profile.mkdir(parents=True, exist_ok=True)
    # run_cli turns SIGTERM into Ctrl-C: clean up (lab down) on TERM too.
    return run_cli(lambda: measure(args), args.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
