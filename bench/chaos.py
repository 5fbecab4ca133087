"""Reliability under chaos: the 5-site demo lab, steady workload, a seeded fault every few
seconds, then heal and converge; how much was lost or applied twice.

    python bench/chaos.py [--duration 180] [--seed 1] [--json] [--keep DIR]

A benchmark, not a test: it prints figures and asserts nothing about them.

The lab runs on a private RabbitMQ node of its own (``broker.local``; RabbitMQ must be
installed), because one of the faults restarts the broker, which would disturb every other
lab of a shared one. The faults, drawn from the seed (``emulator.scenario.draw_schedule``):
kill -9 and restart of any site, pause/resume, link drops, duplicates, reorders, delays and
partitions, broker disconnects, and one broker restart halfway. Then every fault is healed,
every site started, and the checker must say valid. Printed: the faults injected, envelopes
sent, lost (goal 0), applied twice (goal 0), the time to converge, and the command that
replays the schedule.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from _common import BenchError, add_json_option, log, machine_facts, run_cli

from broker.local import LocalNode, find_server
from emulator.lab import BrokerRef
from emulator.runner import run_scenario
from emulator.scenario import parse_scenario

REPO = BENCH.parent


def scenario_text(duration: float) -> str:
    return f"""
scenario: bench-chaos
description: bench/chaos.py
topology: {REPO / "examples" / "lab.yaml"}
chaos:
  duration: {duration:g}
  interval: [3, 7]
  hold: [1, 6]
  faults: {{kill: 3, pause: 2, partition: 2, drop: 2, duplicate: 2, reorder: 2, delay: 1, disconnect: 2}}
  broker_restarts: 1
  converge_timeout: 300
"""


def replay_command(args: argparse.Namespace) -> str:
    return f"python bench/chaos.py --seed {args.seed} --duration {args.duration:g}"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    if find_server() is None:
        raise BenchError("RabbitMQ is not installed here: the bench needs a private node (one fault restarts it)")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="smslab-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    node = LocalNode(root / "broker", name=f"chaos-{int(time.time())}")
    log(f"starting a private RabbitMQ node in {root / 'broker'}")
    node.start()
    try:
        scenario = parse_scenario(scenario_text(args.duration), source="bench/chaos.py")
        started = time.monotonic()
        ref = BrokerRef(kind="private", node_dir=str(node.base_dir), owned=False)  # the bench stops it
        result = run_scenario(scenario, seed=args.seed, run_dir=root / "run", amqp_url=node.amqp_url,
                              progress=lambda m: log(m), broker=ref, replay=replay_command(args))
        wall = time.monotonic() - started
    finally:
        node.stop()
    events = [json.loads(line) for line in (root / "run" / "history.jsonl").read_text().splitlines()] \
        if (root / "run" / "history.jsonl").exists() else []
    kinds = collections.Counter(e["kind"] for e in events)
    faults_on = [e for e in events if e["kind"] == "fault_on"]
    by_kind = collections.Counter((e.get("detail") or {}).get("kind", "?") for e in faults_on)
    kills = sum(1 for e in events if e["kind"] == "process" and (e.get("detail") or {}).get("action") == "kill")
    if kills:
        by_kind["kill"] = kills
    settings = scenario.topology.settings
    report = result.report
    violations = report.violations if report else []
    lost = sum(int(v.data.get("count", 1)) for v in violations if v.kind == "lost")
    twice = sum(1 for v in violations if v.kind == "twice")
    return {
        "seed": args.seed,
        "duration_s": args.duration,
        "scheduled": len(result.schedule),
        "faults_injected": sum(by_kind.values()),
        "faults_by_kind": dict(sorted(by_kind.items())),
        "envelopes_sent": kinds.get("sent", 0),
        "envelopes_applied": kinds.get("applied", 0),
        "duplicates_dropped": kinds.get("duplicate", 0),
        "gaps": kinds.get("gap", 0),
        "resends": kinds.get("resend", 0),
        "lost": lost,
        "applied_twice": twice,
        "verdict": result.verdict,
        "violations": sorted({v.kind for v in violations}),
        "time_to_converge_s": round(result.converged_in[-1], 1) if result.converged_in else None,
        # after the heal the runner lets the workload run this long (so a late fault is seen
        # on traffic), then pauses it and waits for valid: time_to_converge_s counts from there
        "workload_after_heal_s": settings.resend_after + 2 * settings.sync_interval,
        "wall_s": round(wall, 1),
        "exit": result.exit_code,
        "replay": replay_command(args),
        "run_dir": str(root / "run"),
        "machine": machine_facts(node.amqp_url, None),
    }


def print_table(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"smslab chaos: {r['duration_s']:g} s of faults on the 5-site demo lab, seed {r['seed']}")
    print(f"  faults injected      {r['faults_injected']} of {r['scheduled']} drawn: "
          + ", ".join(f"{k} {n}" for k, n in r["faults_by_kind"].items()))
    print(f"  envelopes sent       {r['envelopes_sent']:,} (applied {r['envelopes_applied']:,};"
          f" duplicates dropped {r['duplicates_dropped']:,}, gaps {r['gaps']:,}, resends {r['resends']:,})")
    print(f"  lost                 {r['lost']}   (goal 0)")
    print(f"  applied twice        {r['applied_twice']}   (goal 0)")
    print(f"  verdict              {r['verdict']}" + (f" ({', '.join(r['violations'])})" if r["violations"] else ""))
    print(f"  time to converge     {r['time_to_converge_s']} s after the workload paused ({r['workload_after_heal_s']:g} s"
          f" after the last heal); {r['wall_s']} s in all")
    print(f"  replay               {r['replay']}")
    print(f"  run directory        {r['run_dir']} (history.jsonl, schedule.json, report.html)")
    print(f"  machine: {m['cores']} cores ({m['cpu'] or '?'}), python {m['python']}, RabbitMQ {m['rabbitmq'] or '?'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of chaos (default 180)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", metavar="DIR", help="keep the run (and the node's folder) in DIR")
    add_json_option(parser)
    args = parser.parse_args(argv)
    return run_cli(lambda: measure(args), args.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
