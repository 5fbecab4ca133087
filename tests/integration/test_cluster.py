"""A lab on a three-node RabbitMQ cluster of this host with quorum queues (issue 12): it
converges valid, and a node killed under traffic (the one a site is connected to, which also
leads every queue of the lab) loses nothing and applies nothing twice.

Needs the RabbitMQ server installed (broker/local.py starts the nodes), not a running broker;
the shared broker on 5672 is never touched. Judged by the checker, with the lab's history (an
acknowledged envelope never consumed, or one consumed twice, makes the lab invalid), and by the
site stores; nothing on log text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import urls
from broker.local import LocalCluster, find_server
from emulator import history
from emulator.testing import Lab, topology_yaml, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a three-node cluster: in the slow suite (.ci/run runs it)

# With three URLs, CEN tries node 3 first, P01 node 2, S01 node 1 (broker.urls.first_choice):
# one site per node. The lab's queues are declared through node 1, which leads them all.
SITES: list[dict[str, Any]] = [
    {"code": "CEN", "type": "central", "clients": 0},
    {"code": "P01", "type": "primary", "parent": "CEN"},
    {"code": "S01", "type": "secondary", "parent": "P01"},
]
WORKLOAD = {"inventory_interval": 0.3, "discovery_interval": 1.0, "status_interval": 0.5,
            "object_interval": 0.5, "scf_interval": 2.0}
SETTINGS = {"queue_type": "quorum", "degraded_after": 20, "failed_after": 40}


def smslab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emulator", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three nodes started as a user starts them, ``smslab broker cluster up``, and always
    stopped and removed at the end (``down``; kill -9 of what it left)."""
    if find_server() is None:
        reason = "RabbitMQ is not installed here (find_server() found no rabbitmq-server script)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{reason}, and CI=true requires it")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("cluster") / "nodes"
    handle: LocalCluster | None = None
    try:
        up = smslab("broker", "cluster", "up", "--dir", str(base), "--nodes", "3")
        assert up.returncode == 0, up.stdout + up.stderr
        handle = LocalCluster.load(base)
        # Its last line: the nodes' AMQP URLs comma-separated, ready for --amqp.
        assert up.stdout.strip().splitlines()[-1] == urls.join(handle.urls)
        assert len(set(handle.urls)) == 3
        assert sorted(handle.running_nodes()) == sorted(handle.node_names)
        yield handle
    finally:
        down = smslab("broker", "cluster", "down", "--dir", str(base))
        left = [n for n in (handle.nodes if handle else []) if n.is_running()]
        for node in left:
            node.kill()
        assert down.returncode == 0, down.stdout + down.stderr
        assert not left, f"down left {[n.node_name for n in left]} running"
        assert not base.exists(), f"down left {base}"


@pytest.fixture
def cluster_lab(tmp_path: Path, cluster: LocalCluster) -> Iterator[Lab]:
    # Every node runs at the start of each test (a test before may have killed one).
    for i, node in enumerate(cluster.nodes, start=1):
        if not node.is_running():
            cluster.restart_node(i, timeout=120)
    handle = Lab(tmp_path, urls.join(cluster.urls))
    try:
        yield handle
    finally:
        handle.down()


def queue_types(cluster: LocalCluster, lab_id: str) -> dict[str, tuple[str, dict[str, object]]]:
    """Queue name -> (type, arguments) of the lab's queues, as a running node lists them."""
    node = next(n for n in cluster.nodes if n.is_running())
    rows = json.loads(node.ctl("list_queues", "name", "type", "arguments", "--formatter", "json", timeout=60))
    return {r["name"]: (r["type"], _arguments(r["arguments"])) for r in rows
            if r["name"].startswith(f"smslab.{lab_id}.")}


def _arguments(raw: object) -> dict[str, object]:
    # rabbitmqctl's JSON gives a table as a dict, or as [name, value] / [name, type, value] rows.
    if isinstance(raw, dict):
        return dict(raw)
    assert isinstance(raw, list), raw
    return {row[0]: row[-1] for row in raw}


def nodes_of_sites(lab: Lab) -> dict[str, str | None]:
    return {s["code"]: s["broker_node"] for s in lab.status()["sites"]}


def every_site_connected(lab: Lab) -> dict[str, str] | None:
    """Site -> the node it is connected to, once every site is connected."""
    nodes = nodes_of_sites(lab)
    return {code: where for code, where in nodes.items() if where} if all(nodes.values()) else None


def node_index(cluster: LocalCluster, where: str) -> int:
    return next(i for i, url in enumerate(cluster.urls, start=1) if urls.where(url) == where)


def test_a_lab_on_a_three_node_cluster_with_quorum_queues_converges_valid(
        cluster: LocalCluster, cluster_lab: Lab) -> None:
    lab = cluster_lab
    info = lab.up(topology_yaml(SITES, settings=SETTINGS, workload=WORKLOAD))
    assert info.amqp_urls == cluster.urls  # the lab file keeps every node

    # Every queue of the lab is a quorum queue: the inboxes and control queues with a delivery
    # limit and dead-lettering to the lab's dead-letter queue, which is one too.
    queues = queue_types(cluster, info.lab_id)
    expected = {f"smslab.{info.lab_id}.{kind}.{code}" for kind in ("site", "ctl") for code in ("CEN", "P01", "S01")}
    assert expected | {f"smslab.{info.lab_id}.dead"} <= set(queues)
    assert {name: kind for name, (kind, _args) in queues.items()} == {name: "quorum" for name in queues}
    for name in expected:
        args = queues[name][1]
        assert args.get("x-delivery-limit") == 50 and args.get("x-dead-letter-exchange") == f"smslab.{info.lab_id}"

    # Each site is connected to a node of the cluster, and status says which: one per node.
    nodes = wait_for("every site to report its broker node", lambda: every_site_connected(lab), timeout=20)
    assert sorted(nodes.values()) == sorted(urls.where(u) for u in cluster.urls), nodes
    assert "broker " in lab.cli("status").stdout

    wait_for("S01's records to reach the central site",
             lambda: lab.query("CEN", "SELECT COUNT(*) FROM site_data WHERE origin='S01'")[0][0] >= 5, timeout=30)
    report = lab.wait_converged(timeout=90)
    assert report.verdict == "valid", report.render()


