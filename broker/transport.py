"""The site's broker transport: pika's SelectConnection with pipelined publisher confirms.

A site runs single-threaded inside ``PikaTransport.run``: the I/O loop delivers messages,
confirms and timers to a ``TransportHandler``. ``run`` returns when ``stop()`` is called and
raises ``BrokerUnavailable`` when the connection is lost; the caller reconnects (tenacity).

This module and ``broker.admin`` are the only places that import pika; pika's exceptions
become ours here.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from broker import names, urls
from broker.base import Delivery, TransportHandler
from emulator.errors import BrokerUnavailable

log = logging.getLogger(__name__)
REFUSED_FOR = 3.0  # seconds of refused publishes to one queue before the channel is given up


class PikaTransport:
    def __init__(
        self,
        url: str,
        *,
        lab: str,
        site: str,
        prefetch: int = 500,
        queue_type: str = "classic",
        heartbeat: int = 10,
        neighbours: list[str] | None = None,
        delivery_limit: int = names.DELIVERY_LIMIT,
        dead_letter_max: int = names.DEAD_LETTER_MAX,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        self.dead_letter_max = dead_letter_max
        self.lab = lab
        # Per-site identity: the site logs in as its own broker user and stamps it as the
        # ``user_id`` of everything it publishes (RabbitMQ refuses any other). Its permissions
        # cover its own queues and the lab's exchange only, so the lab's objects are declared by
        # ``up`` and only checked here (its own queues are declared again if deleted).
        self.user = user
        self.site = site
        self.neighbours = list(neighbours or [])  # whose link keys bind to our inbox
        self.prefetch = prefetch
        self.queue_type = queue_type
        self.delivery_limit = delivery_limit  # quorum inboxes: declared with the lab's limit
        # One URL, or the nodes of a cluster: each run() connects to one of them; a failed
        # attempt or a lost connection moves to the next (the caller's backoff grows with
        # ``failures``, the attempts in a row that did not get a working connection).
        self.urls = urls.split(url)
        if not self.urls:
            raise BrokerUnavailable(f"no broker URL given for site {site}")
        self.params_list: list[pika.URLParameters] = []
        for one in self.urls:
            params = pika.URLParameters(one)
            params.heartbeat = heartbeat
            params.blocked_connection_timeout = 30
            params.connection_attempts = 1
            params.socket_timeout = 5
            params.client_properties = {"connection_name": names.connection_name(lab, site)}
            if user is not None:
                params.credentials = pika.PlainCredentials(user, password or "")
            self.params_list.append(params)
        self._index = urls.first_choice(site, len(self.urls))
        self.failures = 0
        self.connected_to: str | None = None  # host:port of the node while the site is connected
        self._conn: SelectConnection | None = None
        self._channel: Channel | None = None
        self._handler: TransportHandler | None = None
        self._pending: OrderedDict[int, Any] = OrderedDict()
        self._returned: set[int] = set()
        self._keys: dict[int, str] = {}  # publish seq -> routing key, while unconfirmed
        self._refused_since: dict[str, float] = {}  # routing key -> when the broker began to nack it
        self._consumers: dict[str, str] = {}  # consumer tag -> "site" | "control"
        self._publish_seq = 0
        self._stopping = False
        self._error: str | None = None
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def params(self) -> pika.URLParameters:
        """The node the next (or the current) connection goes to."""
        return self.params_list[self._index]

    @property
    def node(self) -> str:
        return urls.where(self.urls[self._index])

    # -- lifetime -------------------------------------------------------------------------

    def run(self, handler: TransportHandler) -> None:
        self._handler = handler
        self._error = None
        self._ready = False
        self._pending.clear()
        self._returned.clear()
        self._keys.clear()
        self._refused_since.clear()
        self._publish_seq = 0
        try:
            self._conn = SelectConnection(
                self.params,
                on_open_callback=self._on_connection_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_connection_closed,
            )
            self._conn.ioloop.start()
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._error = f"broker connection failed: {exc!r}"
            raise BrokerUnavailable(self._error) from exc
        finally:
            was_ready = self.connected_to is not None
            self._ready = False
            self.connected_to = None
            self._channel = None
            if self._conn is not None:
                self._conn.ioloop.close()  # its timers and file descriptors go with it
            if not self._stopping:
                self._fail_over(was_ready)
        if self._error and not self._stopping:
            raise BrokerUnavailable(self._error)

    def _fail_over(self, was_ready: bool) -> None:
        """After a failed attempt or a lost connection: the next node, and one failure more
        (counted from zero again if the connection had worked)."""
        self.failures = 1 if was_ready else self.failures + 1
        if len(self.urls) > 1:
            before = self.node
            self._index = (self._index + 1) % len(self.urls)
            log.warning("%s: broker node %s lost or unreachable; trying %s next", self.site, before, self.node)

    def stop(self) -> None:
        self._stopping = True
        self._ready = False
        conn = self._conn
        if conn is None:
            return
        if conn.is_open:
            conn.close()
        elif conn.is_closed:
            conn.ioloop.stop()

    def _on_open_error(self, _conn: Any, exc: BaseException) -> None:
        self._error = f"cannot connect to the broker at {self.params.host}:{self.params.port}: {exc}"
        assert self._conn is not None
        self._conn.ioloop.stop()

    def _on_connection_closed(self, _conn: Any, reason: BaseException) -> None:
        self._ready = False
        if not self._stopping:
            self._error = f"broker connection lost: {reason}"
        assert self._conn is not None
        self._conn.ioloop.stop()

    def _on_connection_open(self, conn: Any) -> None:
        if self._stopping:  # asked to stop while the connection was being set up
            conn.close()
            return
        conn.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.add_on_cancel_callback(self._on_cancelled)
        channel.exchange_declare(
            names.exchange(self.lab), "direct", durable=True, passive=self.user is not None,
            callback=lambda _f: self._declare_queues(),
        )

    def _on_channel_closed(self, _channel: Channel, reason: BaseException) -> None:
        # A channel closed by the broker is a bug (406, 404...) or a forced close; either way
        # the connection is useless to us now: close it and let the caller reconnect.
        self._ready = False
        if not self._stopping:
            self._error = f"broker closed the channel: {reason}"
        if self._conn is not None and self._conn.is_open:
            self._conn.close()

    def _declare_queues(self) -> None:
        assert self._channel is not None
        ch = self._channel
        lab, site = self.lab, self.site
        args = dict(names.inbox_arguments(self.queue_type, lab, self.delivery_limit))
        lab_objects: list[Callable[[Callable[[Any], None]], None]] = [] if self.user is not None else [
            lambda cb: ch.queue_declare(names.dead_queue(lab), durable=True,
                                        arguments=names.dead_queue_arguments(self.queue_type, self.dead_letter_max),
                                        callback=cb),
            lambda cb: ch.queue_bind(names.dead_queue(lab), names.exchange(lab),
                                     routing_key=names.DEAD_KEY, callback=cb),
        ]
        steps: list[Callable[[Callable[[Any], None]], None]] = [
            *lab_objects,
            lambda cb: ch.queue_declare(names.site_queue(lab, site), durable=True,
                                        arguments=args, callback=cb),
            lambda cb: ch.queue_bind(names.site_queue(lab, site), names.exchange(lab),
                                     routing_key=names.site_key(site), callback=cb),
            lambda cb: ch.queue_declare(names.control_queue(lab, site), durable=True,
                                        arguments=args, callback=cb),
            lambda cb: ch.queue_bind(names.control_queue(lab, site), names.exchange(lab),
                                     routing_key=names.control_key(site), callback=cb),
            lambda cb: ch.confirm_delivery(self._on_confirm, callback=cb),
            lambda cb: ch.basic_qos(prefetch_count=self.prefetch, callback=cb),
        ]

        def run_step(index: int) -> None:
            if index == len(steps):
                self._start_consuming()
                return
            steps[index](lambda _frame: run_step(index + 1))

        run_step(0)

    def _start_consuming(self) -> None:
        assert self._channel is not None and self._handler is not None
        self._consumers.clear()
        for label in ("site", "control"):
            self._consume(label)
        self._ready = True
        self.failures = 0
        self.connected_to = self.node
        self._guard(self._handler.on_ready)

    def _queue_of(self, label: str) -> str:
        return (names.site_queue if label == "site" else names.control_queue)(self.lab, self.site)

    def _consume(self, label: str) -> None:
        assert self._channel is not None
        tag = self._channel.basic_consume(self._queue_of(label), self._make_consumer(label))
        self._consumers[tag] = label

    def _on_cancelled(self, frame: Any) -> None:
        """The broker cancelled a consumer: its queue was deleted under the site. Declare the
        queue and its binding again and consume again; peers' publishes meanwhile came back
        to them unroutable (mandatory) and are sent again."""
        label = self._consumers.pop(frame.method.consumer_tag, None)
        ch = self._channel
        if label is None or ch is None or not ch.is_open:
            return
        queue = self._queue_of(label)
        keys = ([names.site_key(self.site)] + [names.link_key(n, self.site) for n in self.neighbours]
                if label == "site" else [names.control_key(self.site)])
        log.warning("%s: the broker cancelled the consumer of %s (queue deleted?); declaring it again",
                    self.site, queue)

        def bind(index: int) -> None:
            if index == len(keys):
                self._consume(label)
                if self._handler is not None:
                    handler = self._handler
                    self._guard(lambda: handler.on_queue_restored(label))
                return
            ch.queue_bind(queue, names.exchange(self.lab), routing_key=keys[index],
                          callback=lambda _f: bind(index + 1))

        ch.queue_declare(queue, durable=True, arguments=dict(names.inbox_arguments(self.queue_type, self.lab, self.delivery_limit)),
                         callback=lambda _f: bind(0))

    def _guard(self, fn: Callable[[], None]) -> None:
        """The last line of defence: an exception out of a handler must not end pika's loop
        (and with it the site). Log it and drop the connection; the site reconnects."""
        try:
            fn()
        except Exception:
            log.exception("%s: unexpected error in a broker callback; reconnecting", self.site)
            self._error = "unexpected error in a callback (see the log)"
            if self._conn is not None and self._conn.is_open:
                self._conn.close()

    def _make_consumer(self, queue: str) -> Callable[..., None]:
        def on_message(_ch: Channel, method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
            handler = self._handler
            assert handler is not None
            delivery = Delivery(
                queue=queue,
                tag=method.delivery_tag,
                body=body,
                redelivered=bool(method.redelivered),
                reply_to=props.reply_to,
                correlation_id=props.correlation_id,
                user_id=props.user_id,
            )
            self._guard(lambda: handler.on_delivery(delivery))

        return on_message

    # -- publishing -----------------------------------------------------------------------

    def publish(self, routing_key: str, body: bytes, token: Any = None, *,
                correlation_id: str | None = None) -> None:
        """Publish persistently with ``mandatory``; ``on_confirm(token, ok)`` follows."""
        if self._channel is None or not self._ready:
            raise BrokerUnavailable("not connected to the broker")
        self._publish_seq += 1
        self._pending[self._publish_seq] = token
        self._keys[self._publish_seq] = routing_key
        props = BasicProperties(
            delivery_mode=2, message_id=str(self._publish_seq), correlation_id=correlation_id, user_id=self.user,
        )
        try:
            self._channel.basic_publish(
                names.exchange(self.lab), routing_key, body, props, mandatory=True
            )
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise BrokerUnavailable(f"publish failed: {exc!r}") from exc

    def reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        """Answer a control request: through the lab's exchange to a ``reply.*`` key (what
        ``broker.admin.control_request`` asks for), else through the default exchange to the
        queue named ``reply_to``, which a site with its own identity may not publish to.

        A reply that cannot be sent is not an error of the site: the asker times out and
        asks again (the command's request id makes the second answer the first one)."""
        if self._channel is None or not self._ready:
            return
        via_lab = reply_to.startswith(names.reply_key(""))
        if not via_lab and self.user is not None:
            log.warning("%s: not answering to %r: a reply goes to a reply.* key of the lab's exchange", self.site,
                        reply_to[:80])
            return
        self._publish_seq += 1
        self._pending[self._publish_seq] = None
        try:
            self._channel.basic_publish(
                names.exchange(self.lab) if via_lab else "", reply_to, body,
                BasicProperties(correlation_id=correlation_id, message_id=str(self._publish_seq), user_id=self.user),
            )
        except (pika.exceptions.AMQPError, OSError) as exc:
            log.warning("%s: cannot answer a control request: %r", self.site, exc)

    def _on_return(self, _ch: Channel, _method: Any, props: BasicProperties, _body: bytes) -> None:
        if props.message_id is not None:
            self._returned.add(int(props.message_id))

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        ok = isinstance(method, Basic.Ack)
        tag = method.delivery_tag
        done = [t for t in self._pending if t <= tag] if method.multiple else [tag]
        assert self._handler is not None
        handler = self._handler
        for t in done:
            token = self._pending.pop(t, None)
            returned = t in self._returned
            self._returned.discard(t)
            key = self._keys.pop(t, None)
            if key is not None and not returned:
                self._note_refusal(key, refused=not ok)
            if token is not None:
                self._guard(functools.partial(handler.on_confirm, token, ok and not returned))

    def _note_refusal(self, key: str, *, refused: bool) -> None:
        """A channel whose publishes to one queue the broker keeps refusing (nack) is given up.

        A quorum queue refuses while it has no leader (a node was killed, an election is on);
        RabbitMQ 3.10 went on refusing, long after the election, the publishes of a channel that
        began publishing to the queue during it. A new channel does not inherit that: after
        REFUSED_FOR seconds of nothing but nacks on a routing key the connection is closed and
        the site reconnects (to the next node), and resends what was refused."""
        if not refused:
            self._refused_since.pop(key, None)
            return
        now = time.monotonic()
        since = self._refused_since.setdefault(key, now)
        if now - since >= REFUSED_FOR and self._conn is not None and self._conn.is_open and not self._stopping:
            log.warning("%s: the broker node %s has refused every publish to %s for %.0fs; reconnecting",
                        self.site, self.connected_to, key, now - since)
            self._error = f"the broker refused publishes to {key} for {now - since:.0f}s"
            self._refused_since.clear()
            self._conn.close()

    def ack(self, tag: int, multiple: bool = False) -> None:
        """Acknowledge deliveries; on a closed channel nothing is acknowledged and the broker
        delivers them again (the site drops them as duplicates)."""
        if self._channel is not None and self._channel.is_open:
            try:
                self._channel.basic_ack(tag, multiple=multiple)
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.warning("%s: cannot acknowledge deliveries: %r", self.site, exc)

    def call_later(self, delay: float, fn: Callable[[], None]) -> object:
        assert self._conn is not None
        return self._conn.ioloop.call_later(delay, lambda: self._guard(fn))
