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

Every broker object made here has a unique name and is deleted at the end, also on errors.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
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
from emulator import orchestrator
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


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


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


def cpu_delta(before: float | None, after: float | None) -> float | None:
    return round(after - before, 3) if before is not None and after is not None else None


# ----------------------------------------------------------------------------------------
# 1. the durable path
# ----------------------------------------------------------------------------------------


def durable_run(url: str, count: int, deadline: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="smslab-bench-"))
    topo = tmp / "topology.yaml"
    topo.write_text(TOPOLOGY)
    lab_dir = LabDir(tmp / "lab")
    try:
        log(f"durable: bringing up CEN + P01 in {lab_dir.path}")
        info = orchestrator.up(topo, lab_dir, url, progress=lambda m: log(f"durable: {m.strip()}"))
        return _measure_burst(url, info.lab_id, lab_dir, count, deadline)
    finally:
        if lab_dir.exists():
            try:
                orchestrator.down(lab_dir)
                log("durable: lab down, broker objects deleted")
            except SmslabError as exc:
                log(f"durable: WARNING: lab down failed: {exc}"
                    f"{' (' + exc.hint + ')' if exc.hint else ''}")
        shutil.rmtree(tmp, ignore_errors=True)


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
        cpu0 = {code: cpu_seconds([pid]) if pid else None for code, pid in site_pids.items()}
        cpu0["broker"] = cpu_seconds(beam) if beam else None
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
            for code in ("CEN", "P01"):
                if lab_dir.pid(code) is None:
                    raise BenchError(f"durable: site {code} exited; see {lab_dir.log_file(code)}")
            if now - last_report >= 5:
                last_report = now
                log(f"durable: {now - t0:5.1f}s  made {p01_link.sent_through - sent_before}"
                    f"  applied {applied - applied_before}  acked {p01_link.acked_through - sent_before}")
            time.sleep(POLL)

        wall = time.monotonic() - t0
        cpu1 = {code: cpu_seconds([pid]) if pid else None for code, pid in site_pids.items()}
        cpu1["broker"] = cpu_seconds(beam) if beam else None
        cpu = {k: cpu_delta(cpu0[k], cpu1[k]) for k in cpu0}
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
            "cpu_wall_s": round(wall, 3),
        }
    finally:
        cen.close()
        p01.close()


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
# 3. machine facts and the report
# ----------------------------------------------------------------------------------------


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
        "rabbitmq": rabbit,
        "rabbitmq_from": source,
        "platform": platform.platform(),
        "cpu_busy_before": load_before,
    }


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``key`` (the upper one of two), with every run's figure."""
    chosen = dict(sorted(runs, key=lambda r: r[key])[len(runs) // 2])
    chosen["runs"] = [r[key] for r in runs]
    return chosen


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _pct(v: float | None) -> str:
    return "?" if v is None else f"{v:.0%}"


def _s(v: float | None) -> str:
    return "?" if v is None else f"{v:.2f}"


def print_table(report: dict[str, Any]) -> None:
    d, r, m, q = report["durable"], report["raw"], report["machine"], report["ratio"]

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
        print(f"  CPU s, durable ({d['cpu_wall_s']:.2f} s wall): P01 {_s(c['P01'])}, CEN {_s(c['CEN'])},"
              f" broker {_s(c['broker'])}, bench polling {_s(c['bench_poll'])}")
    if r:
        c = r["cpu_s"]
        print(f"  CPU s, raw ({r['consumed_s']:.2f} s wall): producer {_s(c['producer'])},"
              f" consumer {_s(c['consumer'])}, broker {_s(c['broker'])}")
    print(f"  machine: {m['cores']} cores ({m['cpu'] or '?'}), python {m['python']},"
          f" pika {m['pika']}, RabbitMQ {m['rabbitmq'] or '?'}, busy before {_pct(m['cpu_busy_before'])}")


def _interrupted(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="envelopes / messages (default 20000)")
    parser.add_argument("--amqp", default=os.environ.get("SMSLAB_AMQP_URL", admin.DEFAULT_URL),
                        help="broker URL (default SMSLAB_AMQP_URL or %(default)s)")
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="seconds each measurement may take before the run fails (default 300)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each measurement R times and report the median run (default 1)")
    parser.add_argument("--only", choices=("durable", "raw"), help="run one of the two measurements")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        parser.error("--count and --repeat must be at least 1")
    signal.signal(signal.SIGTERM, _interrupted)  # clean up (lab down, queue deleted) on TERM too
    try:
        admin.check(args.amqp)
        load = machine_busy()
        if load is not None and load > 0.25:
            log(f"WARNING: the CPUs were {load:.0%} busy before the run: other work will skew the figures")
        durable = raw = None
        samples: list[bytes] = []
        if args.only != "raw":
            runs = [durable_run(args.amqp, args.count, args.deadline) for _ in range(args.repeat)]
            samples = [s for s in (r.pop("_sample") for r in runs) if s]
            durable = median_run(runs, "acked_per_s")
        # The raw messages are a real envelope of the burst, or one built the same way.
        body = samples[0] if samples else sample_envelope()
        if args.only != "durable":
            raw = median_run([raw_run(args.amqp, args.count, body, args.deadline)
                              for _ in range(args.repeat)], "consumed_per_s")
        report = {
            "count": args.count,
            "envelope_bytes": (durable or {}).get("envelope_bytes") or len(body),
            "durable": durable,
            "raw": raw,
            "ratio": {
                "applied": ratio((durable or {}).get("applied_per_s"), (raw or {}).get("consumed_per_s")),
                "acked": ratio((durable or {}).get("acked_per_s"), (raw or {}).get("consumed_per_s")),
            },
            "machine": machine_facts(args.amqp, load),
        }
    except pika.exceptions.AMQPError as exc:
        print(f"error: broker error: {exc!r}", file=sys.stderr)
        return 2
    except SmslabError as exc:  # BrokerUnavailable (with its hint), LabError, ConfigError...
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
