"""Throughput of one replication link (P01 -> CEN), against raw pika on the same broker.

    python bench/link_throughput.py [--count 20000] [--amqp URL] [--repeat R]
                                    [--only durable|raw] [--deadline S] [--json]

A benchmark, not a test: it prints figures and asserts nothing about them.

1. Durable path: a two-site lab (CEN central, P01 primary, no clients, every workload
   interval 0) is brought up with the orchestrator; P01 is told to ``burst`` N inventory
   envelopes. The clock runs from sending the burst command until CEN has applied all N
   (its link to P01, polled read-only in its SQLite store) and until P01's outbox is empty
   (every envelope acknowledged end to end).
2. Raw baseline: one producer process publishes N persistent messages (delivery_mode=2)
   of one envelope's size to a durable queue with pika's BlockingConnection and no
   confirms; one consumer process (prefetch 500, manual ack of every message) consumes
   them. The clock runs from the producer's first publish until the consumer has acked all N.
3. Both rates, the ratio durable/raw and the machine facts, as a table or (--json) JSON.
4. CPU per envelope per hop: the receiving site's (CEN) and the sending site's (P01) CPU
   microseconds per envelope of the durable run. With ``--baseline REF`` (a git revision, e.g.
   the main an issue was measured on) the same durable run of that revision's own bench runs in
   a worktree of it, alternately with this checkout's, ``--repeat`` times each, and the medians
   and their ratio are printed side by side. ``--only cpu`` runs that comparison and the floor.
5. The floor (in one process, today's models, no broker): decode, validate and hash a packet's
   envelopes; apply them batched into three SQLite tables (watermark, site data, applied log,
   one transaction a packet); re-encode them for the next hop. Printed per envelope.

Every broker object made here has a unique name and is deleted at the end, also on errors.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue as queue_mod
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

# bench/ on sys.path for _common, which puts this checkout first on sys.path and on PYTHONPATH
# (the site processes are started with ``python -m sites``) before broker/, emulator/, sites/.
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import pika
from _common import (
    BenchError,
    add_amqp_option,
    add_json_option,
    broker_pids,
    busy_before_run,
    check_sites_alive,
    cpu_delta,
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
from emulator import faults, orchestrator
from emulator.errors import SmslabError
from emulator.lab import LabDir
from emulator.protocol import envelope as wire
from sites.clients import inventory_payload
from sites.store import SiteStore

POLL = 0.02  # seconds between two looks at the stores
RAW_PREFETCH = 500

TOPOLOGY = """\
# written by bench/link_throughput.py: one link, no workload, only the burst travels
lab: bench-link
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
"""


# ----------------------------------------------------------------------------------------
# 1. the durable path
# ----------------------------------------------------------------------------------------


def durable_run(url: str, count: int, deadline: float, *, relay: bool = False) -> dict[str, Any]:
    """The durable path; with ``relay``, through a link fault that does nothing (a drop at
    rate 0 on P01->CEN): the link's packets go through its relay queue and the lab's fault
    daemon, the cost of any link fault."""
    what = "relay" if relay else "durable"
    with temp_lab("smslab-bench-", TOPOLOGY, f"{what}: ") as (topo, lab_dir):
        log(f"{what}: bringing up CEN + P01 in {lab_dir.path}")
        info = orchestrator.up(topo, lab_dir, url, progress=lambda m: log(f"{what}: {m.strip()}"))
        if relay:
            spec = faults.apply_link_fault(lab_dir, info, "drop", "P01", "CEN", oneway=True, params={"rate": 0.0},
                                           seed=1, progress=lambda m: log(f"relay: {m}"))
            run = _measure_burst(info.amqp_url, info.lab_id, lab_dir, count, deadline)
            stats = faults.stats(lab_dir, spec.id).links.get("P01->CEN")
            run["relay"] = stats.model_dump() if stats else None
            return run
        # as the lab's controller (info.amqp_url): with per-site identities a site takes commands from no one else
        return _measure_burst(info.amqp_url, info.lab_id, lab_dir, count, deadline)


def _measure_burst(url: str, lab_id: str, lab_dir: LabDir, count: int,
                   deadline: float) -> dict[str, Any]:
    cen = SiteStore(lab_dir.site_db("CEN"), readonly=True)
    p01 = SiteStore(lab_dir.site_db("P01"), readonly=True)
    try:
        applied_before = cen.load_links()["P01"].next_expected - 1
        sent_before = p01.load_links()["CEN"].sent_through
        target_applied = applied_before + count
        target_sent = sent_before + count
        sample: bytes | None = None
        t_originated = t_applied = t_acked = None
        site_pids = {code: lab_dir.pid(code) for code in ("P01", "CEN")}
        beam = broker_pids()
        cpu0 = cpu_snapshot(site_pids, beam)
        bench0 = time.process_time()

        t0 = time.monotonic()
        answer = admin.control_request(url, lab_id, "P01", {"cmd": "burst", "count": count})
        t_answer = time.monotonic()
        if not answer.get("ok", False):
            raise BenchError(f"P01 refused the burst: {answer}")
        log(f"durable: burst of {count} sent to P01 (CEN had applied {applied_before} from P01)")

        last_report = t0
        while True:
            now = time.monotonic()
            cen_link = cen.load_links()["P01"]
            p01_link = p01.load_links()["CEN"]
            applied = cen_link.next_expected - 1
            if sample is None:
                rows = p01.outbox_range("CEN", sent_before + 1, 1)
                if rows:
                    sample = rows[0][1]
            if t_originated is None and p01_link.sent_through >= target_sent:
                t_originated = now
            if t_applied is None and applied >= target_applied:
                t_applied = now
            if (t_acked is None and p01_link.acked_through >= target_sent
                    and p01.outbox_counts().get("CEN", 0) == 0):
                t_acked = now
            if t_applied is not None and t_acked is not None:
                break
            if now - t0 > deadline:
                raise BenchError(
                    f"durable: deadline of {deadline:.0f}s passed: CEN applied"
                    f" {applied - applied_before}/{count}, P01 made {p01_link.sent_through - sent_before},"
                    f" acked {p01_link.acked_through - sent_before}")
            check_sites_alive(lab_dir, ("CEN", "P01"), "durable")
            if now - last_report >= 5:
                last_report = now
                log(f"durable: {now - t0:5.1f}s  made {p01_link.sent_through - sent_before}"
                    f"  applied {applied - applied_before}  acked {p01_link.acked_through - sent_before}")
            time.sleep(POLL)

        wall = time.monotonic() - t0
        cpu = cpu_deltas(cpu0, cpu_snapshot(site_pids, beam))
        cpu["bench_poll"] = round(time.process_time() - bench0, 3)
        cen_link = cen.load_links()["P01"]
        applied_s = t_applied - t0
        acked_s = t_acked - t0
        return {
            "count": count,
            "control_answer_s": round(t_answer - t0, 4),
            "originated_s": round((t_originated or t_acked) - t0, 3),
            "applied_s": round(applied_s, 3),
            "acked_s": round(acked_s, 3),
            "applied_per_s": round(count / applied_s, 1),
            "acked_per_s": round(count / acked_s, 1),
            "envelope_bytes": len(sample) if sample else None,
            "_sample": sample,
            "cen_link": {k: getattr(cen_link, k) for k in
                         ("applied", "duplicates", "stale", "gaps", "conflicts")},
            "p01_resends": p01.load_links()["CEN"].resends,
            "cpu_s": cpu,
            "cpu_us_per_envelope": {site: round(1e6 * cpu[site] / count, 1) for site in ("CEN", "P01")
                                    if cpu.get(site) is not None},
            "cpu_wall_s": round(wall, 3),
        }
    finally:
        cen.close()
        p01.close()


# ----------------------------------------------------------------------------------------
# 1b. the same durable run of another revision, side by side; the in-process floor
# ----------------------------------------------------------------------------------------


def baseline_tree(ref: str) -> Path:
    """A worktree of ``ref`` (detached, in a temporary folder; removed by ``drop_tree``)."""
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    tree = Path(tempfile.mkdtemp(prefix="smslab-baseline-")) / "tree"
    done = subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tree), ref],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"--baseline {ref}: {done.stderr.strip()}")
    return tree


def drop_tree(tree: Path) -> None:
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], capture_output=True,
                   check=False)
    shutil.rmtree(tree.parent, ignore_errors=True)


def baseline_run(tree: Path, url: str, count: int, deadline: float) -> dict[str, Any]:
    """The baseline revision's own durable run (its bench, its sites), CPU per envelope."""
    import json
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, str(tree / "bench" / "link_throughput.py"), "--only", "durable",
                           "--count", str(count), "--amqp", url, "--deadline", str(deadline), "--json"],
                          cwd=tree, env=env, capture_output=True, text=True, check=False, timeout=deadline + 120)
    if done.returncode != 0:
        raise BenchError(f"the baseline's durable run failed: {done.stderr.strip()[-500:]}")
    d = json.loads(done.stdout)["durable"]
    cpu = d["cpu_s"]
    return {"acked_per_s": d["acked_per_s"], "cpu_s": cpu,
            "cpu_us_per_envelope": {site: round(1e6 * cpu[site] / count, 1) for site in ("CEN", "P01")}}


