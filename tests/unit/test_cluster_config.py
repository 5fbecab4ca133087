"""A lab on several broker nodes, without a broker: the URL lists (``--amqp``, SMSLAB_AMQP_URL,
the lab file), the node each site tries first and the failover order, and the arguments of
quorum queues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker import names, urls
from broker.transport import PikaTransport
from emulator.cli import build_parser
from emulator.errors import ConfigError
from emulator.lab import BrokerRef, LabDir, LabInfo
from emulator.topology import parse_topology

A, B, C = (f"amqp://guest:guest@127.0.0.1:{port}/%2F" for port in (20001, 20002, 20003))
TOPOLOGY = parse_topology("lab: t\nsites:\n  - code: CEN\n    type: central\n", source="t.yaml")


@pytest.mark.parametrize(("given", "expected"), [
    (A, [A]),
    (f"{A},{B},{C}", [A, B, C]),
    (f" {A} , {B},,", [A, B]),
    ([A, f"{B},{C}"], [A, B, C]),
    (f"{A},{A},{B}", [A, B]),
    (None, []),
])
def test_broker_urls_split_from_commas_and_lists(given: str | list[str] | None, expected: list[str]) -> None:
    assert urls.split(given) == expected


def test_a_url_that_is_not_amqp_is_refused_with_what_to_write() -> None:
    with pytest.raises(ConfigError) as info:
        urls.split(f"{A},localhost:5672")
    assert "localhost:5672" in info.value.message and "comma-separated" in (info.value.hint or "")


def test_where_names_a_node_without_its_password() -> None:
    assert urls.where(A) == "127.0.0.1:20001"
    assert urls.where("amqp://u:secret@rabbit-2/%2F") == "rabbit-2:5672"
    assert urls.where("amqps://h") == "h:5671"


@pytest.mark.parametrize(("argv", "expected"), [
    (["--amqp", f"{A},{B},{C}", "status"], [A, B, C]),
    (["--amqp", A, "--amqp", B, "status"], [A, B]),
    (["status", "--amqp", A, "--amqp", f"{B},{C}"], [A, B, C]),
    # Given after the command, the option replaces what came before it (like every global option).
    (["--amqp", A, "status", "--amqp", C], [C]),
])
def test_amqp_is_given_comma_separated_or_repeated(argv: list[str], expected: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert urls.split(args.amqp) == expected


def test_the_lab_file_keeps_every_url_and_reads_a_file_of_one_url(tmp_path: Path) -> None:
    lab_dir = LabDir(tmp_path / "lab")
    lab_dir.save(LabInfo(lab_id="t-1", amqp_urls=[A, B, C], created=0.0, topology=TOPOLOGY))
    saved = json.loads(lab_dir.info_path.read_text())
    assert saved["amqp_urls"] == [A, B, C] and "amqp_url" not in saved
    info = lab_dir.load()
    assert info.amqp_urls == [A, B, C]
    assert info.amqp_url == f"{A},{B},{C}"  # what broker.admin and the transport take
    # A lab file written before the list: its one URL (or comma-separated URLs).
    del saved["amqp_urls"]
    saved["amqp_url"] = f"{A},{B}"
    lab_dir.info_path.write_text(json.dumps(saved))
    assert lab_dir.load().amqp_urls == [A, B]
    assert "cluster of 2 nodes (127.0.0.1:20001, 127.0.0.1:20002)" in BrokerRef().describe(lab_dir.load().amqp_url)


def test_status_reads_the_node_a_site_says_it_is_on(tmp_path: Path) -> None:
    lab_dir = LabDir(tmp_path / "lab")
    lab_dir.site_dir("P01").mkdir(parents=True)
    assert lab_dir.broker_node("P01") is None
    lab_dir.broker_file("P01").write_text(json.dumps({"node": "127.0.0.1:20002", "since": 1.0}))
    assert lab_dir.broker_node("P01") == "127.0.0.1:20002"
    lab_dir.broker_file("P01").write_text(json.dumps({"node": None}))
    assert lab_dir.broker_node("P01") is None
    lab_dir.broker_file("P01").write_text("{trunc")
    assert lab_dir.broker_node("P01") is None


def test_sites_spread_over_the_nodes_and_fail_over_in_turn() -> None:
    codes = [f"P{i:02d}" for i in range(1, 31)]
    firsts = {urls.first_choice(code, 3) for code in codes}
    assert firsts == {0, 1, 2}
    assert all(urls.first_choice(code, 3) == urls.first_choice(code, 3) for code in codes)  # stable

    transport = PikaTransport(f"{A},{B},{C}", lab="t-1", site="S01")
    start = urls.first_choice("S01", 3)
    seen = [transport.node]
    assert seen[0] == urls.where([A, B, C][start])
    for _ in range(3):
        transport._fail_over(was_ready=False)
        seen.append(transport.node)
    assert seen[:3] == [urls.where(u) for u in ([A, B, C] * 2)[start:start + 3]]
    assert seen[3] == seen[0]
    assert transport.failures == 3
    transport._fail_over(was_ready=True)  # a connection that had worked: the count starts again
    assert transport.failures == 1
    assert transport.params.port == int(transport.node.split(":")[1])


def test_one_url_keeps_its_one_node() -> None:
    transport = PikaTransport(A, lab="t-1", site="S01")
    transport._fail_over(was_ready=False)
    assert transport.node == "127.0.0.1:20001" and transport.failures == 1


def test_quorum_queues_are_durable_raft_queues_with_a_delivery_limit_into_the_dead_queue() -> None:
    assert names.queue_arguments("classic") == {}
    assert names.inbox_arguments("classic", "t-1") == {}
    assert names.queue_arguments("quorum") == {"x-queue-type": "quorum"}  # the dead queue, relays
    inbox = names.inbox_arguments("quorum", "t-1")
    assert inbox == {"x-queue-type": "quorum", "x-delivery-limit": names.DELIVERY_LIMIT,
                     "x-dead-letter-exchange": names.exchange("t-1"),
                     "x-dead-letter-routing-key": names.DEAD_KEY}
    # What a quorum queue may not have.
    assert not {"x-max-priority", "x-expires", "x-overflow"} & set(inbox)


class _FakeConnection:
    is_open = True

    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_a_channel_whose_publishes_to_one_queue_are_refused_for_seconds_is_given_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from broker import transport as module

    now = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    transport = PikaTransport(f"{A},{B}", lab="t-1", site="S01")
    conn = _FakeConnection()
    transport._conn = conn  # type: ignore[assignment]
    key = names.link_key("S01", "P01")
    transport._note_refusal(key, refused=True)
    now[0] += module.REFUSED_FOR - 0.5
    transport._note_refusal(key, refused=True)
    transport._note_refusal(names.link_key("S01", "S02"), refused=False)  # another queue's ack
    assert conn.closed == 0  # refused, but not long enough
    now[0] += 0.4
    transport._note_refusal(key, refused=False)  # an ack on that key: the queue takes publishes again
    now[0] += module.REFUSED_FOR
    transport._note_refusal(key, refused=True)
    assert conn.closed == 0
    now[0] += module.REFUSED_FOR
    transport._note_refusal(key, refused=True)
    assert conn.closed == 1 and transport._error is not None and key in transport._error


def test_broker_cluster_and_node_kill_commands_parse() -> None:
    args = build_parser().parse_args(["broker", "cluster", "up", "--dir", "/tmp/c", "--nodes", "3"])
    assert (args.kind, args.verb, args.dir, args.nodes) == ("cluster", "up", "/tmp/c", 3)
    args = build_parser().parse_args(["broker", "cluster", "down", "--dir", "/tmp/c"])
    assert args.verb == "down"
    args = build_parser().parse_args(["fault", "broker-node-kill", "2", "--for", "5"])
    assert (args.kind, args.node, args.for_s) == ("broker-node-kill", "2", 5.0)
    args = build_parser().parse_args(["up", "t.yaml", "--cluster", "/tmp/c"])
    assert args.cluster == "/tmp/c"


def test_a_node_of_the_cluster_is_named_by_number_name_or_address(tmp_path: Path) -> None:
    from broker.local import LocalCluster
    from emulator import faults

    cluster = LocalCluster(tmp_path / "c", 3, name="unit")  # nothing is started
    for i, node in enumerate(cluster.nodes, start=1):
        for name in (str(i), node.node_name, node.node_name.split("@")[0], urls.where(node.amqp_url)):
            assert faults._cluster_node(cluster, name) == i
    with pytest.raises(ConfigError) as info:
        faults._cluster_node(cluster, "4")
    assert "its nodes: 1 (" in info.value.message


def test_node_faults_need_a_lab_on_a_local_cluster() -> None:
    from emulator import faults
    from emulator.errors import LabError

    info = LabInfo(lab_id="t-1", amqp_urls=[A, B, C], created=0.0, topology=TOPOLOGY)
    with pytest.raises(LabError) as refused:
        faults._local_cluster(info)
    assert "--cluster" in (refused.value.hint or "")
    with pytest.raises(LabError):
        faults.control_for(LabDir("/nonexistent"), info)  # rabbitmqctl would drive the host's node
