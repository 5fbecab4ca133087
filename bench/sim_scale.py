"""How fast the simulator runs a lab as it grows: simulated seconds per wall second.

    python bench/sim_scale.py [--sizes 20,150,500,1000] [--seconds 30] [--warmup 10]
                              [--depth 3 --fanout 10 --secondaries 2] [--profile N] [--json]

A benchmark, not a test: it prints figures and asserts nothing about them.

For each size N: ``smslab topology generate --sites N`` with the workload of
examples/lab-20.yaml (2 clients a site), every site started in one simulator (``emulator.sim``:
real runtimes, real SQLite stores, the memory broker, the virtual clock), ``--warmup``
simulated seconds run, then the clock runs for ``--seconds`` simulated seconds. Printed per
size: the time to start every site, simulated seconds per wall second (the goal: 1.0 or more
at 1,000 sites), wall CPU per site per simulated second (flat when cost grows with N),
envelopes applied, CPU per applied envelope (each is one hop of one envelope), loop events.
``--profile N`` prints cProfile's top functions for size N.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from emulator import sim
from emulator.lab import LabDir
from emulator.topogen import generate
from emulator.topology import load_topology


def machine_facts() -> dict[str, Any]:
    import os
    import platform
    import sqlite3

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "") if Path("/proc/cpuinfo").exists() else ""
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "load_before": round(os.getloadavg()[0], 2)}


def measure(n: int, args: argparse.Namespace) -> dict[str, Any]:
    workload = load_topology(ROOT / "examples" / "lab-20.yaml").defaults.workload.model_dump()
    topo = generate(n, depth=args.depth, fanout=args.fanout, secondaries=args.secondaries, clients=2,
                    lab=f"scale{n}", workload=workload)
    root = Path(tempfile.mkdtemp(prefix=f"smslab-simscale-{n}-"))
    try:
        lab = sim.SimLab(LabDir(root / "lab"), topo, seed=1)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        lab.start_all(timeout=120)
        start_wall = time.perf_counter() - wall0
        lab.run(args.warmup)
        applied0, events0 = lab.applied(), lab.loop.events_run
        profiler = cProfile.Profile() if args.profile == n else None
        cpu1, wall1 = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        lab.run(args.seconds)
        if profiler:
            profiler.disable()
        wall = time.perf_counter() - wall1
        cpu = time.process_time() - cpu1
        applied = lab.applied() - applied0
        depths = [_depth(topo, c) for c in topo.codes]
        out = {
            "sites": n, "links": len(topo.links()), "mean_depth": round(sum(depths) / len(depths), 2),
            "start_wall_s": round(start_wall, 2), "simulated_s": args.seconds, "wall_s": round(wall, 2),
            "speed": round(args.seconds / wall, 3), "cpu_s": round(cpu, 2),
            "cpu_ms_per_site_second": round(1000 * cpu / (n * args.seconds), 3),
            "applied": applied, "cpu_us_per_applied": round(1e6 * cpu / applied, 1) if applied else None,
            "events": lab.loop.events_run - events0,
            "setup_cpu_s": round(cpu1 - cpu0, 2),
        }
        if profiler:
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
            out["profile"] = text.getvalue()
        lab.close()
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _depth(topo: Any, code: str) -> int:
    d = 0
    while (parent := topo.parent(code)) is not None:
        code, d = parent, d + 1
    return d


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="20,150,500,1000")
    p.add_argument("--seconds", type=float, default=30.0, help="simulated seconds measured per size")
    p.add_argument("--warmup", type=float, default=10.0, help="simulated seconds run before measuring")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--fanout", type=int, default=10)
    p.add_argument("--secondaries", type=int, default=2)
    p.add_argument("--profile", type=int, default=None, metavar="N", help="profile the run of size N")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        print(f"[bench] {n} sites ...", file=sys.stderr, flush=True)
        rows.append(measure(n, args))
        if not args.json:
            r = rows[-1]
            print(f"  {r['sites']:5d} sites: {r['speed']:6.2f}x real time, start {r['start_wall_s']:.1f}s,"
                  f" {r['cpu_ms_per_site_second']:.3f} CPU ms per site-second, {r['applied']} applied,"
                  f" {r['cpu_us_per_applied']} CPU us each, mean depth {r['mean_depth']}", file=sys.stderr, flush=True)
    facts = machine_facts()
    if args.json:
        print(json.dumps({"machine": facts, "rows": rows}, indent=2))
        return 0
    print(f"machine: {facts}")
    print(f"{'sites':>6} {'links':>6} {'depth':>6} {'start s':>8} {'speed x':>8} {'CPU ms/site-s':>14}"
          f" {'applied':>8} {'CPU us/applied':>15} {'events':>9}")
    for r in rows:
        print(f"{r['sites']:>6} {r['links']:>6} {r['mean_depth']:>6} {r['start_wall_s']:>8} {r['speed']:>8}"
              f" {r['cpu_ms_per_site_second']:>14} {r['applied']:>8} {r['cpu_us_per_applied']!s:>15}"
              f" {r['events']:>9}")
    base = rows[0]
    for r in rows[1:]:
        print(f"  cost per site at {r['sites']} / at {base['sites']}:"
              f" {r['cpu_ms_per_site_second'] / base['cpu_ms_per_site_second']:.2f}")
    for r in rows:
        if "profile" in r:
            print(f"\nprofile of {r['sites']} sites:\n{r['profile']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
