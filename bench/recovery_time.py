"""Recovery time of a primary restored from an old backup: handshake plus resynchronization.

    python bench/recovery_time.py [--records 100000] [--after 10000] [--amqp URL]
                                  [--deadline S] [--profile DIR] [--json]

A benchmark, not a test: it prints figures and asserts nothing about them.

1. A three-site lab (CEN central, P01 primary under CEN, S01 secondary under P01, no clients,
   every workload interval 0, default settings) is brought up with the orchestrator.
2. S01 is told to ``burst`` N inventory envelopes of N distinct synthetic clients (version 1),
   and the run waits until CEN holds all N records of S01 and every outbox is empty.
3. P01 is backed up (``emulator.backup.create``, what ``smslab backup P01`` does).
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
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# The site processes are started with ``python -m sites``: make them run this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)

import pika
import pika.exceptions

from broker import admin
from emulator import backup, checker, orchestrator, recover
from emulator.errors import SmslabError
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


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ----------------------------------------------------------------------------------------
# machine and process facts (as in bench/link_throughput.py)
# ----------------------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float | None:
    """User+system CPU seconds used so far by these processes (Linux /proc), None if unknown."""
    total = 0.0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None
    return total


def broker_pids() -> list[int]:
    """The local RabbitMQ's Erlang VM, to account its CPU (empty if the broker is remote)."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "beam.smp":
                pids.append(int(comm.parent.name))
        except (OSError, ValueError):
            pass
    return pids


def machine_busy(interval: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over ``interval`` seconds (Linux /proc/stat), None if unknown."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return values[3] + values[4], sum(values[:8])  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1 - (idle1 - idle0) / max(1, total1 - total0), 3)


class BusyMeter:
    """Fraction of all CPUs busy between ``start()`` and ``stop()`` (the whole machine)."""

    def __init__(self) -> None:
        self.start_sample: tuple[int, int] | None = None

    @staticmethod
    def _sample() -> tuple[int, int] | None:
        try:
            values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        return values[3] + values[4], sum(values[:8])

    def start(self) -> None:
        self.start_sample = self._sample()

    def stop(self) -> float | None:
        end = self._sample()
        if self.start_sample is None or end is None:
            return None
        (i0, t0), (i1, t1) = self.start_sample, end
        return round(1 - (i1 - i0) / max(1, t1 - t0), 3)


def cpu_delta(before: float | None, after: float | None) -> float | None:
    return round(after - before, 3) if before is not None and after is not None else None


def machine_facts(url: str, load_before: float | None) -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rabbit, source = None, None
    if shutil.which("rabbitmqctl"):
        try:
            out = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True,
                                 timeout=20, check=False)
            if out.returncode == 0 and out.stdout.strip():
                rabbit, source = out.stdout.strip().splitlines()[-1], "rabbitmqctl version"
        except (OSError, subprocess.SubprocessError):
            pass
    if rabbit is None:
        try:
            with admin.blocking(url, "smslab-bench") as conn:
                props = conn._impl.server_properties  # pika keeps the broker's Connection.Start
                v = props.get("version")
                rabbit = v.decode() if isinstance(v, bytes) else v
                source = "AMQP server properties"
        except (SmslabError, AttributeError):
            pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "pika": pika.__version__,
        "sqlite": sqlite3.sqlite_version,
        "rabbitmq": rabbit,
        "rabbitmq_from": source,
        "platform": platform.platform(),
        "cpu_busy_before": load_before,
        "commit": git_commit(),
    }


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
        for code in SITES:
            if lab_dir.pid(code) is None:
                raise BenchError(f"{what}: site {code} exited; see {lab_dir.log_file(code)}")
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
    tmp = Path(tempfile.mkdtemp(prefix="smslab-bench-recovery-"))
    topo = tmp / "topology.yaml"
    topo.write_text(TOPOLOGY)
    lab_dir = LabDir(tmp / "lab")
    profiler = Profiler(profile_dir)
    try:
        log(f"bringing up CEN, P01 (primary), S01 (secondary) in {lab_dir.path}")
        t = time.monotonic()
        info = orchestrator.up(topo, lab_dir, url, progress=lambda m: log(m.strip()))
        log(f"lab {info.lab_id} up in {time.monotonic() - t:.1f}s")
        return _measure(url, info, lab_dir, records, after, deadline, profiler)
    finally:
        profiler.stop()
        if lab_dir.exists():
            try:
                orchestrator.down(lab_dir)
                log("lab down, broker objects deleted")
            except SmslabError as exc:
                log(f"WARNING: lab down failed: {exc}{' (' + exc.hint + ')' if exc.hint else ''}")
        shutil.rmtree(tmp, ignore_errors=True)


