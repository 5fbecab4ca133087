"""Admission: whether a well-formed envelope may come from the neighbour that sent it.

Theory of operation
-------------------
``envelope.decode`` checks that a packet is well formed (strict types, bounds, sizes). This
checks that what it says is possible in the hierarchy, before sequencing looks at it:

    direction     site data (inventory, discovery, status, SCF) only comes up from a child;
                  global data (objects, site control) only comes down from the parent
    origin        data going up was made in the sender's subtree (the child or below it);
                  data going down was made by one of our ancestors (the parent or above)
    identity      the payload names what the key names: a client's inventory or discovery
                  its client, an SCF its site (the origin), a status message its site and
                  serial, an object its ID (numbered by its origin) and kind, a site control
                  change its target (in our subtree) and delta serial
    sender        (``sender_refusal``, with per-site broker identities) the broker user that
                  published the packet is the site it names as its sender; a control
                  command's is the lab's controller
    counters      the versions, revisions and serials the receiver keeps are integers
                  (``true`` is not one) within ``MAX_VERSION``: a version of 2**62 would
                  freeze a client's record for good

A site's own code never sends anything else, so a refused envelope is a forgery or a bug:
the receiver refuses its whole packet with the reason and dead-letters it. Nothing of it is
applied and the link does not move (the real envelope with that number is taken when it
comes). Pure: the caller passes in what it knows of the hierarchy.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from emulator.protocol.envelope import MAX_VERSION, DataClass, Envelope
from emulator.protocol.objects import parse_object_id

_OBJECTS = frozenset({DataClass.PACKAGE, DataClass.ADVERTISEMENT, DataClass.COLLECTION})


def _counter(payload: dict[str, Any], name: str, *, low: int = 0) -> str | None:
    value = payload.get(name)
    if type(value) is not int:  # bool is an int subclass: `true` is refused here
        return f"its {name} is {value!r}, not an integer"
    if not low <= value <= MAX_VERSION:
        return f"its {name} {value} is beyond {MAX_VERSION}" if value > MAX_VERSION else f"its {name} is {value}"
    return None


def _text(payload: dict[str, Any], name: str, expected: str | None = None) -> str | None:
    value = payload.get(name)
    if not isinstance(value, str):
        return f"its {name} is {value!r}, not a string"
    if expected is not None and value != expected:
        return f"its payload's {name} {value!r} is not its {expected!r}"
    return None


def _identity(env: Envelope, descendants: Collection[str]) -> str | None:
    """What is wrong with the payload of ``env`` against its key and origin, or None."""
    p, cls, key = env.payload, env.data_class, env.key
    if cls in (DataClass.INVENTORY, DataClass.DISCOVERY):
        return _text(p, "client", key) or _counter(p, "version")
    if cls is DataClass.SCF:
        if key != env.origin:
            return f"the SCF of {key!r} comes from {env.origin}"
        return _text(p, "site", key) or _counter(p, "version")
    if cls is DataClass.STATUS:
        problem = _text(p, "site", env.origin) or _counter(p, "version")
        if problem:
            return problem
        if key != f"{p['site']}:{p['version']}":
            return f"its key {key!r} is not its site and serial {p['site']}:{p['version']}"
        return None
    if cls in _OBJECTS:
        problem = (_text(p, "id", key) or _text(p, "kind", cls.value) or _text(p, "origin", env.origin)
                   or _text(p, "def_uid") or _text(p, "name") or _counter(p, "revision"))
        if problem:
            return problem
        owner = parse_object_id(key)
        if owner is None or owner[0] != env.origin:
            return f"object ID {key!r} is not one {env.origin} numbers"
        if type(p.get("deleted", False)) is not bool:
            return f"its deleted is {p.get('deleted')!r}, not true or false"
        return None
    # site control: a change for a site of our subtree, numbered by its delta serial
    problem = _text(p, "target") or _counter(p, "delta_serial", low=1)
    if problem:
        return problem
    if p["target"] not in descendants:
        return f"its target {p['target']!r} is not this site or below it"
    if key != f"{p['target']}:{p['delta_serial']}":
        return f"its key {key!r} is not its target and delta serial {p['target']}:{p['delta_serial']}"
    if not isinstance(p.get("settings", {}), dict):
        return "its settings are not a mapping"
    return None


def refusal(
    env: Envelope,
    *,
    peer_role: Literal["parent", "child"],
    peer_subtree: Collection[str],
    ancestors: Collection[str],
    descendants: Collection[str],
) -> str | None:
    """Why ``env`` cannot come from its sender, or None when it can.

    ``peer_role`` is what the sender is to us; ``peer_subtree`` the sender and every site
    below it (for a child); ``ancestors`` our parent and every site above it;
    ``descendants`` this site and every site below it.
    """
    what = f"{env.data_class.value} {env.key!r} from {env.source} (origin {env.origin})"
    if peer_role == "child":
        if not env.data_class.upward:
            return f"{what}: global data does not come up from a child"
        if env.origin not in peer_subtree:
            return f"{what}: its origin is not in {env.source}'s subtree"
    else:
        if env.data_class.upward:
            return f"{what}: site data does not come down from the parent"
        if env.origin not in ancestors:
            return f"{what}: its origin is not an ancestor of this site"
    problem = _identity(env, descendants)
    return f"{what}: {problem}" if problem else None


# -- identity: who published it on the broker ---------------------------------------------------


@dataclass(frozen=True)
class Identities:
    """The broker users of a lab with per-site identities: each site's, and the controller's
    (the CLI, the fault daemon). RabbitMQ checks that a message's ``user_id`` is its
    publisher's login (only the controller, an impersonator, may pass another's on: its fault
    relays keep the sender's), so ``user_id`` says which site published it."""

    sites: Mapping[str, str]  # site code -> broker user
    controller: str


def sender_refusal(identities: Identities | None, *, user_id: str | None, sender: str | None) -> str | None:
    """Why a message that names ``sender`` (a site code; None: a control command, which only
    the controller sends) cannot be taken from broker user ``user_id``, or None when it can.

    Without identities (``None``: the broker's user could not manage users) nothing is known
    of the publisher and nothing is refused here; the other admission rules still hold."""
    if identities is None:
        return None
    expected = identities.controller if sender is None else identities.sites.get(sender)
    who = "a control command" if sender is None else f"a packet from {sender}"
    if expected is None:
        return f"identity: {who}, which is not a site of this lab"
    if user_id == expected:
        return None
    return (f"identity: {who} published by broker user {user_id!r}, not by"
            f" {'the controller' if sender is None else sender} ({expected})")


# Preinst's /syncparent runs "at the current site and all its child sites": a site passes it down
# to its children, so a child takes that command (and only it) from its parent's broker user too.
PARENT_COMMANDS = frozenset({"syncparent"})


def command_refusal(identities: Identities | None, *, user_id: str | None, parent: str | None,
                    cmd: str | None) -> str | None:
    """Why a control command published by ``user_id`` cannot be taken by a site whose parent is
    ``parent``, or None when it can: the controller's always; the parent's only for the commands
    a parent passes down (``cmd`` None: not parsed yet, only who sent it is judged)."""
    if identities is None or user_id == identities.controller:
        return None
    parent_user = identities.sites.get(parent) if parent else None
    if parent_user is not None and user_id == parent_user:
        if cmd is None or cmd in PARENT_COMMANDS:
            return None
        return (f"identity: a {cmd!r} command published by {parent} ({user_id}): a parent passes down only"
                f" {', '.join(sorted(PARENT_COMMANDS))}")
    return sender_refusal(identities, user_id=user_id, sender=None)
