"""A generated 50-site lab of real processes: how long ``up`` takes, what each site holds in
memory, what the lab costs while idle.

    python bench/lab_scale.py [--sites 50] [--warm 20] [--idle 30] [--amqp URL] [--json]

A benchmark, not a test: it prints figures and asserts nothing about them.

1. ``smslab topology generate --sites N --depth 2 --fanout 4 --secondaries 2`` with the
   workload of examples/lab-20.yaml (2 clients a site), brought up with the orchestrator on
   the broker; the clock runs until every site is attached (``up`` returns). Goal: under 10 s.
2. After ``--warm`` seconds of workload: every site process's resident memory (RSS, and PSS,
   its share of pages it shares with the other sites: the interpreter, pydantic, pika).
   Goal: at most 30 MB RSS per site.
3. The workload paused at every site, a few seconds to settle, then the CPU of all site
   processes (and of the broker) over ``--idle`` seconds, as a share of one core.
   Goal: at most 10% of a core for the whole lab.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from _common import (
    add_amqp_option,
    add_json_option,
    broker_pids,
    busy_before_run,
    cpu_seconds,
    log,
    machine_facts,
    run_cli,
    temp_lab,
)

from broker import admin
from emulator import orchestrator
from emulator.topogen import generate
from emulator.topology import load_topology


def memory_of(pid: int) -> tuple[float, float] | None:
    """(RSS, PSS) in MB of a process (Linux smaps_rollup)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    values = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()[1:] if line.split()[1:2]}
    return values.get("Rss", 0) / 1024, values.get("Pss", 0) / 1024


def measure(args: argparse.Namespace) -> dict[str, Any]:
    load = busy_before_run(args.amqp)
    workload = load_topology(BENCH.parent / "examples" / "lab-20.yaml").defaults.workload.model_dump()
    topo = generate(args.sites, depth=2, fanout=4, secondaries=2, clients=2, lab="scale", workload=workload)
    with temp_lab("smslab-labscale-", "# written by bench/lab_scale.py\n" + topo.to_yaml(), "lab_scale: ") as (
            path, lab_dir):
        log(f"bringing up {args.sites} sites in {lab_dir.path}")
        t0 = time.monotonic()
        info = orchestrator.up(path, lab_dir, args.amqp, timeout=300, progress=lambda m: log(m.strip()))
        up_s = time.monotonic() - t0
        log(f"up in {up_s:.1f}s; {args.warm:g}s of workload")
        time.sleep(args.warm)
        pids = {code: lab_dir.pid(code) for code in topo.codes}
        memory = {code: memory_of(pid) for code, pid in pids.items() if pid}
        rss = [m[0] for m in memory.values() if m]
        pss = [m[1] for m in memory.values() if m]
        for code in topo.depth_order():
            admin.control_request(info.amqp_url, info.lab_id, code, {"cmd": "pause-workload"})
        log(f"workload paused; settling {args.settle:g}s, then {args.idle:g}s of idle")
        time.sleep(args.settle)
        site_pids = [p for p in pids.values() if p]
        beam = broker_pids()
        c0, b0, w0 = cpu_seconds(site_pids), cpu_seconds(beam) if beam else None, time.monotonic()
        time.sleep(args.idle)
        c1, b1, w1 = cpu_seconds(site_pids), cpu_seconds(beam) if beam else None, time.monotonic()
        idle = (c1 - c0) / (w1 - w0) if c0 is not None and c1 is not None else None
        broker_idle = (b1 - b0) / (w1 - w0) if b0 is not None and b1 is not None else None
    return {
        "sites": args.sites,
        "up_s": round(up_s, 2),
        "rss_mb": {"mean": round(sum(rss) / len(rss), 1), "max": round(max(rss), 1), "total": round(sum(rss))},
        "pss_mb": {"mean": round(sum(pss) / len(pss), 1), "max": round(max(pss), 1), "total": round(sum(pss))},
        "idle_core_share": round(idle, 3) if idle is not None else None,
        "idle_broker_core_share": round(broker_idle, 3) if broker_idle is not None else None,
        "machine": machine_facts(args.amqp, load),
    }


def print_table(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"smslab lab scale: {r['sites']} site processes")
    print(f"  up (every site attached)      {r['up_s']:7.1f} s    goal < 10 s")
    print(f"  RSS per site, mean (max)      {r['rss_mb']['mean']:7.1f} MB ({r['rss_mb']['max']:.1f})  goal <= 30 MB;"
          f" {r['rss_mb']['total']} MB for the lab")
    print(f"  PSS per site, mean (max)      {r['pss_mb']['mean']:7.1f} MB ({r['pss_mb']['max']:.1f})"
          f"  (shared pages counted once); {r['pss_mb']['total']} MB for the lab")
    idle, broker = r["idle_core_share"], r["idle_broker_core_share"]
    print(f"  idle, workload paused         {idle:7.1%} of a core   goal <= 10%"
          + (f"; the broker {broker:.1%} more" if broker is not None else ""))
    print(f"  machine: {m['cores']} cores ({m['cpu'] or '?'}), python {m['python']}, RabbitMQ {m['rabbitmq'] or '?'},"
          f" busy before {m['cpu_busy_before']:.0%}" if m.get("cpu_busy_before") is not None else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--warm", type=float, default=20.0, help="seconds of workload before memory is read")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after pausing the workload")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds the idle CPU is measured over")
    add_amqp_option(parser)
    add_json_option(parser)
    args = parser.parse_args(argv)
    return run_cli(lambda: measure(args), args.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
