"""Builders for protocol messages in unit tests: valid by default, override what the test is about."""

from __future__ import annotations

from typing import Any

from emulator.protocol.envelope import (
    DataClass,
    Envelope,
    LinkAck,
    Packet,
    RecoveryAnnounce,
    RecoveryComplete,
    RecoveryReport,
    RecoveryResync,
    RecoveryResyncDone,
    Reject,
    RejectReason,
    ResendRequest,
    content_hash,
    priority_of,
)
from emulator.protocol.sequencing import LinkState

LAB = "demo-a1b2c3"
PARENT = "CEN"
CHILD = "PR1"


def envelope(
    *,
    link_seq: int = 1,
    txn_id: int = 1,
    source: str = CHILD,
    dest: str = PARENT,
    incarnation: int = 0,
    data_class: DataClass = DataClass.INVENTORY,
    key: str = "client-1",
    payload: dict[str, Any] | None = None,
    **overrides: Any,
) -> Envelope:
    """A well-formed data envelope whose hash matches its payload."""
    if payload is None:
        payload = {"seq": link_seq, "txn": txn_id, "key": key}
    fields: dict[str, Any] = {
        "source": source,
        "dest": dest,
        "incarnation": incarnation,
        "origin": source,
        "data_class": data_class,
        "key": key,
        "priority": priority_of(data_class),
        "txn_id": txn_id,
        "link_seq": link_seq,
        "hash": content_hash(payload),
        "payload": payload,
    }
    fields.update(overrides)
    return Envelope(**fields)


def ack(
    *,
    through: int,
    sent_through: int = 0,
    source: str = PARENT,
    dest: str = CHILD,
    incarnation: int = 0,
) -> LinkAck:
    return LinkAck(
        source=source, dest=dest, incarnation=incarnation, through=through, sent_through=sent_through
    )


def link(**state: Any) -> LinkState:
    """Our (``PARENT``'s) view of the link with ``CHILD``; keyword arguments set its state."""
    result = LinkState(peer=CHILD, role="child")
    for name, value in state.items():
        if not hasattr(result, name):
            raise AttributeError(f"LinkState has no field {name!r}")
        setattr(result, name, value)
    return result


def one_of_each_kind(source: str = CHILD, dest: str = PARENT) -> dict[str, Any]:
    """One message of every kind on the wire, keyed by ``kind``."""
    common: dict[str, Any] = {"source": source, "dest": dest, "incarnation": 3}
    msgs: list[Any] = [
        envelope(source=source, dest=dest, incarnation=3, link_seq=7, txn_id=42,
                 data_class=DataClass.SCF, key="scf", payload={"serial": 5, "nested": [1, {"a": None}]}),
        LinkAck(**common, through=6, sent_through=9),
        ResendRequest(**common, from_seq=4),
        Reject(**common, link_seq=8, reason=RejectReason.FENCED, detail="incarnation 2, expected 3"),
        RecoveryAnnounce(**common, recovery_id="r-1", txn_id=100, next_send_seq=5, next_expected=2),
        RecoveryReport(**common, recovery_id="r-1", next_expected=9, last_sent=4, txn_watermark=120,
                       max_object_ids={"package": 14}, scf_serial=3, control_serial=2,
                       objects=[{"id": "PR100014", "kind": "package"}]),
        RecoveryResync(**common, recovery_id="r-1", next_send_seq=9, next_expected=5),
        RecoveryResyncDone(**common, recovery_id="r-1", through=7),
        RecoveryComplete(**common, recovery_id="r-1"),
    ]
    return {m.kind: m for m in msgs}


def packet(*messages: Any, lab: str = LAB, source: str = CHILD, dest: str = PARENT) -> Packet:
    if not messages:
        messages = (envelope(source=source, dest=dest),)
    return Packet(lab=lab, source=source, dest=dest, messages=list(messages))
