"""Names of a lab's broker objects. Every name starts with ``smslab.<lab id>.`` so several
labs (and test runs) share one broker without seeing each other's traffic."""

from __future__ import annotations

import re


def exchange(lab: str) -> str:
    return f"smslab.{lab}"


def site_queue(lab: str, site: str) -> str:
    return f"smslab.{lab}.site.{site}"


def control_queue(lab: str, site: str) -> str:
    return f"smslab.{lab}.ctl.{site}"


def dead_queue(lab: str) -> str:
    return f"smslab.{lab}.dead"


def site_key(site: str) -> str:
    return f"site.{site}"


def control_key(site: str) -> str:
    return f"ctl.{site}"


def link_key(sender: str, receiver: str) -> str:
    """The routing key of one directed link: sites publish their packets for a neighbour with
    it. The lab binds it to the receiver's inbox; a link fault moves the binding to the link's
    relay queue, so faults are made on the broker and the sites know nothing of them."""
    return f"link.{sender}.{receiver}"


def relay_queue(lab: str, sender: str, receiver: str) -> str:
    return f"smslab.{lab}.relay.{sender}.{receiver}"


def link_keys(links: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(routing key, receiving site) of both directions of each (parent, child) link."""
    out = []
    for parent, child in links:
        out.append((link_key(parent, child), child))
        out.append((link_key(child, parent), parent))
    return out


DEAD_KEY = "dead"


def connection_name(lab: str, site: str) -> str:
    return f"smslab:{lab}:{site}"


# A quorum queue counts the deliveries of each message; past this many (a message that ends every
# consumer that takes it) the broker moves it to the lab's dead-letter queue. Generous: a site
# killed or cut off with envelopes in flight has them delivered again, and an envelope
# dead-lettered anyway is not lost: its sender resends what the receiver never acknowledged.
DELIVERY_LIMIT = 50


def queue_arguments(queue_type: str, *, dead_letter_to: str | None = None,
                    delivery_limit: int = DELIVERY_LIMIT) -> dict[str, object]:
    """The arguments of a lab queue. ``quorum``: a replicated Raft queue (durable; never
    exclusive, auto-delete or with priorities). With ``dead_letter_to`` (an exchange), messages
    delivered more than ``delivery_limit`` times (the topology's ``quorum_delivery_limit``,
    default DELIVERY_LIMIT) go there with the dead-letter routing key.

    At-most-once dead-lettering (the default strategy) on purpose: at-least-once needs
    ``x-overflow: reject-publish``, and with it RabbitMQ 3.10 left a channel that began to publish
    to a queue while its leader was being elected (a site failing over after a node was killed)
    refusing every later publish to it. A message past the limit and lost on its way to the
    dead-letter queue is sent again by its sender, which never got the receiver's ack."""
    if queue_type != "quorum":
        return {}
    args: dict[str, object] = {"x-queue-type": "quorum"}
    if dead_letter_to is not None:
        args.update({
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": dead_letter_to,
            "x-dead-letter-routing-key": DEAD_KEY,
        })
    return args


DEAD_LETTER_MAX = 10_000  # the topology's dead_letter_max by default


def dead_queue_arguments(queue_type: str, max_length: int = DEAD_LETTER_MAX) -> dict[str, object]:
    """The lab's dead-letter queue: capped at ``max_length`` messages, the oldest dropped past it
    (``x-max-length``, the default ``drop-head`` overflow; classic and quorum queues alike). A
    queue argument rather than a policy: it needs no management plugin or CLI on the broker's
    host, and a lab's queue is declared once, by ``up``, with it. (A policy set by hand with
    ``rabbitmqctl set_policy`` on ``^smslab\\..*\\.dead$`` would override it.) Every declarer of
    the queue must pass the same arguments: RabbitMQ refuses a redeclaration that differs."""
    return {**queue_arguments(queue_type), "x-max-length": max_length}


def inbox_arguments(queue_type: str, lab: str, delivery_limit: int = DELIVERY_LIMIT) -> dict[str, object]:
    """A site's envelope inbox and its control queue: dead-lettered to the lab's dead queue."""
    return queue_arguments(queue_type, dead_letter_to=exchange(lab), delivery_limit=delivery_limit)


# -- per-site broker identities (issue 10) ----------------------------------------------------

CONTROLLER = "controller"  # the lab's own identity: the CLI, the fault daemon, the recovery agent


def broker_user(lab: str, who: str) -> str:
    """The broker user of a site (``who`` its code) or of the lab's controller
    (``who`` = CONTROLLER). Named after the lab id, so labs sharing a broker never share users
    and ``down`` deletes exactly its own."""
    return f"smslab-{lab}-{who}"


def reply_key(token: str) -> str:
    """The routing key a control request's answer comes back on (``reply_to``): the reply queue
    is bound to the lab's exchange with it, so a site answers through the lab's exchange and
    needs no write permission on the default exchange (which routes to any queue by name)."""
    return f"reply.{token}"


def reply_queue(lab: str, token: str) -> str:
    return f"smslab.{lab}.reply.{token}"


def _re(name: str) -> str:
    return "^" + re.escape(name) + "$"


def site_permissions(lab: str, site: str) -> tuple[str, str, str]:
    """(configure, write, read) of a site's broker user, as RabbitMQ regexes.

    configure: its own two queues (declared again when deleted under it, status 5400), nothing
    else (the exchange is only checked, passively; the dead-letter queue is the lab's).
    write: the lab's exchange (to publish) and its own queues (to bind them). Not ``amq.default``:
    that would let it put a message straight into any queue by name.
    read: its own queues (to consume) and the lab's exchange (to bind its queues to it)."""
    own = f"^({re.escape(site_queue(lab, site))}|{re.escape(control_queue(lab, site))})$"
    ex = _re(exchange(lab))
    return own, f"{ex}|{own}", f"{ex}|{own}"


def controller_permissions(lab: str) -> tuple[str, str, str]:
    """The controller's: every object of the lab (declare, bind, publish, consume, delete), and
    nothing of another lab."""
    everything = "^" + re.escape(exchange(lab)) + r"(\..*)?$"
    return everything, everything, everything
