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


DEAD_KEY = "dead"


def connection_name(lab: str, site: str) -> str:
    return f"smslab:{lab}:{site}"


def queue_arguments(queue_type: str) -> dict[str, object]:
    if queue_type == "quorum":
        return {"x-queue-type": "quorum"}
    return {}
