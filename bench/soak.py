"""The 20-site lab at ten times the example workload: how fast its stores grow, with retention
off and with it on.

    python bench/soak.py [--minutes 10] [--sites 20] [--scale 10] [--retention 120]
                         [--phase both|off|on] [--max-objects 50] [--sample 30] [--amqp URL] [--json]

A benchmark, not a test: it prints figures and asserts nothing about them.

Each phase brings up ``examples/lab-20.yaml`` (``--sites`` other than 20: a generated topology
with the same workload per site) with every workload interval divided by ``--scale``, runs it
for ``--minutes`` and reads every site's store every ``--sample`` seconds (rows and bytes per
table, from SQLite's dbstat, and the files on disk). ``off``: every retention setting 0 (keep
everything, as before retention). ``on``: ``history_retention``, ``applied_retention``,
``status_retention`` and ``tombstone_lifetime`` all ``--retention`` seconds, pruned every
``retention_interval`` (``--retention`` / 6). Printed per phase: the growth per hour of each
table over the lab (rows and bytes), before the first retention period has passed (the first
``--retention`` + one pruning interval) and after it (the rest of the run), and the total.
The workload's administrators keep at most ``--max-objects`` live objects per site (then an
admin action deletes one instead of creating one), so live data is bounded too. Goal: with
retention on, flat after the first retention period.
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
    BenchError,
    add_amqp_option,
    add_json_option,
    busy_before_run,
    check_sites_alive,
    log,
    machine_facts,
    run_cli,
    temp_lab,
)

from emulator import orchestrator
from emulator.lab import LabDir
from emulator.topogen import generate
from emulator.topology import Topology, load_topology
from sites.store import SiteStore

RETENTION_KEYS = ("history_retention", "applied_retention", "status_retention", "tombstone_lifetime")


def topology_for(args: argparse.Namespace, phase: str) -> Topology:
    base = load_topology(BENCH.parent / "examples" / "lab-20.yaml")
    workload: dict[str, Any] = {k: (v / args.scale if v else 0.0)
                                for k, v in base.defaults.workload.model_dump().items() if k.endswith("_interval")}
    workload["max_objects"] = args.max_objects
    if phase == "on":
        settings: dict[str, Any] = {k: args.retention for k in RETENTION_KEYS}
        settings["retention_interval"] = max(1.0, args.retention / 6)
    else:
        settings = dict.fromkeys(RETENTION_KEYS, 0.0)
    if args.sites == 20:
        data = base.model_dump(mode="json", exclude_none=True)
        data["lab"] = f"soak-{phase}"
        data["defaults"]["workload"] = workload
        data["settings"] = {**data.get("settings", {}), **settings}
        return Topology.model_validate(data)
    return generate(args.sites, depth=2, fanout=4, secondaries=2, clients=2, lab=f"soak-{phase}",
                    workload=workload, settings=settings)


def sample(lab_dir: LabDir, codes: list[str]) -> dict[str, Any]:
    """Rows and bytes per table summed over the lab's stores, and the stores' files on disk."""
    tables: dict[str, dict[str, int]] = {}
    disk = 0
    for code in codes:
        path = lab_dir.site_db(code)
        disk += sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())
        store = SiteStore(path, readonly=True)
        try:
            for name, t in store.table_sizes().items():
                acc = tables.setdefault(name, {"rows": 0, "bytes": 0})
                acc["rows"] += t["rows"]
                acc["bytes"] += max(t["bytes"], 0)
        finally:
            store.close()
    logs = sum(f.stat().st_size for code in codes for f in lab_dir.site_dir(code).glob("site.log*"))
    return {"t": time.monotonic(), "tables": tables, "disk": disk, "logs": logs}


def growth(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per hour from sample ``a`` to sample ``b``."""
    per = 3600.0 / max(b["t"] - a["t"], 1e-9)
    names = sorted(set(a["tables"]) | set(b["tables"]))
    zero = {"rows": 0, "bytes": 0}
    tables = {n: {k: round((b["tables"].get(n, zero)[k] - a["tables"].get(n, zero)[k]) * per)
                  for k in ("rows", "bytes")} for n in names}
    return {"seconds": round(b["t"] - a["t"], 1), "tables": tables,
            "table_bytes": sum(t["bytes"] for t in tables.values()),
            "disk": round((b["disk"] - a["disk"]) * per), "logs": round((b["logs"] - a["logs"]) * per)}


