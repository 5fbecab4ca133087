"""An in-memory broker for one process: no threads, no sockets, no real clock.

Theory of operation
-------------------
A ``Loop`` owns a virtual clock and one queue of events. Nothing happens unless the caller
runs it (``run_for``, ``run_until``, ``run_until_true``, ``step``): each event runs to
completion, then the clock jumps to the next due one. Events due at the same instant run
in an order drawn from the loop's seeded generator (as is every latency jitter), so a seed
names one interleaving and a run can be replayed from it.

A ``MemoryBroker`` lives on a loop and keeps the RabbitMQ semantics the sites rely on:
direct exchanges and the default exchange (routing by queue name), FIFO queues, consumers
with a prefetch, delivery tags per connection, deliveries left unacknowledged when their
connection goes away put back in their place and marked ``redelivered``, publisher
confirms, ``mandatory`` returns of unroutable publishes, and channel errors for an ack of
an unknown delivery tag or a publish to a missing exchange (which close the connection,
as ``PikaTransport`` does when the broker closes its channel).

A ``Connection`` is one client's link to the broker: two ordered streams of frames,
client -> broker (publishes, acks) and broker -> client (deliveries, confirms, returns).
Each frame arrives ``latency`` (plus seeded jitter) after it was sent and never overtakes
the one before it, as on a TCP connection. A lost connection loses the frames still on
the wire both ways; the broker requeues what it delivered and did not get acked.

``MemoryTransport`` is the site's end: the methods ``SiteRuntime`` calls on
``PikaTransport``. ``run``/``connect`` return at once; the loop then drives ``on_ready``,
``on_delivery`` and ``on_confirm``. Its timers belong to its connection and die with it
(as pika's I/O loop and its timers do). After a lost connection it reconnects with
backoff and calls ``on_ready`` again, as ``python -m sites`` does around
``PikaTransport.run``.

Faults for tests, each happening exactly where the test says: ``drop``, ``duplicate``,
``reorder`` or ``nack`` the next matching message(s) routed to a queue;
``MemoryBroker.disconnect`` (or ``MemoryTransport.disconnect``) a client; ``crash`` a
transport (its process died: no reconnect); ``hold_acks`` so that acks of committed work
have not reached the broker when the connection goes.

Nothing here imports pika (``broker.transport`` does): this module stands in for it.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import hashlib
import heapq
import itertools
import json
import random
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from broker import names
from broker.base import Delivery, TransportHandler
from emulator.errors import BrokerUnavailable

# A virtual epoch like the wall clock's, so nothing treats the start as "long ago".
START = 1_700_000_000.0


# -- the loop ------------------------------------------------------------------------------


class Timer:
    """A scheduled call; ``cancel()`` makes it never run."""

    __slots__ = ("cancelled", "fn", "on_done", "when")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False
        self.on_done: Callable[[Timer], None] | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def _fire(self) -> None:
        if self.on_done is not None:
            self.on_done(self)
        self.fn()


def _dead_timer() -> Timer:
    timer = Timer(float("inf"), lambda: None)
    timer.cancelled = True
    return timer


class Loop:
    """The virtual clock and its events; ``time`` is the clock to give a ``SiteRuntime``."""

    def __init__(self, seed: int = 0, *, start: float = START, shuffle_ties: bool = True) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.shuffle_ties = shuffle_ties
        self.events_run = 0
        self._now = start
        self._heap: list[tuple[float, float, int, Timer]] = []
        self._order = itertools.count()

    @property
    def now(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(max(when, self._now), fn)
        tie = self.rng.random() if self.shuffle_ties else 0.0
        heapq.heappush(self._heap, (timer.when, tie, next(self._order), timer))
        return timer

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        return self.call_at(self._now + max(0.0, delay), fn)

    def next_time(self) -> float | None:
        """When the next live event is due (None if there is none)."""
        while self._heap and self._heap[0][3].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def step(self) -> bool:
        """Run the next live event; False if there is none."""
        while self._heap:
            when, _, _, timer = heapq.heappop(self._heap)
            if timer.cancelled:
                continue
            self._now = when
            self.events_run += 1
            timer._fire()
            return True
        return False

    def run_until(self, when: float) -> None:
        """Run every event due at or before ``when``; the clock ends at ``when``."""
        with _few_collections():
            while True:
                due = self.next_time()
                if due is None or due > when:
                    break
                self.step()
        self._now = max(self._now, when)

    def run_for(self, seconds: float) -> None:
        self.run_until(self._now + seconds)

    def run_until_true(self, predicate: Callable[[], object], *, timeout: float,
                       poll: float = 0.1) -> bool:
        """Run until ``predicate()`` is true, looking every ``poll`` virtual seconds;
        False if it is still false after ``timeout`` virtual seconds."""
        deadline = self._now + timeout
        with _few_collections():
            while True:
                if predicate():
                    return True
                if self._now >= deadline:
                    return False
                self.run_until(min(deadline, self._now + poll))


# Collections of cyclic garbage while a loop runs: few, and never of what existed when it began.
# A simulation keeps every site's runtime, store and broker state alive in one process, and
# each collection of the oldest generation scans all of it (375,000 objects at 1,000 sites: 9%
# of the run, bench/sim_scale.py). What was alive when the run began is frozen (reference
# counting still frees it); the young generation is collected every 100,000 allocations.
# Nothing the simulation computes depends on when garbage is collected.
_EASED = (100_000, 50, 1_000)
_easing = 0


@contextmanager
def _few_collections() -> Iterator[None]:
    global _easing
    if _easing:
        yield
        return
    before = gc.get_threshold()
    _easing += 1
    gc.freeze()
    gc.set_threshold(*_EASED)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
        _easing -= 1


# -- messages, queues, consumers -----------------------------------------------------------


@dataclass
class Message:
    body: bytes
    exchange: str
    routing_key: str
    reply_to: str | None = None
    correlation_id: str | None = None
    message_id: str | None = None
    user_id: str | None = None  # the publisher's broker user (validated, as RabbitMQ does)
    redelivered: bool = False
    id: int = 0  # broker-wide serial, in routing order
    position: int = 0  # place in its queue; a requeued message goes back to it

    def copy(self, **changes: Any) -> Message:
        return dataclasses.replace(self, **changes)


FaultKind = Literal["drop", "duplicate", "reorder", "nack"]


@dataclass(eq=False)
class Fault:
    """The next ``remaining`` messages routed to ``queue`` that match ``where`` are dropped
    (confirmed to the publisher, then lost), duplicated, held back until the next message
    of the queue has gone in (or ``hold`` seconds), or refused (the publisher gets a nack)."""

    kind: FaultKind
    queue: str
    remaining: int
    where: Callable[[Message], bool] | None = None
    hold: float = 5.0
    hits: list[Message] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.remaining <= 0

    def cancel(self) -> None:
        self.remaining = 0

    def matches(self, queue: str, msg: Message) -> bool:
        return self.remaining > 0 and queue == self.queue and (self.where is None or bool(self.where(msg)))


@dataclass(eq=False)
class Consumer:
    connection: Connection
    queue: Queue
    label: str
    prefetch: int
    unacked: int = 0

    @property
    def has_room(self) -> bool:
        return self.connection.open and self.unacked < self.prefetch


class Queue:
    def __init__(self, broker: MemoryBroker, name: str, arguments: dict[str, Any] | None = None) -> None:
        self.broker = broker
        self.name = name
        self.arguments = dict(arguments or {})
        self.ready: list[Message] = []  # in position order
        self.consumers: list[Consumer] = []
        self._positions = itertools.count(1)
        self._next_consumer = 0
        self._held: list[tuple[Message, Timer]] = []
        # An in-broker consumer with no prefetch (a link fault's relay in the simulator): it
        # takes every message as it is routed here, in order.
        self.tap: Callable[[Message], None] | None = None

    def __len__(self) -> int:
        return len(self.ready)

    def messages(self) -> list[Message]:
        """The ready messages, head first (a peek: nothing is consumed)."""
        return list(self.ready)

    @property
    def unacked(self) -> int:
        return sum(c.unacked for c in self.consumers)

    def _put(self, msg: Message, *, requeue: bool = False) -> None:
        if self.tap is not None:
            self.tap(msg)
            return
        if not requeue:
            msg.position = next(self._positions)
        bisect.insort(self.ready, msg, key=lambda m: m.position)

    def _enqueue(self, msg: Message) -> str:
        """Take one routed message, through the faults; 'nacked' if the publisher is refused."""
        broker = self.broker
        fault = next((f for f in broker.faults if f.matches(self.name, msg)), None)
        if fault is not None:
            fault.remaining -= 1
            fault.hits.append(msg)
            broker.stats[fault.kind] += 1
            broker._trace("fault", fault.kind, self.name, msg.id)
            if fault.kind == "drop":
                return "routed"
            if fault.kind == "nack":
                return "nacked"
            if fault.kind == "reorder":
                timer = broker.loop.call_later(fault.hold, lambda: self._release_held())
                self._held.append((msg, timer))
                return "routed"
            self._put(msg)  # duplicate: the same message twice
            self._put(msg.copy(id=broker._next_id()))
        else:
            self._put(msg)
        self._release_held()  # a held message goes in behind the one that overtook it
        return "routed"

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for msg, timer in held:
            timer.cancel()
            self._put(msg)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.ready and self.consumers:
            consumer = self._pick_consumer()
            if consumer is None:
                return
            msg = self.ready.pop(0)
            consumer.connection._deliver(consumer, msg)

    def _pick_consumer(self) -> Consumer | None:
        n = len(self.consumers)
        for i in range(n):
            consumer = self.consumers[(self._next_consumer + i) % n]
            if consumer.has_room:
                self._next_consumer = (self._next_consumer + i + 1) % n
                return consumer
        return None


# -- connections ---------------------------------------------------------------------------


class Client(Protocol):
    """The client end of a connection (``MemoryTransport``)."""

    def _opened(self) -> None: ...

    def _delivered(self, delivery: Delivery) -> None: ...

    def _confirmed(self, seq: int, ok: bool) -> None: ...

    def _returned(self, seq: int) -> None: ...

    def _lost(self, reason: str) -> None: ...

    def _cancelled(self, label: str) -> None: ...

    def _restored(self, label: str) -> None: ...


class _ChannelError(Exception):
    pass


class Connection:
    """One client's connection: two ordered streams of frames, and what it was delivered."""

    def __init__(self, broker: MemoryBroker, name: str, client: Client) -> None:
        self.broker = broker
        self.name = name
        self.client = client
        self.open = True
        self.client_closing = False  # the client sent close: frames to it are not taken
        self.confirm = False
        self.consumers: list[Consumer] = []
        self.unacked: dict[int, tuple[Consumer, Message]] = {}
        self.timers: set[Timer] = set()  # the client's timers: they die with the connection
        self._next_tag = 1
        self._to_client: deque[tuple[Callable[[], None], bool]] = deque()
        self._to_broker: deque[tuple[Callable[[], None], bool]] = deque()
        self._last = {"client": 0.0, "broker": 0.0}
        # A memory alarm: once this connection publishes, the broker reads nothing more of it
        # (TCP backpressure) until the alarm clears; what it sent waits, in order.
        self.blocked = False
        self._blocked_frames: deque[Callable[[], None]] = deque()

    def __repr__(self) -> str:
        return f"<Connection {self.name} {'open' if self.open else 'closed'}>"

    # the wire

    def send_to_client(self, frame: Callable[[], None]) -> None:
        self._send("client", self._to_client, frame, False)

    def send_to_broker(self, frame: Callable[[], None], *, publish: bool = False) -> None:
        self._send("broker", self._to_broker, frame, publish)

    def _send(self, side: str, stream: deque[tuple[Callable[[], None], bool]], frame: Callable[[], None],
              publish: bool) -> None:
        if not self.open:
            return
        broker = self.broker
        loop = broker.loop
        jitter = loop.rng.uniform(0, broker.jitter) if broker.jitter else 0.0
        arrival = max(loop.now + broker.latency + jitter, self._last[side])
        self._last[side] = arrival
        stream.append((frame, publish))
        # One event per frame; each takes the head of the stream, so frames keep their order
        # whatever order events due at the same instant run in.
        loop.call_at(arrival, lambda: self._arrive(side, stream))

    def _arrive(self, side: str, stream: deque[tuple[Callable[[], None], bool]]) -> None:
        if not self.open or not stream:
            return
        frame, publish = stream.popleft()
        if side == "client":
            if not self.client_closing:
                frame()
            return
        if self.blocked or (publish and self.broker.alarmed):
            self.blocked = True
            self._blocked_frames.append(frame)
            return
        frame()

    def _unblock(self) -> None:
        self.blocked = False
        while self._blocked_frames and self.open:
            self._blocked_frames.popleft()()

    # broker side

    def _deliver(self, consumer: Consumer, msg: Message) -> None:
        tag = self._next_tag
        self._next_tag += 1
        self.unacked[tag] = (consumer, msg)
        consumer.unacked += 1
        broker = self.broker
        broker.stats["redelivered" if msg.redelivered else "delivered"] += 1
        broker._trace("deliver", self.name, consumer.queue.name, msg.id, tag, msg.redelivered)
        delivery = Delivery(queue=consumer.label, tag=tag, body=msg.body, redelivered=msg.redelivered,
                            reply_to=msg.reply_to, correlation_id=msg.correlation_id, user_id=msg.user_id)
        self.send_to_client(lambda: self.client._delivered(delivery))

    def _ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            tags = [t for t in self.unacked if tag == 0 or t <= tag]
        else:
            tags = [tag] if tag in self.unacked else []
        if not tags:
            raise _ChannelError(f"PRECONDITION_FAILED - unknown delivery tag {tag}")
        queues = []
        for t in tags:
            consumer, msg = self.unacked.pop(t)
            consumer.unacked -= 1
            queues.append(consumer.queue)
            self.broker._trace("ack", self.name, consumer.queue.name, msg.id, t)
        self.broker.stats["acked"] += len(tags)
        for queue in dict.fromkeys(queues):
            queue._dispatch()


