"""Faults a lab on a three-node cluster survives (issue 12, items 3 and 4): sites on hosts of
their own (network namespaces, each reaching the cluster over its own veth), one of them cut
off the network and back (``fault isolate``), and the node that leads every queue of the lab
cut off from the other two (``fault broker-partition``). Each time: nothing lost, nothing
applied twice, the lab converges valid, judged by the checker with the history and by the
stores.

Needs root, iproute2 and iptables (skipped with the reason otherwise) and the RabbitMQ server
installed; its nodes listen on every address (``--listen 0.0.0.0``) with a user of the
cluster's own. Namespaces, veths and rules carry the lab's id and are deleted by ``down``;
the module checks that none is left. The shared broker on 5672 is never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import urls
from broker.local import LocalCluster, find_server
from emulator import history, hostnet
from emulator.testing import Lab, topology_yaml, wait_for
from tests.integration.test_cluster import queue_types

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # minutes each: .ci/run runs them after the default run

SITES: list[dict[str, Any]] = [
    {"code": "CEN", "type": "central", "clients": 0},
    {"code": "P01", "type": "primary", "parent": "CEN"},
    {"code": "S01", "type": "secondary", "parent": "P01"},
]
WORKLOAD = {"inventory_interval": 0.3, "discovery_interval": 1.0, "status_interval": 0.5,
            "object_interval": 0.5, "scf_interval": 2.0}
SETTINGS = {"queue_type": "quorum", "degraded_after": 40, "failed_after": 80, "quorum_delivery_limit": 25}


def smslab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emulator", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _leftovers(lab_id: str) -> list[str]:
    """Namespaces, links and iptables chains of this module's labs still on the host."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
    rules = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, check=False).stdout
    tag = hostnet.names_for(lab_id, "X", 0)[1][:9]
    return ([line for line in netns.splitlines() if f"smslab-{lab_id}-" in line]
            + [line for line in links.splitlines() if f" {tag}" in line]
            + [line for line in rules.splitlines() if line.startswith("-N SMSLAB-")
               and any(hostnet.chain_name(lab_id, f"f{i}") in line for i in range(1, 20))])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    why = hostnet.missing(("ip", "iptables"))
    if why:
        pytest.skip(f"sites on hosts of their own and node partitions need root, ip and iptables: {why}")
    if find_server() is None:
        reason = "RabbitMQ is not installed here (find_server() found no rabbitmq-server script)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{reason}, and CI=true requires it")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("hosts") / "nodes"
    handle: LocalCluster | None = None
    try:
        up = smslab("broker", "cluster", "up", "--dir", str(base), "--nodes", "3", "--listen", "0.0.0.0")
        assert up.returncode == 0, up.stdout + up.stderr
        handle = LocalCluster.load(base)
        assert handle.listen == "0.0.0.0"
        assert up.stdout.strip().splitlines()[-1] == urls.join(handle.urls)
        yield handle
    finally:
        down = smslab("broker", "cluster", "down", "--dir", str(base))
        left = [n for n in (handle.nodes if handle else []) if n.is_running()]
        for node in left:
            node.kill()
        assert down.returncode == 0, down.stdout + down.stderr
        assert not left, f"down left {[n.node_name for n in left]} running"


@pytest.fixture
def cluster_lab(tmp_path: Path, cluster: LocalCluster) -> Iterator[Lab]:
    for i, node in enumerate(cluster.nodes, start=1):
        if not node.is_running():
            cluster.restart_node(i, timeout=120)
    cluster.await_running(timeout=120)
    handle = Lab(tmp_path, urls.join(cluster.urls))
    try:
        yield handle
    finally:
        lab_id = handle.info.lab_id if handle.info else None
        handle.down()
        if lab_id:
            assert not _leftovers(lab_id), f"down left {_leftovers(lab_id)}"


def up_on_cluster(lab: Lab, cluster: LocalCluster, *extra: str) -> None:
    topo = lab.root / "topology.yaml"
    topo.write_text(topology_yaml(SITES, settings=SETTINGS, workload=WORKLOAD))
    lab.cli("up", str(topo), "--cluster", str(cluster.base_dir), *extra)
    lab.info = lab.dir.load()