def run_phase(args: argparse.Namespace, phase: str) -> dict[str, Any]:
    topo = topology_for(args, phase)
    codes = topo.depth_order()
    header = f"# written by bench/soak.py ({phase})\n"
    with temp_lab(f"smslab-soak-{phase}-", header + topo.to_yaml(), f"soak {phase}: ") as (path, lab_dir):
        log(f"{phase}: bringing up {len(codes)} sites at {args.scale:g}x the example workload")
        orchestrator.up(path, lab_dir, args.amqp, timeout=300, progress=lambda m: log(m.strip()))
        samples = [sample(lab_dir, codes)]
        end = samples[0]["t"] + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(max(0.0, min(args.sample, end - time.monotonic())))
            check_sites_alive(lab_dir, tuple(codes), f"soak {phase}")
            samples.append(sample(lab_dir, codes))
            s = samples[-1]
            log(f"{phase}: {s['t'] - samples[0]['t']:.0f}s: {sum(t['bytes'] for t in s['tables'].values()):,}"
                f" table bytes, {s['disk']:,} on disk")
    # "before": until the first retention period (and one pruning) has passed; "after": the rest
    first = samples[0]["t"] + args.retention + max(1.0, args.retention / 6)
    split = next((i for i, s in enumerate(samples) if s["t"] >= first), len(samples) - 1)
    if split >= len(samples) - 1:
        raise BenchError(f"{args.minutes} minute(s) do not reach past the first retention period"
                         f" ({first - samples[0]['t']:.0f}s): run longer or lower --retention")
    last = samples[-1]
    return {
        "phase": phase, "sites": len(codes),
        "before": growth(samples[0], samples[split]),
        "after": growth(samples[split], last),
        "end": {"tables": last["tables"], "table_bytes": sum(t["bytes"] for t in last["tables"].values()),
                "disk": last["disk"], "logs": last["logs"]},
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    load = busy_before_run(args.amqp)
    phases = ["off", "on"] if args.phase == "both" else [args.phase]
    results = [run_phase(args, p) for p in phases]
    return {"minutes": args.minutes, "scale": args.scale, "retention": args.retention, "phases": results,
            "machine": machine_facts(args.amqp, load, sqlite=True, commit=True)}


def _mb(n: float) -> str:
    return f"{n / 1e6:8.2f}"


def print_table(r: dict[str, Any]) -> None:
    print(f"smslab soak: {r['phases'][0]['sites']} sites, {r['scale']:g}x the example workload,"
          f" {r['minutes']:g} min per phase; retention on = {r['retention']:g} s")
    for p in r["phases"]:
        b, a = p["before"], p["after"]
        print(f"\nretention {p['phase']}: growth per hour over the lab, before the first retention period"
              f" ({b['seconds']:.0f} s) | after it ({a['seconds']:.0f} s)")
        print(f"  {'table':<16} {'rows/h':>12} {'MB/h':>8} | {'rows/h':>12} {'MB/h':>8} | {'rows at end':>12}"
              f" {'MB at end':>9}")
        names = sorted(p["end"]["tables"], key=lambda n: -p["end"]["tables"][n]["bytes"])
        for n in names:
            tb, ta, te = b["tables"].get(n), a["tables"].get(n), p["end"]["tables"][n]
            if not te["rows"] and not (tb and tb["rows"]):
                continue
            print(f"  {n:<16} {tb['rows'] if tb else 0:>12,} {_mb(tb['bytes'] if tb else 0)} |"
                  f" {ta['rows'] if ta else 0:>12,} {_mb(ta['bytes'] if ta else 0)} | {te['rows']:>12,} {_mb(te['bytes'])}")
        print(f"  {'all tables':<16} {'':>12} {_mb(b['table_bytes'])} | {'':>12} {_mb(a['table_bytes'])} |"
              f" {'':>12} {_mb(p['end']['table_bytes'])}")
        print(f"  {'files on disk':<16} {'':>12} {_mb(b['disk'])} | {'':>12} {_mb(a['disk'])} |"
              f" {'':>12} {_mb(p['end']['disk'])}")
        print(f"  {'site logs':<16} {'':>12} {_mb(b['logs'])} | {'':>12} {_mb(a['logs'])} |"
              f" {'':>12} {_mb(p['end']['logs'])}")
    m = r["machine"]
    print(f"\nmachine: {m['cores']} cores ({m['cpu'] or '?'}), python {m['python']}, SQLite {m.get('sqlite')},"
          f" RabbitMQ {m['rabbitmq'] or '?'}, busy before {m['cpu_busy_before'] or 0:.0%}, commit {m.get('commit')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes each phase runs")
    parser.add_argument("--sites", type=int, default=20, help="20: examples/lab-20.yaml; else a generated lab")
    parser.add_argument("--scale", type=float, default=10.0, help="times the example workload")
    parser.add_argument("--retention", type=float, default=120.0, help="seconds of every retention setting (on)")
    parser.add_argument("--phase", choices=("both", "off", "on"), default="both")
    parser.add_argument("--max-objects", type=int, default=50,
                        help="live objects each site's administrator keeps (the workload's max_objects)")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between two reads of the stores")
    add_amqp_option(parser)
    add_json_option(parser)
    args = parser.parse_args(argv)
    return run_cli(lambda: measure(args), args.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
