"""The 5-site lab on a three-node RabbitMQ cluster with quorum queues against one node with
classic queues, in one run; then a node of the cluster killed under traffic.

    python bench/cluster.py [--count 10000] [--repeat 3] [--kill-count 20000] [--deadline 300]
                            [--no-kill] [--json]

A benchmark, not a test: it prints figures and asserts nothing about them. Needs RabbitMQ
installed (not running): it starts its own brokers on this host with ``broker.local`` (a
private node, then a local cluster of three: own names, ports and folders) and stops and
removes them at the end, also on errors, Ctrl-C or SIGTERM. The host's broker is not used.

1. Steady link throughput. The demo lab (CEN; P01, P02 under it; S01 under P01, S02 under P02),
   no clients, every workload interval 0, is brought up on the broker; S01 and S02 are each
   told to ``burst`` N inventory envelopes, which travel S->P->CEN (two hops each). The bench
   polls every site's store read-only and counts the envelopes applied on all four links (the
   receivers' ``next_expected``). Steady throughput: link envelopes per second between the
   moments 20 % and 80 % of all of them were applied. Also: the time until CEN applied every
   envelope and every outbox was empty. Once on a single node with ``queue_type: classic``,
   once on the cluster with ``queue_type: quorum``, alternated ``--repeat`` times with both
   brokers up; the ratio of the medians cluster/single.
2. A node killed (cluster only). P01 and P02 each burst K envelopes (to CEN, one hop; K is
   2 N by default, so the traffic lasts well past the kill); when CEN has applied a quarter of
   them, the node S01 is connected to (node 1, which also
   leads every queue of the lab: they were declared through it) is killed (SIGKILL of its
   pid). Timed from the kill: every site connected again (to a node still up), and converged
   (every site reconnected, every burst at CEN, every link acknowledged through what was sent,
   every outbox empty), then the checker's verdict with the history (nothing lost, nothing
   applied twice). S01 carries no burst then (a second burst of a site reuses its keys at
   version 1, stale): its connection dies with the node, the primaries' traffic goes on through
   the election of new leaders for every queue.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from _common import (
    BenchError,
    add_json_option,
    check_sites_alive,
    log,
    machine_busy,
    machine_facts,
    run_cli,
    temp_lab,
)

from broker import admin, urls
from broker.local import LocalCluster, LocalNode, find_server
from emulator import checker, orchestrator, status
from emulator.lab import LabDir

SITES = ("CEN", "P01", "P02", "S01", "S02")
LINKS = (("P01", "CEN"), ("P02", "CEN"), ("S01", "P01"), ("S02", "P02"))  # (child, parent)
POLL = 0.05


def topology(queue_type: str) -> str:
    return f"""\
# written by bench/cluster.py: the demo hierarchy, no workload, only the bursts travel
lab: bench-{queue_type}
mode: sms20
defaults:
  clients: 0
  workload:
    inventory_interval: 0
    discovery_interval: 0
    status_interval: 0
    object_interval: 0
    scf_interval: 0
settings:
  queue_type: {queue_type}
  degraded_after: 30
  failed_after: 60
sites:
  - {{code: CEN, type: central}}
  - {{code: P01, type: primary, parent: CEN}}
  - {{code: P02, type: primary, parent: CEN}}
  - {{code: S01, type: secondary, parent: P01}}
  - {{code: S02, type: secondary, parent: P02}}
"""


# -- reading the lab -------------------------------------------------------------------------------


def snapshot(lab_dir: LabDir) -> dict[str, Any]:
    """Per site its store's links and outbox (read-only); missing stores raise."""
    snaps = {}
    for code in SITES:
        snap = status.read_site(lab_dir, code)
        if snap is None:
            raise BenchError(f"cannot read {code}'s store in {lab_dir.path}")
        snaps[code] = snap
    return snaps


def applied_total(snaps: dict[str, Any]) -> int:
    """Envelopes applied on all links, both directions (receivers' next_expected - 1)."""
    total = 0
    for child, parent in LINKS:
        total += snaps[parent]["links"][child].next_expected - 1
        total += snaps[child]["links"][parent].next_expected - 1
    return total


def applied_at_cen(snaps: dict[str, Any]) -> int:
    return sum(snaps["CEN"]["links"][p].next_expected - 1 for p in ("P01", "P02"))