def _cancel_notice(conn: Connection, label: str) -> Callable[[], None]:
    return lambda: conn.client._cancelled(label)


# -- the broker ----------------------------------------------------------------------------


@dataclass
class _Exchange:
    name: str
    kind: str
    bindings: dict[str, list[str]] = field(default_factory=dict)  # routing key -> queues


class MemoryBroker:
    """A RabbitMQ stand-in on a ``Loop`` (made with ``seed`` if none is given)."""

    def __init__(self, loop: Loop | None = None, *, seed: int = 0, latency: float = 0.002,
                 jitter: float = 0.002) -> None:
        self.loop = loop if loop is not None else Loop(seed)
        self.latency = latency
        self.jitter = jitter
        self.exchanges: dict[str, _Exchange] = {}
        self.queues: dict[str, Queue] = {}
        self.connections: list[Connection] = []
        self.faults: list[Fault] = []
        self.accepting = True  # False: connection attempts are refused (the broker is down)
        self.refused: set[str] = set()  # connection names refused (a site cut off: ``refuse``)
        self.alarmed = False  # a memory alarm: publishers are blocked (``set_alarm``)
        self.blocked_connection_timeout = 30.0  # pika's: a client blocked this long closes
        self.diverted: set[str] = set()  # link routing keys bound to a relay, not the inbox
        self.stats: Counter[str] = Counter()
        self.errors: list[str] = []  # channel errors: a client broke the protocol
        self._ids = itertools.count(1)
        self._digest = hashlib.blake2b(digest_size=16)

    # -- objects ------------------------------------------------------------------------

    def declare_exchange(self, name: str, kind: str = "direct") -> None:
        if kind != "direct":
            raise ValueError("only direct exchanges are simulated")
        self.exchanges.setdefault(name, _Exchange(name, kind))

    def declare_queue(self, name: str, arguments: dict[str, Any] | None = None) -> Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = Queue(self, name, arguments)
        return queue

    def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        if queue not in self.queues:
            raise KeyError(f"no queue {queue!r}")
        if exchange not in self.exchanges:
            raise KeyError(f"no exchange {exchange!r}")
        bound = self.exchanges[exchange].bindings.setdefault(routing_key, [])
        if queue not in bound:
            bound.append(queue)

    def delete_queue(self, name: str) -> None:
        """Delete a queue, its messages and its bindings; its consumers are cancelled (the
        broker tells their clients, as RabbitMQ's consumer cancel notification does)."""
        queue = self.queues.pop(name, None)
        if queue is None:
            return
        for ex in self.exchanges.values():
            for bound in ex.bindings.values():
                if name in bound:
                    bound.remove(name)
        self._trace("delete_queue", name)
        for consumer in list(queue.consumers):
            conn = consumer.connection
            if consumer in conn.consumers:
                conn.consumers.remove(consumer)
            conn.send_to_client(_cancel_notice(conn, consumer.label))
        queue.consumers.clear()

    def _reconsume(self, conn: Connection, lab: str, site: str, label: str, prefetch: int,
                   queue_type: str, neighbours: list[str]) -> None:
        """A client declares a cancelled consumer's queue and bindings again and consumes."""
        name = (names.site_queue if label == "site" else names.control_queue)(lab, site)
        keys = ([names.site_key(site)] + [names.link_key(n, site) for n in neighbours]
                if label == "site" else [names.control_key(site)])
        self.declare_queue(name, names.inbox_arguments(queue_type, lab))
        for key in keys:
            if key not in self.diverted:  # a link fault's binding stays with its relay
                self.bind(name, names.exchange(lab), key)
        consumer = Consumer(conn, self.queues[name], label, prefetch)
        conn.consumers.append(consumer)
        self.queues[name].consumers.append(consumer)
        self._trace("reconsume", conn.name, name)
        conn.send_to_client(lambda: conn.client._restored(label))
        self.queues[name]._dispatch()

    def declare_lab(self, lab: str, sites: list[str], queue_type: str = "classic",
                    links: list[tuple[str, str]] | None = None) -> None:
        """What ``broker.admin.declare_lab`` declares on RabbitMQ."""
        self.declare_exchange(names.exchange(lab))
        args = names.inbox_arguments(queue_type, lab)
        for site in sites:
            for queue, key in ((names.site_queue(lab, site), names.site_key(site)),
                               (names.control_queue(lab, site), names.control_key(site))):
                self.declare_queue(queue, args)
                self.bind(queue, names.exchange(lab), key)
        for key, receiver in names.link_keys(links or []):
            self.bind(names.site_queue(lab, receiver), names.exchange(lab), key)
        self.declare_queue(names.dead_queue(lab), names.queue_arguments(queue_type))
        self.bind(names.dead_queue(lab), names.exchange(lab), names.DEAD_KEY)

    def unbind(self, queue: str, exchange: str, routing_key: str) -> None:
        bound = self.exchanges[exchange].bindings.get(routing_key, [])
        if queue in bound:
            bound.remove(queue)

    def queue(self, name: str) -> Queue:
        return self.queues[name]

    def depth(self, name: str) -> int:
        return len(self.queues[name])

    # -- outside clients (the CLI's short-lived connections) -----------------------------

    def publish(self, exchange: str, routing_key: str, body: bytes, *, reply_to: str | None = None,
                correlation_id: str | None = None, mandatory: bool = False, user_id: str | None = None) -> bool:
        """Publish at once, as a client whose frame has arrived; True if routed. ``user_id`` is
        the broker user the client logged in as (RabbitMQ refuses any other but an
        impersonator's): a forger with a site's credentials passes that site's."""
        msg = Message(body=body, exchange=exchange, routing_key=routing_key, reply_to=reply_to,
                      correlation_id=correlation_id, user_id=user_id)
        try:
            status = self._route(exchange, routing_key, msg)
        except _ChannelError as exc:
            raise KeyError(str(exc)) from None
        if status == "unroutable" and mandatory:
            self.stats["returned"] += 1
        return status == "routed"

    def get(self, queue: str) -> Message | None:
        """``basic_get`` with auto-ack: the head of the queue, or None."""
        q = self.queues[queue]
        return q.ready.pop(0) if q.ready else None

    def dead_letters(self, lab: str) -> list[dict[str, Any]]:
        """The lab's dead letters with their reasons (a peek: they stay in the queue)."""
        out = []
        for msg in self.queues[names.dead_queue(lab)].ready:
            try:
                out.append(json.loads(msg.body))
            except ValueError:
                out.append({"body": msg.body.decode(errors="replace")})
        return out

    # -- faults ---------------------------------------------------------------------------

    def drop(self, queue: str, *, count: int = 1, where: Callable[[Message], bool] | None = None) -> Fault:
        return self._fault("drop", queue, count, where)

    def duplicate(self, queue: str, *, count: int = 1,
                  where: Callable[[Message], bool] | None = None) -> Fault:
        return self._fault("duplicate", queue, count, where)

    def reorder(self, queue: str, *, count: int = 1, where: Callable[[Message], bool] | None = None,
                hold: float = 5.0) -> Fault:
        return self._fault("reorder", queue, count, where, hold)

    def nack(self, queue: str, *, count: int = 1, where: Callable[[Message], bool] | None = None) -> Fault:
        return self._fault("nack", queue, count, where)

    def _fault(self, kind: FaultKind, queue: str, count: int,
               where: Callable[[Message], bool] | None, hold: float = 5.0) -> Fault:
        if queue not in self.queues:
            raise KeyError(f"no queue {queue!r}")
        fault = Fault(kind, queue, count, where, hold)
        self.faults.append(fault)
        return fault

    def disconnect(self, name: str, reason: str = "connection closed (fault)") -> int:
        """Close every connection called ``name`` (``names.connection_name``) as lost."""
        closing = [c for c in self.connections if c.name == name]
        for conn in closing:
            self._close(conn, reason, lost=True)
        return len(closing)

    # -- connections ----------------------------------------------------------------------

    def refuse(self, name: str) -> int:
        """Close every connection called ``name`` and refuse it new ones until ``admit``:
        the site is cut off from the broker without knowing why."""
        self.refused.add(name)
        return self.disconnect(name, "connection closed (fault: disconnected)")

    def admit(self, name: str) -> None:
        self.refused.discard(name)

    def set_alarm(self, on: bool) -> None:
        """A memory alarm (RabbitMQ's memory watermark at 0): every connection that publishes
        is blocked until it clears; pika closes a connection blocked for
        ``blocked_connection_timeout`` seconds."""
        if on == self.alarmed:
            return
        self.alarmed = on
        self._trace("alarm", on)
        if on:
            for conn in list(self.connections):
                self._arm_blocked_timeout(conn)
        else:
            for conn in list(self.connections):
                if conn.blocked:
                    conn._unblock()

    def _arm_blocked_timeout(self, conn: Connection) -> None:
        def expire() -> None:
            if self.alarmed and conn.open:
                self._close(conn, "connection blocked too long (memory alarm)", lost=True)

        self.loop.call_later(self.blocked_connection_timeout, expire)

    def restart(self, downtime: float = 2.0) -> int:
        """stop_app, start_app: every connection is lost and none is taken for ``downtime``
        seconds; durable queues keep their messages (what was delivered and not acked goes
        back, redelivered). Returns how many connections were closed."""
        self.accepting = False
        self._trace("restart", downtime)
        closing = list(self.connections)
        for conn in closing:
            self._close(conn, "broker restarted (connection-forced)", lost=True)

        def back() -> None:
            self.accepting = True
            self._trace("restarted")

        self.loop.call_later(downtime, back)
        return len(closing)

    def divert_link(self, lab: str, sender: str, receiver: str) -> Queue:
        """``broker.admin.divert_link``: the link's key goes to its relay queue."""
        key = names.link_key(sender, receiver)
        relay = self.declare_queue(names.relay_queue(lab, sender, receiver))
        self.unbind(names.site_queue(lab, receiver), names.exchange(lab), key)
        self.bind(relay.name, names.exchange(lab), key)
        self.diverted.add(key)
        self._trace("divert", key)
        return relay

    def restore_link(self, lab: str, sender: str, receiver: str) -> None:
        key = names.link_key(sender, receiver)
        self.unbind(names.relay_queue(lab, sender, receiver), names.exchange(lab), key)
        self.diverted.discard(key)
        if names.site_queue(lab, receiver) in self.queues:
            self.bind(names.site_queue(lab, receiver), names.exchange(lab), key)
        self._trace("restore", key)

    def _open(self, name: str, client: Client) -> Connection:
        if not self.accepting:
            raise BrokerUnavailable("the broker refused the connection (it is down)")
        if name in self.refused:
            raise BrokerUnavailable("the connection was closed by the broker (refused)")
        conn = Connection(self, name, client)
        self.connections.append(conn)
        self.stats["connections"] += 1
        self._trace("open", name)
        if self.alarmed:
            self._arm_blocked_timeout(conn)
        return conn

    def _close(self, conn: Connection, reason: str, *, lost: bool) -> None:
        """Close a connection: its frames on the wire are lost, its timers die, what it was
        delivered and did not ack goes back to its queues, redelivered."""
        if not conn.open:
            return
        conn.open = False
        conn._to_client.clear()
        conn._to_broker.clear()
        conn._blocked_frames.clear()
        for timer in conn.timers:
            timer.cancel()
        conn.timers.clear()
        self._trace("close", conn.name, lost, reason)
        queues: dict[str, Queue] = {}
        for tag in sorted(conn.unacked):
            consumer, msg = conn.unacked.pop(tag)
            consumer.unacked -= 1
            consumer.queue._put(msg.copy(redelivered=True), requeue=True)
            queues[consumer.queue.name] = consumer.queue
            self.stats["requeued"] += 1
        for consumer in conn.consumers:
            if consumer in consumer.queue.consumers:
                consumer.queue.consumers.remove(consumer)
            queues[consumer.queue.name] = consumer.queue
        if conn in self.connections:
            self.connections.remove(conn)
        if lost:
            self.stats["lost"] += 1
            conn.client._lost(reason)
        for queue in queues.values():
            queue._dispatch()

    def _channel_error(self, conn: Connection, error: str) -> None:
        self.errors.append(f"{conn.name}: {error}")
        self._close(conn, f"broker closed the channel: {error}", lost=True)

    def _frame(self, conn: Connection, fn: Callable[[], None]) -> None:
        """Run a client frame at the broker; a protocol error closes the connection."""
        try:
            fn()
        except _ChannelError as exc:
            self._channel_error(conn, str(exc))

    def _setup_site(self, conn: Connection, lab: str, site: str, prefetch: int, queue_type: str) -> None:
        """What ``PikaTransport`` declares and consumes once its channel is open."""
        args = names.inbox_arguments(queue_type, lab)
        exchange = names.exchange(lab)
        self.declare_exchange(exchange)
        for queue, key in ((names.site_queue(lab, site), names.site_key(site)),
                           (names.control_queue(lab, site), names.control_key(site))):
            self.declare_queue(queue, args)
            self.bind(queue, exchange, key)
        self.declare_queue(names.dead_queue(lab), names.queue_arguments(queue_type))
        self.bind(names.dead_queue(lab), exchange, names.DEAD_KEY)
        conn.confirm = True
        conn.send_to_client(conn.client._opened)  # before any delivery: the stream keeps order
        for label, queue in (("site", names.site_queue(lab, site)), ("control", names.control_queue(lab, site))):
            consumer = Consumer(conn, self.queues[queue], label, prefetch)
            conn.consumers.append(consumer)
            self.queues[queue].consumers.append(consumer)
        for consumer in conn.consumers:
            consumer.queue._dispatch()

    def _publish_frame(self, conn: Connection, seq: int, msg: Message, mandatory: bool) -> None:
        status = self._route(msg.exchange, msg.routing_key, msg)
        if status == "unroutable" and mandatory:
            self.stats["returned"] += 1
            conn.send_to_client(lambda: conn.client._returned(seq))
        if conn.confirm:
            ok = status != "nacked"
            conn.send_to_client(lambda: conn.client._confirmed(seq, ok))

    def _route(self, exchange: str, routing_key: str, msg: Message) -> str:
        if exchange == "":
            targets = [routing_key] if routing_key in self.queues else []
        else:
            ex = self.exchanges.get(exchange)
            if ex is None:
                raise _ChannelError(f"NOT_FOUND - no exchange {exchange!r}")
            targets = list(ex.bindings.get(routing_key, []))
        self.stats["published"] += 1
        if not targets:
            self.stats["unroutable"] += 1
            self._trace("unroutable", exchange, routing_key)
            return "unroutable"
        status = "routed"
        for name in targets:
            copy = msg.copy(id=self._next_id())
            self._trace("route", name, copy.id, hashlib.blake2b(copy.body, digest_size=8).hexdigest())
            if self.queues[name]._enqueue(copy) == "nacked":
                status = "nacked"
        return status

    def _next_id(self) -> int:
        return next(self._ids)

    # -- determinism ----------------------------------------------------------------------

    def _trace(self, *event: object) -> None:
        self._digest.update(repr((round(self.loop.now, 9), *event)).encode())

    def trace_digest(self) -> str:
        """A digest of everything the broker did and when: equal for equal runs."""
        return self._digest.hexdigest()

    def transport(self, lab: str, site: str, **kwargs: Any) -> MemoryTransport:
        return MemoryTransport(self, lab=lab, site=site, **kwargs)


