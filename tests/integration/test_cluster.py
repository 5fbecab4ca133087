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
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import urls
from broker.local import LocalCluster, find_server
from emulator.errors import SmslabError
from emulator.testing import Lab, topology_yaml, wait_for

pytestmark = pytest.mark.integration

# With three URLs, CEN tries node 3 first, P01 node 2, S01 node 1 (broker.urls.first_choice):
# one site per node. The lab's queues are declared through node 1, which leads them all.
SITES = [
    {"code": "CEN", "type": "central", "clients": 0},
    {"code": "P01", "type": "primary", "parent": "CEN"},
    {"code": "S01", "type": "secondary", "parent": "P01"},
]
WORKLOAD = {"inventory_interval": 0.3, "discovery_interval": 1.0, "status_interval": 0.5,
            "object_interval": 0.5, "scf_interval": 2.0}
SETTINGS = {"queue_type": "quorum", "degraded_after": 20, "failed_after": 40}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    server = find_server()
    if server is None:
        reason = "RabbitMQ is not installed here (find_server() found no rabbitmq-server script)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}, and CI=true requires it")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("cluster")
    handle = LocalCluster(base / "nodes", 3, name=f"t{secrets.token_hex(3)}-lab", server=server)
    try:
        handle.start(timeout=180)
        yield handle
    finally:
        try:
            handle.stop(timeout=30, remove=True)
        except SmslabError:
            for node in handle.nodes:
                node.kill()


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
    nodes = wait_for("every site to report its broker node",
                     lambda: (n := nodes_of_sites(lab)) and all(n.values()) and n, timeout=20)
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
    nodes = wait_for("every site to report its broker node",
                     lambda: (n := nodes_of_sites(lab)) and all(n.values()) and n, timeout=20)
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