def quiet(snaps: dict[str, Any]) -> bool:
    """Every link acknowledged through what was sent, both ways, and every outbox empty."""
    for child, parent in LINKS:
        for a, b in ((child, parent), (parent, child)):
            link = snaps[a]["links"][b]
            if link.acked_through != link.sent_through or snaps[b]["links"][a].next_expected - 1 != link.sent_through:
                return False
    return all(sum(s["outbox"].values()) == 0 for s in snaps.values())


# -- 1. steady throughput ------------------------------------------------------------------------------


def burst(url: str, lab_id: str, sites: tuple[str, ...], count: int) -> None:
    for site in sites:
        answer = admin.control_request(url, lab_id, site, {"cmd": "burst", "count": count, "keys": count})
        if not answer.get("ok", False):
            raise BenchError(f"{site} refused the burst: {answer}")


def throughput_run(url: str, queue_type: str, count: int, deadline: float,
                   kill: LocalCluster | None = None, kill_count: int = 0) -> dict[str, Any]:
    what = f"{queue_type}"
    with temp_lab(f"smslab-bench-{queue_type}-", topology(queue_type), f"{what}: ") as (topo, lab_dir):
        info = orchestrator.up(topo, lab_dir, url, timeout=120, progress=lambda m: log(f"{what}: {m.strip()}"))
        snaps = snapshot(lab_dir)
        before, cen_before = applied_total(snaps), applied_at_cen(snaps)
        # Each burst envelope is applied twice (S->P, P->CEN); the acks and heartbeats are not
        # envelopes and are not counted.
        expected = 4 * count
        samples: list[tuple[float, int]] = []
        t0 = time.monotonic()
        burst(url, info.lab_id, ("S01", "S02"), count)
        t_cen = None
        while True:
            now = time.monotonic()
            snaps = snapshot(lab_dir)
            samples.append((now, applied_total(snaps) - before))
            if t_cen is None and applied_at_cen(snaps) - cen_before >= 2 * count:
                t_cen = now
            if t_cen is not None and quiet(snaps):
                break
            if now - t0 > deadline:
                raise BenchError(f"{what}: deadline of {deadline:.0f}s passed with {samples[-1][1]} of "
                                 f"{expected} link envelopes applied")
            check_sites_alive(lab_dir, SITES, what)
            time.sleep(POLL)
        t_done = time.monotonic()
        result: dict[str, Any] = {
            "queue_type": queue_type, "nodes": len(urls.split(url)), "count_per_secondary": count,
            "link_envelopes": samples[-1][1],
            "steady_link_envelopes_per_s": steady_rate(samples),
            "all_at_cen_s": round((t_cen or t_done) - t0, 3),
            "quiet_s": round(t_done - t0, 3),
        }
        result["overall_link_envelopes_per_s"] = round(result["link_envelopes"] / (t_done - t0), 1)
        log(f"{what}: {result['link_envelopes']} link envelopes, steady {result['steady_link_envelopes_per_s']}/s, "
            f"all at CEN in {result['all_at_cen_s']}s")
        if kill is not None:
            result["kill"] = kill_run(url, info.lab_id, lab_dir, kill, kill_count, deadline)
        return result


def steady_rate(samples: list[tuple[float, int]]) -> float | None:
    """Envelopes per second between the first samples at 20 % and at 80 % of the final count."""
    final = samples[-1][1]
    if final <= 0:
        return None
    t20 = next(t for t, n in samples if n >= 0.2 * final)
    n20 = next(n for t, n in samples if n >= 0.2 * final)
    t80, n80 = next((t, n) for t, n in samples if n >= 0.8 * final)
    return round((n80 - n20) / (t80 - t20), 1) if t80 > t20 else None


# -- 2. a node killed ------------------------------------------------------------------------------------