# -- the site's transport ------------------------------------------------------------------


Handler = TransportHandler


class MemoryTransport:
    """The ``Transport`` ``SiteRuntime`` uses, on a ``MemoryBroker``."""

    def __init__(self, broker: MemoryBroker, *, lab: str, site: str, prefetch: int = 500,
                 queue_type: str = "classic", reconnect_delay: float = 0.2,
                 max_reconnect_delay: float = 5.0, neighbours: list[str] | None = None,
                 heartbeat: float = 10.0, user: str | None = None) -> None:
        self.broker = broker
        self.user = user  # the broker user it logs in as: the user_id of everything it publishes
        self.lab = lab
        self.site = site
        self.neighbours = list(neighbours or [])
        self.prefetch = prefetch
        self.queue_type = queue_type
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.name = names.connection_name(lab, site)
        self.connects = 0  # connections that became ready (on_ready calls)
        self.losses: list[str] = []  # why each connection was lost
        self.crashed = False
        self._handler: Handler | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._stopping = False
        self._failures = 0
        self._pending: dict[int, Any] = {}
        self._returned_seqs: set[int] = set()
        self._publish_seq = 0
        self._holding_acks = False
        self._held_acks: list[tuple[int, bool]] = []
        self.heartbeat = heartbeat  # a frozen client's connection is closed by the broker after this
        self._frozen = False
        self._deferred: list[Callable[[], None]] = []

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def connection(self) -> Connection | None:
        return self._conn

    # -- lifetime ---------------------------------------------------------------------------

    def run(self, handler: Handler) -> None:
        """Unlike ``PikaTransport.run`` this does not block: the loop drives the handler."""
        self.connect(handler)

    def connect(self, handler: Handler) -> None:
        self._handler = handler
        self._stopping = False
        self._attempt()

    def _attempt(self) -> None:
        if self._defer(self._attempt):
            return
        if self._stopping or self.crashed:
            return
        try:
            conn = self.broker._open(self.name, self)
        except BrokerUnavailable as exc:
            self._retry(str(exc))
            return
        self._conn = conn
        self._ready = False
        self._pending.clear()
        self._returned_seqs.clear()
        self._publish_seq = 0
        self._held_acks.clear()
        conn.send_to_broker(lambda: self.broker._setup_site(conn, self.lab, self.site, self.prefetch,
                                                            self.queue_type))

    def _retry(self, reason: str) -> None:
        """The reconnect loop of ``python -m sites`` (exponential backoff with jitter)."""
        self.losses.append(reason)
        delay = min(self.max_reconnect_delay, self.reconnect_delay * 2 ** self._failures)
        delay += self.broker.loop.rng.uniform(0, delay / 2)
        self._failures += 1
        self.broker.loop.call_later(delay, self._attempt)

    def stop(self) -> None:
        """Close gracefully: frames already sent (acks, publishes) reach the broker first."""
        self._stopping = True
        self._ready = False
        conn = self._conn
        if conn is None or not conn.open:
            return
        conn.client_closing = True
        for timer in conn.timers:  # nothing of this site runs once it has decided to stop
            timer.cancel()
        conn.timers.clear()
        self._send_held_acks()
        conn.send_to_broker(lambda: self.broker._close(conn, "closed by the client", lost=False))

    # -- faults -----------------------------------------------------------------------------

    def disconnect(self, reason: str = "connection lost (fault)") -> None:
        """The connection drops under the site; it reconnects after a backoff."""
        if self._conn is not None and self._conn.open:
            self.broker._close(self._conn, reason, lost=True)

    def crash(self) -> None:
        """The site's process died (kill -9): the connection drops, nothing runs again."""
        self.crashed = True
        self._ready = False
        if self._conn is not None and self._conn.open:
            self.broker._close(self._conn, "client process died", lost=True)

    def freeze(self) -> None:
        """SIGSTOP: nothing of this site runs (no frames taken, no timers) until ``thaw``;
        the broker closes its connection when heartbeats have been missed ``heartbeat``
        seconds (the site learns it when it runs again)."""
        if self._frozen or self.crashed:
            return
        self._frozen = True
        conn = self._conn

        def missed_heartbeats() -> None:
            if self._frozen and conn is not None and conn.open and conn is self._conn:
                self.broker._close(conn, "missed heartbeats from client, timeout: 10s", lost=True)

        self.broker.loop.call_later(self.heartbeat, missed_heartbeats)

    def thaw(self) -> None:
        """SIGCONT: what arrived meanwhile runs, in order."""
        if not self._frozen:
            return
        self._frozen = False
        deferred, self._deferred = self._deferred, []
        for fn in deferred:
            if self._frozen:  # frozen again by what ran
                self._deferred.append(fn)
            else:
                fn()

    @property
    def frozen(self) -> bool:
        return self._frozen

    def _defer(self, fn: Callable[[], None]) -> bool:
        if self._frozen and not self.crashed:
            self._deferred.append(fn)
            return True
        return False

    def hold_acks(self) -> None:
        """Keep acks on this side (a slow wire): lost if the connection goes first."""
        self._holding_acks = True

    def release_acks(self) -> None:
        self._holding_acks = False
        self._send_held_acks()

    def _send_held_acks(self) -> None:
        held, self._held_acks = self._held_acks, []
        for tag, multiple in held:
            self._send_ack(tag, multiple)

    # -- frames from the broker -------------------------------------------------------------

    def _opened(self) -> None:
        if self._defer(self._opened):
            return
        self._ready = True
        self._failures = 0
        self.connects += 1
        assert self._handler is not None
        self._handler.on_ready()

    def _delivered(self, delivery: Delivery) -> None:
        if self._defer(lambda: self._delivered(delivery)):
            return
        assert self._handler is not None
        self._handler.on_delivery(delivery)

    def _confirmed(self, seq: int, ok: bool) -> None:
        if self._defer(lambda: self._confirmed(seq, ok)):
            return
        token = self._pending.pop(seq, None)
        returned = seq in self._returned_seqs
        self._returned_seqs.discard(seq)
        if token is not None:
            assert self._handler is not None
            self._handler.on_confirm(token, ok and not returned)

    def _returned(self, seq: int) -> None:
        if self._defer(lambda: self._returned(seq)):
            return
        self._returned_seqs.add(seq)

    def _cancelled(self, label: str) -> None:
        """The broker cancelled a consumer (its queue was deleted): declare it again, as
        ``PikaTransport`` does."""
        if self._defer(lambda: self._cancelled(label)):
            return
        conn = self._conn
        if conn is None or not conn.open:
            return
        conn.send_to_broker(lambda: self.broker._reconsume(conn, self.lab, self.site, label, self.prefetch,
                                                           self.queue_type, self.neighbours))

    def _restored(self, label: str) -> None:
        if self._defer(lambda: self._restored(label)):
            return
        assert self._handler is not None
        self._handler.on_queue_restored(label)

    def _lost(self, reason: str) -> None:
        if self._defer(lambda: self._lost(reason)):
            return
        self._ready = False
        self._pending.clear()
        self._held_acks.clear()
        if not self._stopping and not self.crashed:
            self._retry(reason)
        else:
            self.losses.append(reason)

    # -- what the runtime calls -------------------------------------------------------------

    def publish(self, routing_key: str, body: bytes, token: Any = None, *,
                correlation_id: str | None = None) -> None:
        """Publish with ``mandatory``; ``on_confirm(token, ok)`` follows for a token."""
        conn = self._conn
        if conn is None or not conn.open or not self._ready:
            raise BrokerUnavailable("not connected to the broker")
        self._publish_seq += 1
        seq = self._publish_seq
        self._pending[seq] = token
        msg = Message(body=body, exchange=names.exchange(self.lab), routing_key=routing_key,
                      correlation_id=correlation_id, message_id=str(seq), user_id=self.user)
        conn.send_to_broker(lambda: self.broker._frame(
            conn, lambda: self.broker._publish_frame(conn, seq, msg, mandatory=True)), publish=True)

    def reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        """Answer a control request through the default exchange."""
        conn = self._conn
        if conn is None or not conn.open or not self._ready:
            return
        self._publish_seq += 1
        seq = self._publish_seq
        self._pending[seq] = None
        msg = Message(body=body, exchange="", routing_key=reply_to, correlation_id=correlation_id,
                      message_id=str(seq), user_id=self.user)
        conn.send_to_broker(lambda: self.broker._frame(
            conn, lambda: self.broker._publish_frame(conn, seq, msg, mandatory=False)), publish=True)

    def ack(self, tag: int, multiple: bool = False) -> None:
        if self._conn is None or not self._conn.open:
            return
        if self._holding_acks:
            self._held_acks.append((tag, multiple))
            return
        self._send_ack(tag, multiple)

    def _send_ack(self, tag: int, multiple: bool) -> None:
        conn = self._conn
        if conn is None or not conn.open:
            return
        conn.send_to_broker(lambda: self.broker._frame(conn, lambda: conn._ack(tag, multiple)))

    def call_later(self, delay: float, fn: Callable[[], None]) -> object:
        """On this connection's loop: the timer dies with the connection (as with pika)."""
        conn = self._conn
        if conn is None or not conn.open or conn.client_closing or self.crashed:
            return _dead_timer()
        def fire() -> None:
            if not self._defer(late):
                fn()

        def late() -> None:  # a timer due while the site was frozen: only if its connection lived
            if conn.open:
                fn()

        timer = self.broker.loop.call_later(delay, fire)
        conn.timers.add(timer)
        timer.on_done = conn.timers.discard
        return timer