def nodes_of_sites(lab: Lab) -> dict[str, str | None]:
    return {s["code"]: s["broker_node"] for s in lab.status()["sites"]}


def port_of(where: str | None) -> int | None:
    return int(where.rsplit(":", 1)[1]) if where else None


def acked(lab: Lab, site: str, peer: str) -> int:
    return int(lab.link(site, peer).get("acked_through") or 0)


def assert_nothing_lost_nor_twice(lab: Lab) -> None:
    report = lab.wait_converged(timeout=180)
    assert report.verdict == "valid", report.render()
    assert not {v.kind for v in report.violations} & {"lost", "twice", "reordered", "forgot"}, report.render()
    held = {(c, k): v for c, k, v in lab.query("S01", "SELECT data_class, key, version FROM site_data")}
    assert held
    for ancestor in ("P01", "CEN"):
        theirs = {(c, k): v for c, k, v in lab.query(ancestor, "SELECT data_class, key, version FROM site_data")}
        short = {k: v for k, v in held.items() if theirs.get(k, 0) < v}
        assert not short, f"{ancestor} lacks {len(short)} of S01's records, e.g. {sorted(short)[:3]}"


def fault_marks(lab: Lab, fault_id: str) -> list[tuple[str, str | None]]:
    return [(e.kind, (e.detail or {}).get("kind")) for e in history.load(lab.dir)
            if e.kind in ("fault_on", "fault_off") and e.fault == fault_id]


def test_sites_on_hosts_of_their_own_reach_the_cluster_over_their_own_link_and_one_isolated_comes_back(
        cluster: LocalCluster, cluster_lab: Lab) -> None:
    lab = cluster_lab
    up_on_cluster(lab, cluster, "--netns", "CEN,P01")
    assert lab.info is not None
    hosts = {h.site: h for h in hostnet.hosts(lab.dir)}
    assert sorted(hosts) == ["CEN", "P01"]

    # Each of them runs inside its own namespace and is connected to a node through the host
    # end of its own veth; S01 stays on this host's network.
    for code, host in hosts.items():
        pid = lab.dir.pid(code)
        assert pid is not None
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{host.netns}").st_ino
        assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    nodes = wait_for("every site to report its broker node",
                     lambda: (n := nodes_of_sites(lab)) and all(n.values()) and n, timeout=30)
    assert nodes["CEN"].startswith(hosts["CEN"].host_address + ":"), nodes
    assert nodes["P01"].startswith(hosts["P01"].host_address + ":"), nodes
    assert nodes["S01"].startswith("127.0.0.1:"), nodes

    # A site on this host's network cannot be isolated: refused, and nothing is on.
    refused = lab.cli("fault", "isolate", "S01", check=False)
    assert refused.returncode != 0 and "not on a host of its own" in refused.stderr
    assert json.loads(lab.cli("faults", "--json").stdout) == []

    wait_for("S01's envelopes to reach P01", lambda: acked(lab, "S01", "P01") >= 10, timeout=30)
    wait_for("P01's envelopes to reach CEN", lambda: acked(lab, "P01", "CEN") >= 10, timeout=30)

    # P01's host loses the network under traffic: its link is down, it loses the broker, and its
    # neighbours' envelopes to it wait at the broker; the process itself runs on.
    start = time.monotonic()
    spec = json.loads(lab.cli("fault", "isolate", "P01", "--json").stdout)
    assert spec["kind"] == "isolate" and spec["site"] == "P01"
    assert not hostnet.link_up(hosts["P01"])
    wait_for("P01 to notice it has lost the broker", lambda: nodes_of_sites(lab)["P01"] is None, timeout=90)
    lost_after = time.monotonic() - start
    assert lab.dir.pid("P01") is not None
    s01_acked = acked(lab, "S01", "P01")
    wait_for("S01 to go on sending while P01 is cut off",
             lambda: int(lab.link("S01", "P01").get("next_send_seq") or 0) > s01_acked + 20, timeout=60)
    assert acked(lab, "S01", "P01") <= s01_acked + 1  # nothing reaches an isolated host

    lab.cli("heal", spec["id"])
    healed = time.monotonic()
    assert hostnet.link_up(hosts["P01"])
    wait_for("P01 to reconnect over its link",
             lambda: (w := nodes_of_sites(lab)["P01"]) and w.startswith(hosts["P01"].host_address + ":"), timeout=90)
    wait_for("S01's envelopes held during the isolation to be acknowledged",
             lambda: acked(lab, "S01", "P01") > s01_acked + 20, timeout=90)
    assert_nothing_lost_nor_twice(lab)
    print(f"\nisolate P01: broker lost after {lost_after:.1f}s; heal to converged valid "
          f"{time.monotonic() - healed:.1f}s")
    assert fault_marks(lab, spec["id"]) == [("fault_on", "isolate"), ("fault_off", "isolate")]


