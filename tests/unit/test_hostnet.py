"""Sites on hosts of their own and node partitions, without root or a broker: names, addresses,
the URLs a site in a namespace is given, the partition's rules, the refusals and the commands."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from emulator import faults, hostnet
from emulator.cli import build_parser
from emulator.errors import ConfigError, LabError
from emulator.lab import LabDir, LabInfo
from emulator.topology import parse_topology

TOPOLOGY = parse_topology("lab: t\nsites:\n  - code: CEN\n    type: central\n  - code: P01\n    type: primary\n"
                          "    parent: CEN\n", source="t.yaml")
HOST = hostnet.SiteHost(site="P01", netns="smslab-t-1-p01", veth_host="s0000000001h", veth_ns="s0000000001n",
                        host_address="10.231.0.5", ns_address="10.231.0.6")


def test_names_carry_the_lab_and_fit_an_interface_name() -> None:
    ns, veth_host, veth_ns = hostnet.names_for("demo-abc123", "P01", 7)
    assert ns == "smslab-demo-abc123-p01"
    assert len(veth_host) <= 15 and len(veth_ns) <= 15 and veth_host != veth_ns
    assert hostnet.names_for("demo-abc124", "P01", 7)[1] != veth_host  # another lab, other links


def test_a_free_block_skips_every_address_in_use() -> None:
    used = {ipaddress.IPv4Address("10.231.0.1"), ipaddress.IPv4Address("10.231.0.6")}
    assert str(hostnet._free_block(used)) == "10.231.0.8/30"
    assert str(hostnet._free_block(set())) == "10.231.0.0/30"


def test_a_site_in_a_namespace_finds_the_brokers_of_loopback_at_the_host_end_of_its_link() -> None:
    given = ["amqp://smslab:pw@127.0.0.1:20001/%2F", "amqp://localhost:20002", "amqp://u:p@rabbit-3:5672/%2F"]
    assert hostnet.urls_from(HOST, given) == [
        "amqp://smslab:pw@10.231.0.5:20001/%2F", "amqp://10.231.0.5:20002", "amqp://u:p@rabbit-3:5672/%2F"]


def test_a_partition_cuts_the_node_from_each_peer_both_ways_and_lets_resets_pass() -> None:
    rules = hostnet.partition_rules(("127.0.1.1", 21001), [("127.0.1.2", 21002), ("127.0.1.3", 21003)])
    assert len(rules) == 8
    for rule in rules:
        assert rule[:6] == ["-p", "tcp", "!", "--tcp-flags", "RST", "RST"]
        assert rule[-4:] == ["-j", "REJECT", "--reject-with", "tcp-reset"]
    text = [" ".join(r[6:-4]) for r in rules]
    assert "-s 127.0.1.1 --dport 21002" in text and "-s 127.0.1.2 --dport 21001" in text
    assert "-d 127.0.1.1 --sport 21003" in text and "-d 127.0.1.3 --sport 21001" in text
    assert not any("21002" in t and "21003" in t for t in text)  # the majority keeps its own traffic
    assert hostnet.chain_name("t-1", "f1") != hostnet.chain_name("t-2", "f1")
    assert len(hostnet.chain_name("t-1", "f1")) <= 28


def test_netns_sites_are_checked_against_the_topology() -> None:
    assert hostnet.check_codes(["cen", "P01"], ["CEN", "P01"]) == ["CEN", "P01"]
    assert hostnet.check_codes(["all"], ["CEN", "P01"]) == ["CEN", "P01"]
    with pytest.raises(ConfigError):
        hostnet.check_codes(["X01"], ["CEN", "P01"])


def test_a_site_on_this_hosts_network_cannot_be_isolated(tmp_path: Path) -> None:
    lab_dir = LabDir(tmp_path / "lab")
    info = LabInfo(lab_id="t-1", amqp_urls=["amqp://127.0.0.1:20001"], created=0.0, topology=TOPOLOGY)
    lab_dir.save(info)
    with pytest.raises(LabError) as refused:
        faults.apply_isolate(lab_dir, info, "P01")
    assert "not on a host of its own" in refused.value.message and "--netns P01" in (refused.value.hint or "")
    assert faults.active(lab_dir) == []


def test_a_partition_needs_a_lab_on_a_local_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostnet, "missing", lambda tools=("ip",): None)
    info = LabInfo(lab_id="t-1", amqp_urls=["amqp://127.0.0.1:20001"], created=0.0, topology=TOPOLOGY)
    with pytest.raises(LabError) as refused:
        faults.apply_broker_partition(LabDir(tmp_path / "lab"), info, "1")
    assert "broker-partition needs a lab on a local cluster" in refused.value.message


def test_the_commands_parse() -> None:
    args = build_parser().parse_args(["fault", "isolate", "P01", "--for", "5"])
    assert (args.kind, args.site, args.for_s) == ("isolate", "P01", 5.0)
    args = build_parser().parse_args(["fault", "broker-partition", "2"])
    assert (args.kind, args.node) == ("broker-partition", "2")
    args = build_parser().parse_args(["up", "t.yaml", "--netns", "CEN,P01", "--netns", "S01"])
    assert args.netns == ["CEN,P01", "S01"]
    args = build_parser().parse_args(["broker", "cluster", "up", "--listen", "0.0.0.0"])
    assert args.listen == "0.0.0.0"


def test_a_cluster_beyond_loopback_has_a_user_of_its_own(tmp_path: Path) -> None:
    from broker.local import PARTITION_HANDLING, LocalCluster

    local = LocalCluster(tmp_path / "a", 3, name="unit-a")  # nothing is started
    assert all(u.startswith("amqp://guest:guest@127.0.0.1:") for u in local.urls)
    wide = LocalCluster(tmp_path / "b", 3, name="unit-b", listen="0.0.0.0")
    assert all(u.startswith("amqp://smslab:") and "@127.0.0.1:" in u for u in wide.urls)
    assert [n.dist_source for n in wide.nodes] == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    assert all(PARTITION_HANDLING in n.extra_config and n.listen == "0.0.0.0" for n in wide.nodes)
    assert "inet_dist_connect_options [{ip,{127,0,1,2}}]" in wide.node(2)._env()["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"]


def test_the_quorum_delivery_limit_comes_from_the_topology() -> None:
    from broker import names

    topo = parse_topology("lab: t\nsettings:\n  queue_type: quorum\n  quorum_delivery_limit: 7\nsites:\n"
                          "  - code: CEN\n    type: central\n", source="t.yaml")
    assert topo.settings.quorum_delivery_limit == 7
    assert names.inbox_arguments("quorum", "t-1", topo.settings.quorum_delivery_limit)["x-delivery-limit"] == 7
    assert names.inbox_arguments("quorum", "t-1")["x-delivery-limit"] == names.DELIVERY_LIMIT == 50
    assert parse_topology("lab: t\nsites:\n  - code: CEN\n    type: central\n",
                          source="t.yaml").settings.quorum_delivery_limit == 50
    with pytest.raises(ConfigError):
        parse_topology("lab: t\nsettings:\n  quorum_delivery_limit: 0\nsites:\n  - code: CEN\n    type: central\n",
                       source="t.yaml")