def kill_run(url: str, lab_id: str, lab_dir: LabDir, cluster: LocalCluster, count: int,
             deadline: float) -> dict[str, Any]:
    nodes = {code: lab_dir.broker_node(code) for code in SITES}
    where = nodes["S01"]
    if where is None:
        raise BenchError(f"S01 does not say which node it is on: {nodes}")
    index = next(i for i, u in enumerate(cluster.urls, start=1) if urls.where(u) == where)
    on_victim = sorted(code for code, node in nodes.items() if node == where)
    snaps = snapshot(lab_dir)
    cen_before = applied_at_cen(snaps)
    burst(url, lab_id, ("P01", "P02"), count)
    t_start = time.monotonic()
    while applied_at_cen(snapshot(lab_dir)) - cen_before < count // 2:  # a quarter of the 2N
        if time.monotonic() - t_start > deadline:
            raise BenchError("kill: the bursts never got going")
        time.sleep(POLL)
    log(f"kill: killing node {index} ({cluster.node(index).node_name}, {where}), which {', '.join(on_victim)} "
        f"{'is' if len(on_victim) == 1 else 'are'} on, under traffic")
    t_kill = time.monotonic()
    cluster.kill_node(index)
    t_reconnected = t_converged = None
    last_count, last_progress, longest_stall = applied_at_cen(snapshot(lab_dir)), t_kill, 0.0
    while True:
        now = time.monotonic()
        if t_reconnected is None:
            now_on = {code: lab_dir.broker_node(code) for code in SITES}
            if all(node is not None and node != where for node in now_on.values()):
                t_reconnected = now
        snaps = snapshot(lab_dir)
        at_cen = applied_at_cen(snaps)
        if at_cen > last_count:
            longest_stall = max(longest_stall, now - last_progress)
            last_count, last_progress = at_cen, now
        # Converged: every site back on a node that is up, the bursts all at CEN, every link quiet.
        if (t_converged is None and t_reconnected is not None
                and applied_at_cen(snaps) - cen_before >= 2 * count and quiet(snaps)):
            t_converged = now
        if t_reconnected is not None and t_converged is not None:
            break
        if now - t_kill > deadline:
            raise BenchError(f"kill: not reconnected and converged {deadline:.0f}s after the kill "
                             f"(reconnected: {t_reconnected is not None})")
        check_sites_alive(lab_dir, SITES, "kill")
        time.sleep(POLL)
    for code in SITES:
        if lab_dir.pid(code):
            admin.control_request(url, lab_id, code, {"cmd": "pause-workload"})
    report = checker.check(lab_dir)
    counts: dict[str, int] = {}
    for v in report.violations:
        counts[v.kind] = counts.get(v.kind, 0) + 1
    result = {
        "node": cluster.node(index).node_name, "sites_on_it": on_victim,
        "reconnected_s": round(t_reconnected - t_kill, 3),
        "converged_s": round(t_converged - t_kill, 3),
        # The longest time CEN applied nothing new after the kill (while the bursts went on):
        # how long the kill held up the traffic.
        "longest_stall_s": round(longest_stall, 3),
        "burst_per_primary": count,
        "verdict": report.verdict, "violations": counts,
        "moved_to": {code: lab_dir.broker_node(code) for code in on_victim},
    }
    log(f"kill: every site reconnected {result['reconnected_s']}s and converged {result['converged_s']}s after "
        f"the kill; CEN stalled at most {result['longest_stall_s']}s; checker: {report.verdict}")
    return result


# -- the brokers -----------------------------------------------------------------------------------------