def test_the_node_a_site_is_on_killed_under_traffic_loses_nothing_and_applies_nothing_twice(
        cluster: LocalCluster, cluster_lab: Lab) -> None:
    lab = cluster_lab
    lab.up(topology_yaml(SITES, settings=SETTINGS, workload=WORKLOAD))
    nodes = wait_for("every site to report its broker node", lambda: every_site_connected(lab), timeout=20)
    victim_where = nodes["S01"]
    assert victim_where is not None
    victim = node_index(cluster, victim_where)
    assert victim == 1, f"S01 should be on node 1, which leads the lab's queues: {nodes}"

    # Traffic first: S01's uplink has carried envelopes, and goes on while the node dies.
    wait_for("S01 to have sent envelopes to P01", lambda: (lab.link("S01", "P01").get("acked_through") or 0) >= 10,
             timeout=30)
    sent_before = int(lab.link("S01", "P01")["next_send_seq"])
    cluster.kill_node(victim)  # kill -9 of the node's pid
    assert not cluster.node(victim).is_running()

    # S01 fails over to another node; status shows it there; the other sites never left theirs.
    moved = wait_for("S01 to reconnect to another node",
                     lambda: (w := nodes_of_sites(lab)["S01"]) and w != victim_where and w, timeout=60)
    assert moved in {urls.where(u) for u in cluster.urls} - {victim_where}
    # The workload kept running on the two nodes left: envelopes sent after the kill are acknowledged.
    wait_for("S01's envelopes sent after the kill to be acknowledged by P01",
             lambda: int(lab.link("S01", "P01").get("acked_through") or 0) > sent_before + 10, timeout=60)
    wait_for("the central site to acknowledge P01's envelopes after the kill",
             lambda: int(lab.link("P01", "CEN").get("acked_through") or 0) > 0, timeout=30)

    # Converged valid: the checker with the history finds no acknowledged envelope that was never
    # consumed (lost) and none consumed twice (twice).
    report = lab.wait_converged(timeout=120)
    assert report.verdict == "valid", report.render()
    kinds = {v.kind for v in report.violations}
    assert not kinds & {"lost", "twice", "reordered", "forgot"}, report.render()
    # Every record S01 made is at P01 and at the central site, at its version.
    held = {(c, k): v for c, k, v in lab.query("S01", "SELECT data_class, key, version FROM site_data")}
    for ancestor in ("P01", "CEN"):
        theirs = {(c, k): v for c, k, v in lab.query(ancestor, "SELECT data_class, key, version FROM site_data")}
        short = {k: v for k, v in held.items() if theirs.get(k, 0) < v}
        assert not short, f"{ancestor} lacks {len(short)} of S01's records, e.g. {sorted(short)[:3]}"

    # The killed node started again rejoins the cluster (and the lab's teardown does not wait on
    # the quorum queues' missing member).
    cluster.restart_node(victim, timeout=120)
    assert cluster.node(victim).node_name in cluster.running_nodes()


def test_fault_broker_node_kill_on_a_lab_up_on_the_local_cluster_then_heal(
        cluster: LocalCluster, cluster_lab: Lab) -> None:
    lab = cluster_lab
    topo = lab.root / "topology.yaml"
    topo.write_text(topology_yaml(SITES, settings=SETTINGS, workload=WORKLOAD))
    lab.cli("up", str(topo), "--cluster", str(cluster.base_dir))
    lab.info = lab.dir.load()
    assert lab.info.broker.kind == "cluster" and lab.info.amqp_urls == cluster.urls
    nodes = wait_for("every site to report its broker node", lambda: every_site_connected(lab), timeout=20)
    where = urls.where(cluster.urls[1])
    on_it = sorted(code for code, node in nodes.items() if node == where)
    assert on_it == ["P01"], nodes

    spec = json.loads(lab.cli("fault", "broker-node-kill", "2", "--json").stdout)
    assert spec["kind"] == "broker-node-kill" and spec["target"] == cluster.node(2).node_name
    assert not cluster.node(2).is_running()
    assert [row["kind"] for row in json.loads(lab.cli("faults", "--json").stdout)] == ["broker-node-kill"]
    wait_for("P01 to fail over to a node still up",
             lambda: (w := nodes_of_sites(lab)["P01"]) is not None and w != where, timeout=60)
    acked = int(lab.link("P01", "CEN").get("acked_through") or 0)
    wait_for("P01's envelopes to flow to CEN on two nodes",
             lambda: int(lab.link("P01", "CEN").get("acked_through") or 0) > acked + 5, timeout=60)

    lab.cli("heal", spec["id"])
    assert cluster.node(2).is_running() and cluster.node(2).node_name in cluster.running_nodes()
    assert json.loads(lab.cli("faults", "--json").stdout) == []
    report = lab.wait_converged(timeout=120)
    assert report.verdict == "valid", report.render()
    marks = [(e.kind, (e.detail or {}).get("kind")) for e in history.load(lab.dir)
             if e.kind in ("fault_on", "fault_off") and e.fault == spec["id"]]
    assert marks == [("fault_on", "broker-node-kill"), ("fault_off", "broker-node-kill")]
