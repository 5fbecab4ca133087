"""The wire format: every message between sites is one of these pydantic models, as JSON.

One AMQP message carries one ``Packet``: a list of messages from one site to one site
(Replication Manager bundles per destination the same way). A packet holds

- ``Envelope``: sequenced data (site data up, global data down, site control changes);
- ``LinkAck``: "I applied everything you sent me through ``through``", also sent as a
  heartbeat every sync interval;
- ``ResendRequest``: "I hold a gap; send again from ``from_seq``";
- ``Reject``: hardened mode's explicit refusal, with its reason;
- the recovery handshake messages (``RecoveryAnnounce`` ... ``RecoveryComplete``).

Decoding never raises anything but ``MalformedEnvelope`` and never returns half a packet.

Strict input
------------
What a peer sends is validated in pydantic's strict mode (JSON ``true`` is not a number, a
string is not an integer), every integer within the bounds below, every string within a
length, before anything of it is looked at. A packet is at most ``MAX_PACKET_BYTES``; one
envelope's payload at most ``MAX_PAYLOAD_BYTES`` (canonical JSON), ``MAX_DEPTH`` levels deep,
with integers of 64 bits. The bounds are far above what any lab reaches
(``MAX_SEQ``: a link carrying a million envelopes a second for twelve days) and far below
what poisons a counter for good (2**62).
"""

from __future__ import annotations

import hashlib
import math
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from emulator.errors import MalformedEnvelope
from emulator.protocol import codec

SCHEMA_VERSION: Literal[1] = 1
SiteCode = Annotated[str, Field(pattern=r"^[A-Z0-9]{3}$")]

MAX_SEQ = 2**40  # link sequences, transaction IDs, watermarks
MAX_INCARNATION = 2**31  # one more per recovery
MAX_VERSION = 2**31  # data versions, object revisions, serials
MAX_PACKET_BYTES = 32 * 2**20  # one AMQP message (a report of every object a site holds fits)
MAX_MESSAGES = 100_000  # messages in one packet
MAX_PAYLOAD_BYTES = 64 * 2**10  # one envelope's payload, canonical JSON (an inventory is ~200 B)
MAX_DEPTH = 16  # nesting of a payload or a reported object
MAX_JSON_INT = 2**63 - 1  # integers inside payloads: 64 bits, what the codec writes natively
MAX_OBJECTS = 100_000  # objects in one recovery report (object numbers have five digits)

Seq = Annotated[int, Field(ge=0, le=MAX_SEQ)]
Seq1 = Annotated[int, Field(ge=1, le=MAX_SEQ)]
Incarnation = Annotated[int, Field(ge=0, le=MAX_INCARNATION)]
Version = Annotated[int, Field(ge=0, le=MAX_VERSION)]
RecoveryId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
Challenge = Annotated[str, Field(max_length=64)]


class DataClass(str, Enum):
    """What an envelope carries. Site data goes up, global data goes down."""

    INVENTORY = "inventory"
    DISCOVERY = "discovery"
    STATUS = "status"
    SCF = "scf"
    PACKAGE = "package"
    ADVERTISEMENT = "advertisement"
    COLLECTION = "collection"
    SITE_CONTROL = "site_control"

    @property
    def upward(self) -> bool:
        return self in SITE_DATA


SITE_DATA = frozenset({DataClass.INVENTORY, DataClass.DISCOVERY, DataClass.STATUS, DataClass.SCF})


class Priority(str, Enum):
    HIGH = "high"  # SCF copies and site control changes
    NORMAL = "normal"
    LOW = "low"  # status messages


def priority_of(data_class: DataClass) -> Priority:
    if data_class in (DataClass.SCF, DataClass.SITE_CONTROL):
        return Priority.HIGH
    if data_class is DataClass.STATUS:
        return Priority.LOW
    return Priority.NORMAL


def content_hash(payload: dict[str, Any]) -> str:
    """A short stable hash of a payload: two envelopes with one seq and two hashes differ."""
    return hashlib.blake2b(codec.canonical(payload), digest_size=8).hexdigest()


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = SCHEMA_VERSION
    source: SiteCode  # the sending end of the link
    dest: SiteCode
    incarnation: Incarnation  # the sender's incarnation (checked in hardened mode)


