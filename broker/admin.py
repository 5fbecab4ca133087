"""Short-lived broker work for the orchestrator and the CLI: declare and delete a lab's
objects, send a control request to a site and wait for its answer, read queue depths."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pika
import pika.exceptions

from broker import names, urls
from emulator.errors import BrokerUnavailable, ConfigError, LabError

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"


@contextmanager
def blocking(url: str, name: str = "smslab-cli") -> Iterator[Any]:
    """A blocking connection to the broker at ``url``; several URLs (comma-separated, the nodes
    of one cluster) are tried in turn and the first that answers is used."""
    params_list = all_parameters(url)
    for params in params_list:
        params.connection_attempts = 1
        params.socket_timeout = 5
        params.client_properties = {"connection_name": name}
    try:
        conn = pika.BlockingConnection(params_list if len(params_list) > 1 else params_list[0])
    except pika.exceptions.ProbableAuthenticationError as exc:
        raise BrokerUnavailable(f"RabbitMQ at {_safe(url)} refused the login: {exc}",
                                hint="check the user and password in the URL") from exc
    except pika.exceptions.ProbableAccessDeniedError as exc:
        raise BrokerUnavailable(f"RabbitMQ at {_safe(url)} refused access to the virtual host: {exc}",
                                hint="check the virtual host in the URL (%2F is the default '/')") from exc
    except (pika.exceptions.AMQPError, OSError) as exc:
        detail = str(exc) or repr(exc)
        raise BrokerUnavailable(
            f"cannot reach RabbitMQ at {_safe(url)}: {exc.__class__.__name__}: {detail}",
            hint="start RabbitMQ (rabbitmq-server -detached) or pass --amqp URL / SMSLAB_AMQP_URL",
        ) from exc
    try:
        yield conn
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailable(f"broker error: {exc!r}") from exc
    finally:
        try:
            if conn.is_open:
                conn.close()
        except (pika.exceptions.AMQPError, OSError):
            pass


def parameters(url: str) -> pika.URLParameters:
    """The connection parameters of ``url`` (of the first node if it names several)."""
    return all_parameters(url)[0]


def all_parameters(url: str) -> list[pika.URLParameters]:
    """One set of connection parameters per URL in ``url`` (comma-separated)."""
    found = urls.split(url)
    if not found:
        raise ConfigError(f"not an AMQP URL: {url!r}",
                          hint="use amqp://USER:PASSWORD@HOST:PORT/VHOST, e.g. " + DEFAULT_URL)
    return [pika.URLParameters(u) for u in found]


def _safe(url: str) -> str:
    shown = []
    for one in urls.split(url) or [url]:
        params = pika.URLParameters(one)
        shown.append(f"amqp://{params.host}:{params.port}"
                     f"{'/' + params.virtual_host if params.virtual_host != '/' else ''}")
    return ",".join(shown)


def login_user(url: str) -> str:
    """The broker user ``url`` logs in as: the validated ``user_id`` of what it publishes."""
    return str(parameters(url).credentials.username)


def check(url: str) -> None:
    with blocking(url):
        pass


def declare_lab(url: str, lab: str, sites: list[str], queue_type: str = "classic",
                links: list[tuple[str, str]] | None = None, *,
                diverted: frozenset[tuple[str, str]] = frozenset(),
                delivery_limit: int = names.DELIVERY_LIMIT,
                dead_letter_max: int = names.DEAD_LETTER_MAX) -> None:
    """Declare a lab's exchange, queues and bindings (idempotent). Each directed link's key is
    bound to its receiver's inbox, except the ``diverted`` ones (a link fault holds them)."""
    with blocking(url) as conn:
        ch = conn.channel()
        ch.exchange_declare(names.exchange(lab), "direct", durable=True)
        args = names.inbox_arguments(queue_type, lab, delivery_limit)
        # The dead-letter queue first: the inboxes dead-letter into it.
        ch.queue_declare(names.dead_queue(lab), durable=True,
                         arguments=names.dead_queue_arguments(queue_type, dead_letter_max))
        ch.queue_bind(names.dead_queue(lab), names.exchange(lab), routing_key=names.DEAD_KEY)
        for site in sites:
            for queue, key in (
                (names.site_queue(lab, site), names.site_key(site)),
                (names.control_queue(lab, site), names.control_key(site)),
            ):
                ch.queue_declare(queue, durable=True, arguments=args)
                ch.queue_bind(queue, names.exchange(lab), routing_key=key)
        for key, receiver in names.link_keys(links or []):
            sender = key.split(".")[1]
            if (sender, receiver) not in diverted:
                ch.queue_bind(names.site_queue(lab, receiver), names.exchange(lab), routing_key=key)


def delete_lab(url: str, lab: str, sites: list[str], links: list[tuple[str, str]] | None = None) -> None:
    relays = [names.relay_queue(lab, a, b) for p, c in (links or []) for a, b in ((p, c), (c, p))]
    queues = [names.dead_queue(lab), *relays] + [
        q for s in sites for q in (names.site_queue(lab, s), names.control_queue(lab, s))
    ]
    if len(urls.split(url)) > 1:
        # On a cluster, deleting a quorum queue one of whose members is down takes RabbitMQ 3.10
        # about 5 s (a Raft timeout): the queues go in parallel, each connection its own.
        with ThreadPoolExecutor(max_workers=8) as pool:
            for future in [pool.submit(_delete_queues, url, queues[i::8]) for i in range(8)]:
                future.result()
    else:
        _delete_queues(url, queues)
    with blocking(url) as conn:
        conn.channel().exchange_delete(names.exchange(lab))