def _burst(url: str, info: LabInfo, count: int, keys: int) -> None:
    answer = admin.control_request(url, info.lab_id, "S01", {
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
    backup_bytes = (lab_dir.backups_dir() / record.id / "site.db").stat().st_size
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
    cpu0 = {code: cpu_seconds([pid]) if pid else None for code, pid in sites_pids.items()}
    cpu0["broker"] = cpu_seconds(beam) if beam else None
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
    cpu1 = {code: cpu_seconds([pid]) if pid else None for code, pid in sites_pids.items()}
    cpu1["broker"] = cpu_seconds(beam) if beam else None
    cpu = {k: cpu_delta(cpu0[k], cpu1[k]) for k in cpu0}
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


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+changes" if dirty else "")) if head else None


# ----------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------


def _s(v: float | None) -> str:
    return "?" if v is None else f"{v:.2f}"


def _pct(v: float | None) -> str:
    return "?" if v is None else f"{v:.0%}"


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
        ("records complete at CEN and P01", f"{_s(r['data_complete_s'])} s",
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
        print(f"    {label:<{w1}}  {_s(at):>7}  {step:>6}")
        prev = at if at is not None else prev
    for name, a in r["applied"].items():
        rate = f", {a['per_s']:,.0f}/s" if a["per_s"] else ""
        print(f"  applied {name}: {a['inventory']:,} records ({a['envelopes']:,} envelopes in all)"
              f" in {a['batches']} batches between {_s(a['first_s'])} and {_s(a['last_s'])} s{rate};"
              f" longest pause {a['max_gap_s']:.2f} s after {_s(a['max_gap_after_s'])} s")
    print(f"  CEN vs S01 after: {r['cen_vs_s01']}; P01 vs S01: {r['p01_vs_s01']}")
    drops = {k: v for k, v in r["drops"].items() if v}
    print(f"  drops during the recovery: {drops or 'none'}; links: "
          + "; ".join(f"{k} {v}" for k, v in r["links"].items()))
    c = r["cpu_s"]
    print(f"  CPU s from the kill to valid ({r['total_s']:.2f} s wall, machine {_pct(r['cpu_busy_during'])} busy):"
          f" P01 {_s(c.get('P01'))}, CEN {_s(c.get('CEN'))}, S01 {_s(c.get('S01'))},"
          f" broker {_s(c.get('broker'))}, bench (checker) {_s(c.get('bench_checker'))}")
    print(f"  setup: fill {r['records']:,} records in {r['fill_s']:.1f} s; backup"
          f" {r['backup_bytes'] / 1e6:.1f} MB in {r['backup_s']:.2f} s; {r['after']:,} envelopes after it"
          f" ({r['after_newer_versions']:,} at version 2) in {r['after_s']:.1f} s; backup age {r['backup_age']}")
    print(f"  machine: {m['cores']} cores ({m['cpu'] or '?'}), python {m['python']}, pika {m['pika']},"
          f" SQLite {m['sqlite']}, RabbitMQ {m['rabbitmq'] or '?'}, busy before {_pct(m['cpu_busy_before'])},"
          f" commit {m['commit'] or '?'}")
    for code, prof in (r.get("profile") or {}).items():
        if "error" in prof:
            print(f"  py-spy {code}: {prof['error']}")
            continue
        print(f"  py-spy {code}: {prof['samples']:,} on-CPU samples ({prof['file']})")
        print("    self:      " + "; ".join(f"{f} {p}%" for f, p in prof["self"][:10]))
        print("    inclusive: " + "; ".join(f"{f} {p}%" for f, p in prof["inclusive"][:12]))


def _interrupted(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100000,
                        help="distinct inventory records in P01's subtree (default 100000)")
    parser.add_argument("--after", type=int, default=10000,
                        help="envelopes through P01 after the backup (default 10000)")
    parser.add_argument("--amqp", default=os.environ.get("SMSLAB_AMQP_URL", admin.DEFAULT_URL),
                        help="broker URL (default SMSLAB_AMQP_URL or %(default)s)")
    parser.add_argument("--deadline", type=float, default=600.0,
                        help="seconds each wait (fill, recovery) may take before the run fails (default 600)")
    parser.add_argument("--goal", type=float, default=20.0, help="the product goal, seconds (default 20)")
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="also run py-spy on the three sites during the recovery; raw stacks to DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.records < 1:
        parser.error("--records must be at least 1")
    if args.after < 2 or args.after > 2 * args.records:
        parser.error("--after must be 2..2*records (its keys are after/2 of the records' clients)")
    if args.profile:
        if not shutil.which("py-spy"):
            parser.error("--profile needs py-spy on PATH")
        args.profile.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupted)  # clean up (lab down) on TERM too
    try:
        admin.check(args.amqp)
        load = machine_busy()
        if load is not None and load > 0.25:
            log(f"WARNING: the CPUs were {load:.0%} busy before the run: other work will skew the figures")
        result = run(args.amqp, args.records, args.after, args.deadline, args.profile)
        report = {"goal_s": args.goal, "run": result, "machine": machine_facts(args.amqp, load)}
    except pika.exceptions.AMQPError as exc:
        print(f"error: broker error: {exc!r}", file=sys.stderr)
        return 2
    except SmslabError as exc:  # BrokerUnavailable (with its hint), LabError, CorruptBackup...
        print(f"error: {exc}" + (f"\nhint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 2
    except (BenchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (cleaned up)", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