class Envelope(_Msg):
    kind: Literal["data"] = "data"
    origin: SiteCode  # the site where the data or object was made
    data_class: DataClass
    key: str = Field(min_length=1, max_length=200)
    priority: Priority
    txn_id: Seq1  # the sender's Replication Manager transaction ID
    link_seq: Seq1  # contiguous per directed link, from 1
    op: Literal["upsert", "delete"] = "upsert"
    hash: str = Field(pattern=r"^[0-9a-f]{16}$")
    payload: dict[str, Any]


class LinkAck(_Msg):
    kind: Literal["ack"] = "ack"
    through: Seq  # highest link_seq applied, contiguous
    sent_through: Seq  # highest link_seq the acker has sent on the reverse link
    fresh: bool = False  # the acker's process has not heard from us since it started: answer now


class ResendRequest(_Msg):
    kind: Literal["resend"] = "resend"
    from_seq: Seq1


class RejectReason(str, Enum):
    DUPLICATE = "duplicate"
    STALE = "stale"
    GAP = "gap"
    FENCED = "fenced"
    QUARANTINED = "quarantined"


class Reject(_Msg):
    kind: Literal["reject"] = "reject"
    link_seq: Seq
    reason: RejectReason
    detail: str = Field(default="", max_length=1000)


class RecoveryAnnounce(_Msg):
    """Phase 1: the recovering site names itself and its restored counters."""

    kind: Literal["recovery_announce"] = "recovery_announce"
    recovery_id: RecoveryId
    txn_id: Seq
    next_send_seq: Seq1  # what the restored site would send next on this link
    next_expected: Seq1  # what the restored site expects next on the reverse link


class RecoveryReport(_Msg):
    """Phase 2: a peer has paused the link and says what it knows of the recovering site."""

    kind: Literal["recovery_report"] = "recovery_report"
    recovery_id: RecoveryId
    next_expected: Seq1  # next seq the peer expects from the recovering site
    last_sent: Seq  # last seq the peer sent to the recovering site
    txn_watermark: Seq  # the peer's highest accepted txn ID from the recovering site
    # per object kind, the highest number of the site seen
    max_object_ids: dict[Annotated[str, Field(max_length=40)], Annotated[int, Field(ge=0, le=99999)]] = Field(
        max_length=16)
    scf_serial: Version  # the recovering site's SCF serial as the peer knows it
    control_serial: Version  # the last site-control delta serial the peer processed from it
    their_incarnation: Incarnation = 0  # the recovering site's incarnation as the peer knows it
    status_serial: Version = 0  # the highest status message serial of the site the peer holds
    # the site's own objects held
    objects: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_OBJECTS)
    # echoed by the recovering site's resync and complete: only who read this report can
    # move the recovery on (a forger who did not is refused)
    challenge: Challenge = ""


class RecoveryResync(_Msg):
    """Phase 4: counters are set; here are the link sequences; resynchronize the data."""

    kind: Literal["recovery_resync"] = "recovery_resync"
    recovery_id: RecoveryId
    next_send_seq: Seq1  # the recovering site's next seq to this peer
    next_expected: Seq1  # the recovering site's next expected seq from this peer
    challenge: Challenge = ""  # the peer's report's


class RecoveryResyncDone(_Msg):
    """A peer has queued all its resync data for the recovering site, through ``through``."""

    kind: Literal["recovery_resync_done"] = "recovery_resync_done"
    recovery_id: RecoveryId
    through: Seq


class RecoveryComplete(_Msg):
    kind: Literal["recovery_complete"] = "recovery_complete"
    recovery_id: RecoveryId
    challenge: Challenge = ""  # the peer's report's


Message = Annotated[
    Envelope | LinkAck | ResendRequest | Reject | RecoveryAnnounce | RecoveryReport | RecoveryResync | RecoveryResyncDone | RecoveryComplete,
    Field(discriminator="kind"),
]


