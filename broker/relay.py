"""The relays of link faults, on RabbitMQ: consume a link's relay queue, do what the fault's
shaper says with each message, republish to the receiver's inbox.

One ``RelayHub`` (one connection, one channel, publisher confirms) serves every faulted link of
a lab, driven by the lab's fault daemon (``emulator.labd``). A message is acknowledged on the
relay queue only once its copies are confirmed in the receiver's inbox (or once it is
dropped, when the fault says so), so a daemon killed at any moment loses nothing: what it held
goes back to the relay queue and is taken again.

Republished messages use the receiver's own key (``site.<CODE>``), which no fault diverts.
In a lab with per-site identities the relay logs in as the lab's controller, an
``impersonator``: it keeps each message's ``user_id`` (the sender's), so the receiver still
knows who published it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from broker import admin, names
from emulator.errors import BrokerUnavailable
from emulator.protocol.shaping import Release, Shaper, envelopes_in

log = logging.getLogger("broker.relay")

PREFETCH = 20_000  # messages a relay may hold (delayed, reordered, partitioned)


@dataclass
class Held:
    tag: int
    body: bytes
    user_id: str | None = None


@dataclass
class Counters:
    seen: int = 0
    forwarded: int = 0
    dropped: int = 0
    duplicated: int = 0
    envelopes_seen: int = 0
    envelopes_dropped: int = 0
    envelopes_duplicated: int = 0


# (fault id, link "A->B", action, envelopes, first seq, last seq)
RelayEvent = tuple[str, str, str, int, int | None, int | None]


@dataclass
class LinkRelay:
    fault: str
    sender: str
    receiver: str
    shaper: Shaper
    consumer: str = ""
    held: dict[int, Held] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    next_mid: int = 0

    @property
    def name(self) -> str:
        return f"{self.sender}->{self.receiver}"


class RelayHub:
    def __init__(self, url: str, lab: str, *, on_event: Callable[[RelayEvent], None] | None = None,
                 clock: Callable[[], float] = time.time, keep_user_id: bool = False) -> None:
        self.url = url
        self.keep_user_id = keep_user_id  # identities: republish with the sender's user_id
        self.lab = lab
        self.clock = clock
        self.on_event = on_event
        self.relays: dict[tuple[str, str], LinkRelay] = {}
        self._conn: BlockingConnection | None = None
        self._ch: BlockingChannel | None = None

    # -- connection ---------------------------------------------------------------------------

    def connect(self) -> None:
        params_list = admin.all_parameters(self.url)  # a cluster's nodes: the first that answers
        for params in params_list:
            params.heartbeat = 30
            params.connection_attempts = 1
            params.client_properties = {"connection_name": f"smslab:{self.lab}:relay"}
        try:
            self._conn = pika.BlockingConnection(params_list)
            self._ch = self._conn.channel()
            self._ch.confirm_delivery()
            self._ch.basic_qos(prefetch_count=PREFETCH)
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise BrokerUnavailable(f"the relay cannot reach the broker: {exc!r}") from exc
        for key, relay in list(self.relays.items()):  # after a reconnect: what we held was requeued
            relay.held.clear()
            relay.shaper.release_all()
            try:
                self._consume(relay)
            except pika.exceptions.ChannelClosedByBroker:
                # its queue is gone (drained and deleted meanwhile): nothing is held for it; a
                # fault still on opens it again
                del self.relays[key]
                self._ch = self._conn.channel()
                self._ch.confirm_delivery()
                self._ch.basic_qos(prefetch_count=PREFETCH)

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.is_open and self._ch is not None and self._ch.is_open

    def close(self) -> None:
        if self._conn is not None and self._conn.is_open:
            try:
                self._conn.close()
            except (pika.exceptions.AMQPError, OSError):
                pass
        self._conn = self._ch = None

    def poll(self, seconds: float) -> None:
        """Let the connection deliver what arrived, for at most ``seconds``."""
        assert self._conn is not None
        try:
            self._conn.process_data_events(time_limit=seconds)
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise BrokerUnavailable(f"the relay lost the broker: {exc!r}") from exc

    # -- relays -------------------------------------------------------------------------------

    def open(self, fault: str, sender: str, receiver: str, shaper: Shaper, queue_type: str = "classic") -> None:
        if (sender, receiver) in self.relays:
            return
        assert self._ch is not None
        try:
            self._ch.queue_declare(names.relay_queue(self.lab, sender, receiver), durable=True,
                                   arguments=names.queue_arguments(queue_type))
            relay = LinkRelay(fault, sender, receiver, shaper)
            self.relays[(sender, receiver)] = relay
            self._consume(relay)
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise BrokerUnavailable(f"the relay lost the broker: {exc!r}") from exc

    def _consume(self, relay: LinkRelay) -> None:
        assert self._ch is not None

        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            self._arrived(relay, method.delivery_tag, body, props.user_id if self.keep_user_id else None)

        relay.consumer = self._ch.basic_consume(names.relay_queue(self.lab, relay.sender, relay.receiver),
                                                on_message)

    def _arrived(self, relay: LinkRelay, tag: int, body: bytes, user_id: str | None = None) -> None:
        relay.next_mid += 1
        mid = relay.next_mid
        relay.held[mid] = Held(tag, body, user_id)
        relay.counters.seen += 1
        relay.counters.envelopes_seen += envelopes_in(body)[0]
        self._release(relay, relay.shaper.arrive(mid, self.clock()))

    def tick(self) -> None:
        """Release what is due."""
        now = self.clock()
        try:
            for relay in list(self.relays.values()):
                self._release(relay, relay.shaper.due(now))
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise BrokerUnavailable(f"the relay lost the broker: {exc!r}") from exc

    def next_due(self) -> float | None:
        dues = [d for r in self.relays.values() if (d := r.shaper.next_due()) is not None]
        return min(dues) if dues else None

    def _release(self, relay: LinkRelay, releases: list[Release]) -> None:
        assert self._ch is not None
        for release in releases:
            held = relay.held.pop(release.mid, None)
            if held is None:
                continue
            count, first, last = envelopes_in(held.body) if release.copies != 1 else (0, None, None)
            for _ in range(release.copies):
                self._forward(relay, held.body, held.user_id)
            self._ch.basic_ack(held.tag)
            c = relay.counters
            if release.copies == 0:
                c.dropped += 1
                c.envelopes_dropped += count
                self._event(relay, "dropped", count, first, last)
            elif release.copies > 1:
                c.duplicated += release.copies - 1
                c.envelopes_duplicated += count * (release.copies - 1)
                self._event(relay, "duplicated", count, first, last)

    def _forward(self, relay: LinkRelay, body: bytes, user_id: str | None) -> None:
        assert self._ch is not None
        while True:
            try:
                self._ch.basic_publish(names.exchange(self.lab), names.site_key(relay.receiver), body,
                                       pika.BasicProperties(delivery_mode=2, user_id=user_id), mandatory=True)
                relay.counters.forwarded += 1
                return
            except pika.exceptions.UnroutableError:
                # the receiver's inbox is gone for a moment (deleted, not yet declared again)
                log.warning("relay %s: %s's inbox is unroutable; retrying", relay.name, relay.receiver)
                time.sleep(0.5)
            except pika.exceptions.NackError:
                time.sleep(0.5)
            except (pika.exceptions.AMQPError, OSError) as exc:
                # the channel or the connection is gone: what we hold goes back to the relay
                # queue, and is taken again after the reconnect
                raise BrokerUnavailable(f"the relay lost the broker: {exc!r}") from exc

    def _event(self, relay: LinkRelay, action: str, count: int, first: int | None, last: int | None) -> None:
        if self.on_event is not None:
            self.on_event((relay.fault, relay.name, action, count, first, last))

    def shut(self, sender: str, receiver: str) -> Counters | None:
        """The fault is healed: release everything held (in arrival order), forward what is
        left in the relay queue, delete it."""
        relay = self.relays.get((sender, receiver))
        if relay is None:
            return None
        assert self._ch is not None
        try:
            if relay.consumer:
                self._ch.basic_cancel(relay.consumer)
                relay.consumer = ""
            # cancelling returns nothing held to the queue: the unacked stay with us
            leftover = relay.shaper.release_all()
            for release in leftover:
                held = relay.held.pop(release.mid, None)
                if held is not None:
                    self._forward(relay, held.body, held.user_id)
                    self._ch.basic_ack(held.tag)
            for mid, held in list(relay.held.items()):  # delivered after the shaper stopped
                self._forward(relay, held.body, held.user_id)
                self._ch.basic_ack(held.tag)
                del relay.held[mid]
            assert self._conn is not None
            _drain_queue(self._conn, self.lab, sender, receiver, relay.counters, keep_user_id=self.keep_user_id)
        except (pika.exceptions.AMQPError, OSError) as exc:
            # kept: after the reconnect what we held is in the relay queue again, and the next
            # shut forwards it
            raise BrokerUnavailable(f"the relay lost the broker while draining {relay.name}: {exc!r}") from exc
        del self.relays[(sender, receiver)]
        return relay.counters


def _drain_queue(conn: BlockingConnection, lab: str, sender: str, receiver: str, counters: Counters | None, *,
                 keep_user_id: bool = False, settle: float = 10.0) -> int:
    """Forward what the relay queue sender->receiver holds to the receiver, in order, and
    delete the queue. Done on channels of its own: a refused delete (something arrived after
    the last get: a packet routed to the relay before its binding went) or a missing queue
    closes that channel, never the caller's (the fault daemon's hub, which carries the other
    relays). A refused delete drains again, for at most ``settle`` seconds; past that the
    queue is left for the next drain (the heal's own, or ``smslab down``'s delete)."""
    queue = names.relay_queue(lab, sender, receiver)
    moved = 0
    deadline = time.monotonic() + settle
    while True:
        ch = conn.channel()
        try:
            ch.confirm_delivery()
            while True:
                method, props, body = ch.basic_get(queue, auto_ack=False)
                if method is None:
                    break
                ch.basic_publish(names.exchange(lab), names.site_key(receiver), body,
                                 pika.BasicProperties(delivery_mode=2,
                                                      user_id=props.user_id if keep_user_id else None),
                                 mandatory=True)
                ch.basic_ack(method.delivery_tag)
                moved += 1
                if counters is not None:
                    counters.forwarded += 1
            ch.queue_delete(queue, if_empty=True)
            return moved
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404 or time.monotonic() > deadline:
                return moved  # no such queue (any more), or still refused at the deadline
            # 406: not empty, something arrived meanwhile: drain again
        finally:
            if ch.is_open:
                ch.close()
        conn.sleep(0.05)


def drain(url: str, lab: str, sender: str, receiver: str, *, keep_user_id: bool = False) -> int:
    """Forward everything a relay queue holds to the receiver, in order, and delete it (when
    no fault daemon is there to do it)."""
    with admin.blocking(url, name=f"smslab:{lab}:drain") as conn:
        return _drain_queue(conn, lab, sender, receiver, None, keep_user_id=keep_user_id)