@contextmanager
def brokers(tag: str) -> Iterator[tuple[Path, list[Any]]]:
    """A folder for the brokers and the list of them to stop, stopped and removed at the end."""
    base = Path(tempfile.mkdtemp(prefix="smslab-bench-brokers-"))
    started: list[Any] = []
    try:
        yield base, started
    finally:
        for broker in started:
            try:
                broker.stop(timeout=30)
            except Exception as exc:  # noqa: BLE001 - a node that will not stop is killed
                log(f"WARNING: stopping {broker}: {exc}; killing it")
                for node in getattr(broker, "nodes", [broker]):
                    node.kill()
        shutil.rmtree(base, ignore_errors=True)
        log(f"brokers of {tag} stopped and removed")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    if find_server() is None:
        raise BenchError("RabbitMQ is not installed here: this bench starts its own nodes")
    tag = f"b{os.getpid()}"
    load = machine_busy()
    with brokers(tag) as (base, started):
        # Both brokers up for the whole run, the runs alternated: the machine's other work then
        # weighs on both alike, and the medians are compared.
        single = LocalNode(base / "single", name=f"{tag}-single")
        cluster = LocalCluster(base / "cluster", 3, name=tag)
        started += [single, cluster]
        log("starting a single private node (classic queues)")
        t = time.monotonic()
        single.start(timeout=120)
        single_start = time.monotonic() - t
        log("starting a local cluster of three nodes (quorum queues)")
        t = time.monotonic()
        cluster.start(timeout=180)
        cluster_start = time.monotonic() - t
        singles, clusters = [], []
        for i in range(args.repeat):
            last = i == args.repeat - 1
            log(f"run {i + 1} of {args.repeat}")
            singles.append(throughput_run(single.amqp_url, "classic", args.count, args.deadline))
            clusters.append(throughput_run(urls.join(cluster.urls), "quorum", args.count, args.deadline,
                                           kill=cluster if last and not args.no_kill else None,
                                           kill_count=args.kill_count or 2 * args.count))
        facts = machine_facts(single.amqp_url, load, sqlite=True, commit=True)
    one, three = summary(singles), summary(clusters)
    ratio = None
    if one["steady_link_envelopes_per_s"] and three["steady_link_envelopes_per_s"]:
        ratio = round(three["steady_link_envelopes_per_s"] / one["steady_link_envelopes_per_s"], 3)
    three["kill"] = clusters[-1].get("kill")
    return {"single_classic": one, "cluster_quorum": three, "ratio_cluster_to_single": ratio,
            "runs": {"single_classic": singles, "cluster_quorum": clusters},
            "broker_start_s": {"single": round(single_start, 1), "cluster": round(cluster_start, 1)},
            "machine": facts}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the runs' figures (and every run's steady rate)."""
    out: dict[str, Any] = {k: runs[0][k] for k in ("queue_type", "nodes", "count_per_secondary", "link_envelopes")}
    for key in ("steady_link_envelopes_per_s", "overall_link_envelopes_per_s", "all_at_cen_s", "quiet_s"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["steady_each_run"] = [r["steady_link_envelopes_per_s"] for r in runs]
    return out


def print_table(r: dict[str, Any]) -> None:
    one, three = r["single_classic"], r["cluster_quorum"]
    print(f"5-site lab, {one['count_per_secondary']} envelopes burst at S01 and at S02 (two hops each)")
    print(f"{'(medians of the runs)':28} {'1 node, classic':>16} {'3 nodes, quorum':>16}")
    for key, label in (("steady_link_envelopes_per_s", "steady link envelopes/s"),
                       ("overall_link_envelopes_per_s", "overall link envelopes/s"),
                       ("all_at_cen_s", "all at CEN (s)"), ("quiet_s", "every link quiet (s)")):
        print(f"{label:28} {one[key]!s:>16} {three[key]!s:>16}")
    print(f"{'steady, each run':28} {one['steady_each_run']!s:>16} {three['steady_each_run']!s:>16}")
    print(f"ratio cluster/single (median steady): {r['ratio_cluster_to_single']}")
    kill = three.get("kill")
    if kill:
        print(f"node killed under traffic: {kill['node']} (sites on it: {', '.join(kill['sites_on_it'])}, "
              f"moved to {kill['moved_to']})")
        print(f"  every site reconnected {kill['reconnected_s']} s after the kill, converged {kill['converged_s']} s "
              f"after it; CEN stalled at most {kill['longest_stall_s']} s ({kill['burst_per_primary']} envelopes burst at "
              f"P01 and at P02 across it); checker: {kill['verdict']} {kill['violations'] or ''}")
    m = r["machine"]
    print(f"brokers started in {r['broker_start_s']}; machine: {m.get('cores')} cores, {m.get('cpu')}, "
          f"RabbitMQ {m.get('rabbitmq')}, CPUs busy before {m.get('cpu_busy_before')}, commit {m.get('commit')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10000, help="envelopes burst at each secondary (default 10000)")
    parser.add_argument("--kill-count", type=int, default=0,
                        help="envelopes burst at each primary across the node kill (default 2 x --count)")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds each phase may take (default 300)")
    parser.add_argument("--repeat", type=int, default=3, help="runs on each broker, alternated (default 3)")
    parser.add_argument("--no-kill", action="store_true", help="skip the node kill")
    add_json_option(parser)
    args = parser.parse_args()
    return run_cli(lambda: measure(args), args.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