class Packet(BaseModel):
    """One AMQP message: messages of one lab, from one site to one site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = SCHEMA_VERSION
    lab: str = Field(max_length=200)
    source: SiteCode
    dest: SiteCode
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)


_PACKET = TypeAdapter(Packet)


def encode(packet: Packet) -> bytes:
    return packet.model_dump_json().encode()


def encode_parts(lab: str, source: str, dest: str, parts: list[bytes]) -> bytes:
    """Build a packet body from messages already serialized (the outbox keeps them so)."""
    head = f'{{"v":1,"lab":"{lab}","source":"{source}","dest":"{dest}","messages":['
    return head.encode() + b",".join(parts) + b"]}"


def encode_message(msg: _Msg) -> bytes:
    return msg.model_dump_json().encode()


def encode_envelope(*, source: str, dest: str, incarnation: int, origin: str, data_class: DataClass, key: str,
                    txn_id: int, link_seq: int, op: str, hash_: str, payload: dict[str, Any]) -> bytes:
    """The wire form of an envelope a site builds itself, without a model in between (the
    sender's hot path): the fields ``Envelope`` has, which ``decode`` validates at the
    receiver. ``encode_message(Envelope(...))`` gives the same message."""
    return codec.dumps_bytes({
        "v": SCHEMA_VERSION, "source": source, "dest": dest, "incarnation": incarnation, "kind": "data",
        "origin": origin, "data_class": data_class.value, "key": key, "priority": priority_of(data_class).value,
        "txn_id": txn_id, "link_seq": link_seq, "op": op, "hash": hash_, "payload": payload,
    })


def decode(body: bytes, *, lab: str, dest: str) -> Packet:
    """Parse and check one packet addressed to ``dest`` in ``lab``.

    Raises:
        MalformedEnvelope: not JSON, not a packet of this schema, another lab, another site,
            or a message inside whose source/dest disagree with the packet's.
    """
    if len(body) > MAX_PACKET_BYTES:
        raise MalformedEnvelope(f"packet of {len(body)} bytes, more than {MAX_PACKET_BYTES}")
    try:
        packet = _PACKET.validate_json(body, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise MalformedEnvelope(
            f"malformed packet: {first.get('msg')} at {where or 'top level'}"
            f" ({exc.error_count()} error(s))"
        ) from exc
    if packet.lab != lab:
        raise MalformedEnvelope(f"packet for lab {packet.lab!r} reached lab {lab!r}")
    if packet.dest != dest:
        raise MalformedEnvelope(f"packet for site {packet.dest} reached site {dest}")
    for msg in packet.messages:
        if msg.source != packet.source or msg.dest != packet.dest:
            raise MalformedEnvelope(
                f"message {msg.kind} says {msg.source}->{msg.dest} inside packet"
                f" {packet.source}->{packet.dest}"
            )
        if isinstance(msg, Envelope):
            where = f"envelope {msg.source}->{msg.dest} seq {msg.link_seq}"
            problem = bounded(msg.payload)
            if problem:
                raise MalformedEnvelope(f"{where}: payload {problem}")
            raw = codec.canonical(msg.payload)
            if len(raw) > MAX_PAYLOAD_BYTES:
                raise MalformedEnvelope(f"{where}: payload of {len(raw)} bytes, more than {MAX_PAYLOAD_BYTES}")
            if msg.hash != hashlib.blake2b(raw, digest_size=8).hexdigest():
                raise MalformedEnvelope(f"{where}: content hash mismatch")
        elif isinstance(msg, RecoveryReport):
            for obj in msg.objects:
                problem = bounded(obj)
                if problem:
                    raise MalformedEnvelope(f"recovery report {msg.source}->{msg.dest}: object {problem}")
    return packet


def bounded(value: Any, max_depth: int = MAX_DEPTH) -> str | None:
    """What is wrong with a decoded JSON value as a payload (too deep, an integer JSON does
    carries beyond 64 bits, a number that is not finite), or None. It descends no deeper than
    ``max_depth`` + 1 levels, so a deep value never exhausts the stack.

    Every envelope a site takes goes through here: strings and 64-bit integers, most of a
    payload, are passed over in the loop without a call (a fifth of the time an iterative walk
    took; bench/link_throughput.py's floor)."""
    return _walk(value, 1, max_depth)


def _walk(item: Any, depth: int, max_depth: int) -> str | None:
    kind = type(item)
    children: Any
    if kind is dict or (kind is not list and isinstance(item, dict)):
        children = item.values()
    elif kind is list or isinstance(item, list):
        children = item
    else:
        return _leaf(item)
    if depth > max_depth:
        return f"nested more than {max_depth} levels"
    for child in children:
        kind = type(child)
        if kind is str or (kind is int and -MAX_JSON_INT - 1 <= child <= MAX_JSON_INT):
            continue
        problem = _walk(child, depth + 1, max_depth)
        if problem:
            return problem
    return None


def _leaf(item: Any) -> str | None:
    if isinstance(item, bool) or item is None or isinstance(item, str):
        return None
    if isinstance(item, int):
        if not -MAX_JSON_INT - 1 <= item <= MAX_JSON_INT:
            return f"holds the integer {item}, beyond 64 bits"
    elif isinstance(item, float) and not math.isfinite(item):
        return "holds a number that is not finite"
    return None
