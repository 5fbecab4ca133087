"""The fault daemon's relays on the real broker: healing a link fault drains its relay queue
and deletes it even when a packet lands in the queue after the last get (routed there before
its binding went: the race between a heal restoring the link and the daemon draining), and a
refused delete never closes the channel the daemon's other relays run on.

Seen in a `smslab run scenarios/chaos-2min.yaml` run: the delete of a relay queue was refused
(PRECONDITION_FAILED, not empty) on the hub's channel, the channel closed, the other direction
of the link was never drained and its fault stayed `healing` for 30 s, and the chaos schedule
skipped the faults drawn on that link meanwhile."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from broker import admin, names
from broker.relay import RelayHub
from emulator import faults, history
from emulator.faults import shaper_for
from emulator.lab import LabDir
from emulator.testing import Lab, topology_yaml

pytestmark = pytest.mark.integration


@pytest.fixture
def relay_lab(amqp_url: str) -> Iterator[str]:
    """A lab's broker objects for two sites (no site processes), deleted at the end."""
    lab = f"relaytest-{uuid.uuid4().hex[:6]}"
    admin.declare_lab(amqp_url, lab, ["CEN", "P01"], links=[("CEN", "P01")])
    try:
        yield lab
    finally:
        admin.delete_lab(amqp_url, lab, ["CEN", "P01"], links=[("CEN", "P01")])


def _publish(url: str, lab: str, routing_key: str, body: bytes, exchange: str | None = None) -> None:
    with admin.blocking(url) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(names.exchange(lab) if exchange is None else exchange, routing_key, body,
                         pika.BasicProperties(delivery_mode=2))


def _inbox(url: str, lab: str, site: str) -> list[bytes]:
    out = []
    with admin.blocking(url) as conn:
        ch = conn.channel()
        while True:
            method, _props, body = ch.basic_get(names.site_queue(lab, site), auto_ack=True)
            if method is None:
                return out
            out.append(body)


def test_a_packet_arriving_during_the_drain_is_forwarded_and_the_hub_keeps_its_channel(
        amqp_url: str, relay_lab: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = relay_lab
    relay_q = names.relay_queue(lab, "P01", "CEN")
    hub = RelayHub(amqp_url, lab)
    hub.connect()
    try:
        admin.divert_link(amqp_url, lab, "P01", "CEN")
        hub.open("f1", "P01", "CEN", shaper_for("delay", 1, {"ms": 60_000.0}))  # holds what it sees
        admin.divert_link(amqp_url, lab, "CEN", "P01")
        hub.open("f2", "CEN", "P01", shaper_for("delay", 1, {"ms": 60_000.0}))  # another relay on the hub
        for n in range(3):
            _publish(amqp_url, lab, names.link_key("P01", "CEN"), f"held {n}".encode())
        deadline_polls = 200
        while len(hub.relays[("P01", "CEN")].held) < 3 and deadline_polls:
            hub.poll(0.05)
            deadline_polls -= 1
        assert len(hub.relays[("P01", "CEN")].held) == 3
        admin.restore_link(amqp_url, lab, "P01", "CEN")

        real_delete = BlockingChannel.queue_delete
        injected: list[str] = []

        def late_arrival(self: BlockingChannel, queue: str, *args: Any, **kwargs: Any) -> Any:
            if queue == relay_q and not injected:  # one packet lands after the last get
                _publish(amqp_url, lab, relay_q, b"late", exchange="")
                injected.append(queue)
            return real_delete(self, queue, *args, **kwargs)

        monkeypatch.setattr(BlockingChannel, "queue_delete", late_arrival)
        hub.shut("P01", "CEN")
        monkeypatch.undo()

        assert injected == [relay_q]
        assert hub.connected, "a refused delete closed the hub's channel"
        assert admin.queue_depth(amqp_url, relay_q) is None, "the relay queue was left behind"
        assert sorted(_inbox(amqp_url, lab, "CEN")) == [b"held 0", b"held 1", b"held 2", b"late"]
        # the other relay still works on the same channel: what it holds goes on at its heal
        _publish(amqp_url, lab, names.link_key("CEN", "P01"), b"down")
        admin.restore_link(amqp_url, lab, "CEN", "P01")
        hub.poll(0.2)
        hub.shut("CEN", "P01")
        assert hub.connected
        assert _inbox(amqp_url, lab, "P01") == [b"down"]
        assert admin.queue_depth(amqp_url, names.relay_queue(lab, "CEN", "P01")) is None
    finally:
        hub.close()


def test_two_heals_of_one_fault_record_one_fault_off_and_neither_waits(
        lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault daemon heals a fault at the end of its --for while a command heals it too (or,
    as seen under load, the daemon started a second heal before the first took the lab's
    lock): one fault_off in the history, and the second heal returns as soon as the first
    is done, not after the 30 s drain wait (which then recorded a second fault_off and drew
    the fault in the report as if it had lasted 30 s more)."""
    info = lab.up(topology_yaml([{"code": "CEN", "type": "central", "clients": 0},
                                 {"code": "P01", "type": "primary", "parent": "CEN"}], lab="heal2"))
    spec = faults.apply_link_fault(lab.dir, info, "delay", "P01", "CEN", oneway=False, params={"ms": 200.0},
                                   seed=1)
    real_find, real_drain = faults.find, faults._drain
    second_found = threading.Event()
    took: dict[str, float] = {}

    def find(lab_dir: LabDir, fault_id: str) -> faults.FaultSpec:
        found = real_find(lab_dir, fault_id)
        if threading.current_thread().name == "second":
            second_found.set()
        return found

    def drain(*args: Any, **kwargs: Any) -> None:
        if threading.current_thread().name == "first":  # the second heal finds the fault still there
            second.start()
            assert second_found.wait(30)
        real_drain(*args, **kwargs)

    def heal() -> None:
        started = time.monotonic()
        faults.heal(lab.dir, info, spec.id)
        took[threading.current_thread().name] = time.monotonic() - started

    monkeypatch.setattr(faults, "find", find)
    monkeypatch.setattr(faults, "_drain", drain)
    first = threading.Thread(target=heal, name="first")
    second = threading.Thread(target=heal, name="second")
    first.start()
    first.join(timeout=90)
    second.join(timeout=90)
    assert set(took) == {"first", "second"} and max(took.values()) < 15, took
    offs = [e for e in history.load(lab.dir) if e.kind == "fault_off" and e.fault == spec.id]
    assert len(offs) == 1, offs
    assert faults.active(lab.dir) == []