def _delete_queues(url: str, queues: list[str]) -> None:
    if not queues:
        return
    with blocking(url) as conn:
        ch = conn.channel()
        for queue in queues:
            ch.queue_delete(queue)


def divert_link(url: str, lab: str, sender: str, receiver: str, queue_type: str = "classic") -> None:
    """Route the link sender->receiver to its relay queue instead of the receiver's inbox.

    The inbox binding goes first: a packet published in between comes back to its sender as
    unroutable (and is sent again), where the other order could deliver it twice."""
    key = names.link_key(sender, receiver)
    relay = names.relay_queue(lab, sender, receiver)
    with blocking(url) as conn:
        ch = conn.channel()
        ch.queue_declare(relay, durable=True, arguments=names.queue_arguments(queue_type))
        ch.queue_unbind(names.site_queue(lab, receiver), names.exchange(lab), routing_key=key)
        ch.queue_bind(relay, names.exchange(lab), routing_key=key)


def restore_link(url: str, lab: str, sender: str, receiver: str) -> None:
    """Route the link sender->receiver to the receiver's inbox again (the relay keeps what it
    holds until it is drained)."""
    key = names.link_key(sender, receiver)
    with blocking(url) as conn:
        ch = conn.channel()
        try:
            ch.queue_unbind(names.relay_queue(lab, sender, receiver), names.exchange(lab), routing_key=key)
        except pika.exceptions.ChannelClosedByBroker:  # no relay queue (any more): nothing to unbind
            ch = conn.channel()
        ch.queue_bind(names.site_queue(lab, receiver), names.exchange(lab), routing_key=key)


def unbind_inbox(url: str, lab: str, sender: str, receiver: str) -> None:
    """The link sender->receiver no longer goes to the receiver's inbox (idempotent)."""
    with blocking(url) as conn:
        conn.channel().queue_unbind(names.site_queue(lab, receiver), names.exchange(lab),
                                    routing_key=names.link_key(sender, receiver))


def queue_depth(url: str, queue: str) -> int | None:
    """Messages ready in a queue, or None if it does not exist."""
    with blocking(url) as conn:
        try:
            return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker:
            return None


def queue_depths(url: str, lab: str, sites: list[str]) -> dict[str, int]:
    depths: dict[str, int] = {}
    with blocking(url) as conn:
        for site in sites:
            ch = conn.channel()
            try:
                frame = ch.queue_declare(names.site_queue(lab, site), passive=True)
                depths[site] = frame.method.message_count
            except pika.exceptions.ChannelClosedByBroker:
                depths[site] = -1
        ch = conn.channel()
        try:
            depths["dead"] = ch.queue_declare(names.dead_queue(lab), passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:
            depths["dead"] = -1
    return depths


def dead_letters(url: str, lab: str, limit: int = 100) -> list[dict[str, Any]]:
    """Read (and requeue) the dead letters of a lab, with the reasons sites gave."""
    out: list[dict[str, Any]] = []
    with blocking(url) as conn:
        ch = conn.channel()
        for _ in range(limit):
            method, props, body = ch.basic_get(names.dead_queue(lab), auto_ack=False)
            if method is None:
                break
            out.append({"headers": dict(props.headers or {}), "body": body.decode(errors="replace")})
        ch.close()  # unacked -> requeued: reading dead letters does not consume them
    return out


def publish_raw(url: str, lab: str, site: str, body: bytes) -> None:
    """Put raw bytes in a site's inbox (used to test malformed input)."""
    with blocking(url) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(names.exchange(lab), names.site_key(site), body,
                         pika.BasicProperties(delivery_mode=2, user_id=login_user(url)), mandatory=True)


def control_request(
    url: str, lab: str, site: str, command: dict[str, Any], timeout: float = 10.0,
    request_id: str | None = None,
) -> dict[str, Any]:
    """Send a command to a running site and wait for its answer.

    The site runs a command with a given ``request_id`` once: sent again (a retry), it
    answers what it answered the first time.
    """
    with blocking(url) as conn:
        ch = conn.channel()
        # The answer comes back through the lab's exchange, to a key of our own: a site with its
        # own broker identity may publish to the lab's exchange only.
        token = uuid.uuid4().hex
        reply = ch.queue_declare(names.reply_queue(lab, token), exclusive=True, auto_delete=True).method.queue
        try:
            ch.queue_bind(reply, names.exchange(lab), routing_key=names.reply_key(token))
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise LabError(f"lab {lab} has no exchange on the broker ({exc.reply_text})",
                           hint="is the lab up? (smslab status)") from exc
        corr = request_id or uuid.uuid4().hex
        ch.confirm_delivery()
        try:
            ch.basic_publish(
                names.exchange(lab), names.control_key(site), json.dumps(command).encode(),
                pika.BasicProperties(reply_to=names.reply_key(token), correlation_id=corr,
                                     expiration=str(int(timeout * 1000)), user_id=login_user(url)),
                mandatory=True,
            )
        except pika.exceptions.UnroutableError as exc:
            raise LabError(
                f"site {site} has no control queue in lab {lab}",
                hint="is the lab up? (smslab status)",
            ) from exc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, props, body = ch.basic_get(reply, auto_ack=True)
            if method is not None and props.correlation_id == corr:
                answer: dict[str, Any] = json.loads(body)
                return answer
            conn.process_data_events(time_limit=0.05)
        raise LabError(
            f"site {site} did not answer {command.get('cmd')!r} within {timeout:.0f}s",
            hint=f"is it running? (smslab status; smslab start {site})",
        )