def test_the_node_leading_the_queues_partitioned_from_the_other_two_loses_nothing(
        cluster: LocalCluster, cluster_lab: Lab) -> None:
    lab = cluster_lab
    up_on_cluster(lab, cluster)
    assert lab.info is not None
    # The topology's delivery limit is what the inboxes and control queues are declared with.
    queues = queue_types(cluster, lab.info.lab_id)
    inboxes = [args for name, (_kind, args) in queues.items() if name.split(".")[-2] in ("site", "ctl")]
    assert len(inboxes) == 6 and all(args.get("x-delivery-limit") == 25 for args in inboxes), queues
    nodes = wait_for("every site to report its broker node",
                     lambda: (n := nodes_of_sites(lab)) and all(n.values()) and n, timeout=30)
    # S01 is on node 1, which the lab's queues were declared through, so it leads them all.
    victim = cluster.node(1)
    assert port_of(nodes["S01"]) == victim.amqp_port, nodes
    wait_for("S01's envelopes to reach P01", lambda: acked(lab, "S01", "P01") >= 10, timeout=30)
    sent_before = int(lab.link("S01", "P01")["next_send_seq"])

    start = time.monotonic()
    spec = json.loads(lab.cli("fault", "broker-partition", "1", "--json").stdout)
    cut = time.monotonic() - start
    assert spec["kind"] == "broker-partition" and spec["target"] == victim.node_name
    # The majority no longer lists it; it is still alive (paused by pause_minority, not dead).
    others = [cluster.node(2), cluster.node(3)]
    assert victim.node_name not in cluster.running_nodes_seen_by(others[0])
    assert victim.is_running()
    assert hostnet.chain_exists(hostnet.chain_name(lab.info.lab_id if lab.info else "", spec["id"]))

    moved = wait_for("S01 to fail over to the majority",
                     lambda: (p := port_of(nodes_of_sites(lab)["S01"])) and p != victim.amqp_port and p, timeout=90)
    failed_over = time.monotonic() - start
    assert moved in {n.amqp_port for n in others}
    wait_for("S01's envelopes sent after the partition to be acknowledged by P01",
             lambda: acked(lab, "S01", "P01") > sent_before + 10, timeout=90)
    flowing = time.monotonic() - start

    lab.cli("heal", spec["id"])
    assert victim.node_name in cluster.running_nodes()
    assert not hostnet.chain_exists(hostnet.chain_name(lab.info.lab_id if lab.info else "", spec["id"]))
    healed = time.monotonic()
    assert_nothing_lost_nor_twice(lab)
    print(f"\nbroker-partition node 1: detected in {cut:.1f}s, S01 failed over at {failed_over:.1f}s, "
          f"its new envelopes acknowledged at {flowing:.1f}s; heal to converged valid "
          f"{time.monotonic() - healed:.1f}s")
    assert fault_marks(lab, spec["id"]) == [("fault_on", "broker-partition"), ("fault_off", "broker-partition")]
