"""Names of a lab's broker objects. Every name starts with ``smslab.<lab id>.`` so several
labs (and test runs) share one broker without seeing each other's traffic."""

from __future__ import annotations


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


def queue_arguments(queue_type: str) -> dict[str, object]:
    if queue_type == "quorum":
        return {"x-queue-type": "quorum"}
    return {}