def floor(count: int) -> dict[str, float]:
    """What one hop needs at least, in this process: microseconds per envelope."""
    import sqlite3
    import tempfile

    parts = []
    for i in range(1, count + 1):
        client = f"P01-B{i % 1000:05d}"
        payload = inventory_payload(client, i // 1000 + 1)
        parts.append(wire.encode_envelope(source="P01", dest="CEN", incarnation=1, origin="P01",
                                          data_class=wire.DataClass.INVENTORY, key=client, txn_id=i, link_seq=i,
                                          op="upsert", hash_=wire.content_hash(payload), payload=payload))
    bodies = [wire.encode_parts("bench", "P01", "CEN", parts[i:i + 200]) for i in range(0, count, 200)]
    t0 = time.process_time()
    packets = [wire.decode(b, lab="bench", dest="CEN") for b in bodies]  # JSON, models, the content hash
    t1 = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "floor.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript("""
            CREATE TABLE watermark (source TEXT, data_class TEXT, key TEXT, txn INTEGER,
                                    PRIMARY KEY (source, data_class, key)) WITHOUT ROWID;
            CREATE TABLE site_data (data_class TEXT, key TEXT, origin TEXT, version INTEGER, payload TEXT,
                                    updated REAL, PRIMARY KEY (data_class, key)) WITHOUT ROWID;
            CREATE TABLE applied (source TEXT, seq INTEGER, txn INTEGER, hash TEXT, PRIMARY KEY (source, seq))
                                  WITHOUT ROWID;""")
        from emulator.protocol import codec

        t2 = time.process_time()
        for packet in packets:
            envs = [m for m in packet.messages if isinstance(m, wire.Envelope)]
            db.execute("BEGIN")
            db.executemany("INSERT OR REPLACE INTO watermark VALUES(?, ?, ?, ?)",
                           [(e.source, e.data_class.value, e.key, e.txn_id) for e in envs])
            db.executemany("INSERT OR REPLACE INTO site_data VALUES(?, ?, ?, ?, ?, ?)",
                           [(e.data_class.value, e.key, e.origin, int(e.payload["version"]), codec.dumps(e.payload),
                             0.0) for e in envs])
            db.executemany("INSERT INTO applied VALUES(?, ?, ?, ?)", [(e.source, e.link_seq, e.txn_id, e.hash)
                                                                     for e in envs])
            db.execute("COMMIT")
        t3 = time.process_time()
        db.close()
    for packet in packets:  # forwarding: the next hop's envelope
        for e in packet.messages:
            if isinstance(e, wire.Envelope):
                wire.encode_envelope(source="CEN", dest="XYZ", incarnation=1, origin=e.origin,
                                     data_class=e.data_class, key=e.key, txn_id=e.txn_id, link_seq=e.link_seq,
                                     op=e.op, hash_=e.hash, payload=e.payload)
    t4 = time.process_time()
    per = 1e6 / count
    out = {"decode_validate_hash": round((t1 - t0) * per, 1), "apply_3_tables": round((t3 - t2) * per, 1),
           "reencode": round((t4 - t3) * per, 1)}
    out["total"] = round(sum(out.values()), 1)
    return out


# ----------------------------------------------------------------------------------------
# 2. the raw pika baseline
# ----------------------------------------------------------------------------------------


def sample_envelope() -> bytes:
    """One inventory envelope as P01's burst makes it (same classes, same payload)."""
    payload = inventory_payload("P01-B00001", 1)
    env = wire.Envelope(
        source="P01", dest="CEN", incarnation=1, origin="P01", data_class=wire.DataClass.INVENTORY,
        key="P01-B00001", priority=wire.priority_of(wire.DataClass.INVENTORY), txn_id=12345,
        link_seq=12345, op="upsert", hash=wire.content_hash(payload), payload=payload,
    )
    return wire.encode_message(env)


def _params(url: str, name: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.client_properties = {"connection_name": name}
    return params


def _raw_consumer(url: str, queue: str, count: int, ready: Any, results: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends us (Ctrl-C reaches the group)
    cpu0 = time.process_time()
    try:
        conn = pika.BlockingConnection(_params(url, f"{queue}:consumer"))
        ch = conn.channel()
        ch.basic_qos(prefetch_count=RAW_PREFETCH)
        got = 0

        def on_message(chan: Any, method: Any, _props: Any, _body: bytes) -> None:
            nonlocal got
            chan.basic_ack(method.delivery_tag)
            got += 1
            if got >= count:
                chan.stop_consuming()

        ch.basic_consume(queue, on_message)
        ready.set()
        ch.start_consuming()
        ch.queue_declare(queue, passive=True)  # a round trip: the broker has taken every ack
        results.put(("consumer", time.monotonic(), got, time.process_time() - cpu0))
        conn.close()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        results.put(("error", f"raw consumer: {exc!r}"))


def _raw_producer(url: str, queue: str, count: int, body: bytes, results: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cpu0 = time.process_time()
    try:
        conn = pika.BlockingConnection(_params(url, f"{queue}:producer"))
        ch = conn.channel()
        props = pika.BasicProperties(delivery_mode=2)
        t_start = time.monotonic()
        for _ in range(count):
            ch.basic_publish("", queue, body, props)
        t_published = time.monotonic()
        results.put(("producer", t_start, t_published, time.process_time() - cpu0))
        conn.close()
    except Exception as exc:  # noqa: BLE001
        results.put(("error", f"raw producer: {exc!r}"))


def raw_run(url: str, count: int, body: bytes, deadline: float) -> dict[str, Any]:
    queue = f"smslab-bench.raw.{uuid.uuid4().hex[:12]}"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ready = ctx.Event()
    procs: list[Any] = []
    finished = False
    try:
        with admin.blocking(url, "smslab-bench") as conn:
            # x-expires: should this run die without its finally, the broker drops the queue.
            conn.channel().queue_declare(queue, durable=True, arguments={"x-expires": 600_000})
        log(f"raw: queue {queue}, {count} persistent messages of {len(body)} bytes")
        consumer = ctx.Process(target=_raw_consumer, args=(url, queue, count, ready, results),
                               name="raw-consumer")
        consumer.start()
        procs.append(consumer)
        if not ready.wait(30):
            raise BenchError("raw: the consumer did not start within 30s")
        beam = broker_pids()
        beam0 = cpu_seconds(beam) if beam else None
        producer = ctx.Process(target=_raw_producer, args=(url, queue, count, body, results),
                               name="raw-producer")
        producer.start()
        procs.append(producer)
        got: dict[str, tuple[Any, ...]] = {}
        end = time.monotonic() + deadline
        while len(got) < 2:
            try:
                item = results.get(timeout=max(0.1, end - time.monotonic()))
            except queue_mod.Empty:
                raise BenchError(f"raw: not done within {deadline:.0f}s (have {sorted(got)})") from None
            if item[0] == "error":
                raise BenchError(item[1])
            got[item[0]] = item
        finished = True
        beam1 = cpu_seconds(beam) if beam else None
        _, t_start, t_published, producer_cpu = got["producer"]
        _, t_done, consumed, consumer_cpu = got["consumer"]
        total = t_done - t_start
        return {
            "count": count,
            "message_bytes": len(body),
            "published_s": round(t_published - t_start, 3),
            "consumed_s": round(total, 3),
            "published_per_s": round(count / (t_published - t_start), 1),
            "consumed_per_s": round(count / total, 1),
            "consumed": consumed,
            "cpu_s": {"producer": round(producer_cpu, 3), "consumer": round(consumer_cpu, 3),
                      "broker": cpu_delta(beam0, beam1)},
        }
    finally:
        for p in procs:
            p.join(timeout=10 if finished else 0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        try:
            with admin.blocking(url, "smslab-bench") as conn:
                conn.channel().queue_delete(queue)
        except SmslabError as exc:
            log(f"raw: WARNING: could not delete queue {queue}: {exc}")


# ----------------------------------------------------------------------------------------
# 3. the report
# ----------------------------------------------------------------------------------------


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``key`` (the upper one of two), with every run's figure."""
    chosen = dict(sorted(runs, key=lambda r: r[key])[len(runs) // 2])
    chosen["runs"] = [r[key] for r in runs]
    return chosen


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def print_table(report: dict[str, Any]) -> None:
    d, r, m, q = report["durable"], report["raw"], report["machine"], report["ratio"]
    rl = report.get("relay")

    def spread(run: dict[str, Any]) -> str:
        runs = run["runs"]
        return f"median of {len(runs)}: {min(runs):,.0f}-{max(runs):,.0f}" if len(runs) > 1 else ""

    rows: list[tuple[str, str, str, str]] = []
    if d:
        rows += [
            ("durable: applied at CEN", f"{d['applied_per_s']:,.0f} env/s", f"{d['applied_s']:.2f} s", ""),
            ("durable: acked end to end", f"{d['acked_per_s']:,.0f} env/s", f"{d['acked_s']:.2f} s",
             spread(d)),
            ("durable: burst made at P01", "", f"{d['originated_s']:.2f} s", ""),
        ]
    if rl:
        rows += [
            ("relay (fault, rate 0): applied", f"{rl['applied_per_s']:,.0f} env/s", f"{rl['applied_s']:.2f} s", ""),
            ("relay (fault, rate 0): acked", f"{rl['acked_per_s']:,.0f} env/s", f"{rl['acked_s']:.2f} s",
             spread(rl)),
        ]
    if r:
        rows += [
            ("raw pika: consumed+acked", f"{r['consumed_per_s']:,.0f} msg/s", f"{r['consumed_s']:.2f} s",
             spread(r)),
            ("raw pika: published", f"{r['published_per_s']:,.0f} msg/s", f"{r['published_s']:.2f} s", ""),
        ]
    if q["applied"] is not None:
        rows += [
            ("ratio durable/raw (applied)", f"{q['applied']:.3f}", "", ""),
            ("ratio durable/raw (acked)", f"{q['acked']:.3f}", "", ""),
        ]
    if q.get("relay_acked") is not None:
        rows += [
            ("ratio relay/direct (applied)", f"{q['relay_applied']:.3f}", "", "goal >= 0.5"),
            ("ratio relay/direct (acked)", f"{q['relay_acked']:.3f}", "", "goal >= 0.5"),
        ]
    w0 = max(len(row[0]) for row in rows)
    w1 = max(len(row[1]) for row in rows)
    print(f"smslab link throughput: N = {report['count']:,}"
          f" (envelope {report['envelope_bytes']} bytes)")
    for a, b, c, e in rows:
        print(f"  {a:<{w0}}  {b:>{w1}}  {c:>8}  {e}".rstrip())
    if d:
        cl, c = d["cen_link"], d["cpu_s"]
        print(f"  CEN<-P01 link: applied {cl['applied']}, duplicates {cl['duplicates']},"
              f" stale {cl['stale']}, gaps {cl['gaps']}; P01 resends {d['p01_resends']}")
        print(f"  CPU s, durable ({d['cpu_wall_s']:.2f} s wall): P01 {fmt_s(c['P01'])}, CEN {fmt_s(c['CEN'])},"
              f" broker {fmt_s(c['broker'])}, bench polling {fmt_s(c['bench_poll'])}")
    if r:
        c = r["cpu_s"]
        print(f"  CPU s, raw ({r['consumed_s']:.2f} s wall): producer {fmt_s(c['producer'])},"
              f" consumer {fmt_s(c['consumer'])}, broker {fmt_s(c['broker'])}")
    cpu = report.get("cpu_per_envelope")
    if d and d.get("cpu_us_per_envelope"):
        u = d["cpu_us_per_envelope"]
        print(f"  CPU us per envelope per hop: CEN (receiving) {u.get('CEN')}, P01 (sending) {u.get('P01')}")
    if cpu:
        f = cpu["floor"]
        if cpu.get("baseline"):
            b, n, q2 = cpu["baseline"], cpu["now"], cpu["ratio"]
            print(f"  side by side, median of {len(cpu['runs_now'])} run(s) each: baseline {cpu['baseline_ref']}:"
                  f" CEN {b['CEN']} us, P01 {b['P01']} us; now: CEN {n['CEN']} us, P01 {n['P01']} us;"
                  f" now/baseline: CEN {q2['CEN']}, P01 {q2['P01']} (goal <= 0.5)")
        print(f"  floor (one process, no broker): decode+validate+hash {f['decode_validate_hash']} us,"
              f" apply into 3 tables {f['apply_3_tables']} us, re-encode {f['reencode']} us = {f['total']} us")
    print(f"  machine: {m['cores']} cores ({m['cpu'] or '?'}), python {m['python']},"
          f" pika {m['pika']}, RabbitMQ {m['rabbitmq'] or '?'}, busy before {fmt_pct(m['cpu_busy_before'])}")


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    load = busy_before_run(args.amqp)
    durable = raw = None
    samples: list[bytes] = []
    relayed = None
    cpu: dict[str, Any] | None = None
    if args.only == "cpu" or args.baseline:
        tree = baseline_tree(args.baseline) if args.baseline else None
        try:
            now_runs, base_runs = [], []
            for i in range(args.repeat):  # alternately, so a load that comes and goes hits both
                if tree is not None:
                    log(f"cpu: baseline {args.baseline}, run {i + 1}/{args.repeat}")
                    base_runs.append(baseline_run(tree, args.amqp, args.count, args.deadline))
                log(f"cpu: this checkout, run {i + 1}/{args.repeat}")
                now_runs.append(durable_run(args.amqp, args.count, args.deadline))
        finally:
            if tree is not None:
                drop_tree(tree)
        samples = [s for s in (r.pop("_sample") for r in now_runs) if s]
        durable = median_run(now_runs, "acked_per_s")
        cpu = {"now": {site: _median([r["cpu_us_per_envelope"][site] for r in now_runs]) for site in ("CEN", "P01")},
               "runs_now": [r["cpu_us_per_envelope"] for r in now_runs], "floor": floor(args.count)}
        if base_runs:
            cpu["baseline_ref"] = args.baseline
            cpu["baseline"] = {site: _median([r["cpu_us_per_envelope"][site] for r in base_runs])
                               for site in ("CEN", "P01")}
            cpu["runs_baseline"] = [r["cpu_us_per_envelope"] for r in base_runs]
            cpu["ratio"] = {site: ratio(cpu["now"][site], cpu["baseline"][site]) for site in ("CEN", "P01")}
    elif args.only in (None, "durable"):
        runs = [durable_run(args.amqp, args.count, args.deadline) for _ in range(args.repeat)]
        samples = [s for s in (r.pop("_sample") for r in runs) if s]
        durable = median_run(runs, "acked_per_s")
    if args.only in (None, "relay") and not args.baseline:
        runs = [durable_run(args.amqp, args.count, args.deadline, relay=True) for _ in range(args.repeat)]
        for r in runs:
            r.pop("_sample")
        relayed = median_run(runs, "acked_per_s")
    # The raw messages are a real envelope of the burst, or one built the same way.
    body = samples[0] if samples else sample_envelope()
    if args.only in (None, "raw") and not args.baseline:
        raw = median_run([raw_run(args.amqp, args.count, body, args.deadline)
                          for _ in range(args.repeat)], "consumed_per_s")
    return {
        "count": args.count,
        "envelope_bytes": (durable or {}).get("envelope_bytes") or len(body),
        "durable": durable,
        "relay": relayed,
        "raw": raw,
        "ratio": {
            "applied": ratio((durable or {}).get("applied_per_s"), (raw or {}).get("consumed_per_s")),
            "acked": ratio((durable or {}).get("acked_per_s"), (raw or {}).get("consumed_per_s")),
            "relay_applied": ratio((relayed or {}).get("applied_per_s"), (durable or {}).get("applied_per_s")),
            "relay_acked": ratio((relayed or {}).get("acked_per_s"), (durable or {}).get("acked_per_s")),
        },
        "cpu_per_envelope": cpu,
        "machine": machine_facts(args.amqp, load),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="envelopes / messages (default 20000)")
    add_amqp_option(parser)
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="seconds each measurement may take before the run fails (default 300)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each measurement R times and report the median run (default 1)")
    parser.add_argument("--only", choices=("durable", "relay", "raw", "cpu"), help="run one of the measurements")
    parser.add_argument("--baseline", metavar="REF",
                        help="also run the durable path of this git revision, side by side (CPU per envelope)")
    add_json_option(parser)
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        parser.error("--count and --repeat must be at least 1")
    # run_cli turns SIGTERM into Ctrl-C: clean up (lab down, queue deleted) on TERM too.
    return run_cli(lambda: measure(args), args.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
