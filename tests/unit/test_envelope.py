"""The wire format: round trips of every message kind, and every way a packet is refused.

``decode`` is the one door from the broker into a site: whatever comes in, it returns a whole
packet or raises ``MalformedEnvelope`` with a reason (the site dead-letters it and goes on).
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.errors import MalformedEnvelope
from emulator.protocol import envelope as wire
from emulator.protocol.envelope import (
    MAX_JSON_INT,
    MAX_SEQ,
    DataClass,
    Envelope,
    Packet,
    Priority,
    content_hash,
    decode,
    encode,
    encode_message,
    encode_parts,
    priority_of,
)
from tests.unit.helpers import CHILD, LAB, PARENT, envelope, one_of_each_kind, packet

KINDS = one_of_each_kind()
FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def refusal(body: bytes | str, *, lab: str = LAB, dest: str = PARENT) -> str:
    """The message of the ``MalformedEnvelope`` that ``decode`` raises (nothing else will do)."""
    raw = body.encode() if isinstance(body, str) else body
    try:
        decode(raw, lab=lab, dest=dest)
    except MalformedEnvelope as exc:
        assert type(exc) is MalformedEnvelope
        assert str(exc), "a refusal says why"
        return str(exc)
    pytest.fail(f"decode accepted {raw[:200]!r}")


def good() -> dict[str, Any]:
    """A valid packet (one envelope, one ack) as a JSON document, to spoil one field at a time."""
    doc = json.loads(encode(packet(KINDS["data"], KINDS["ack"])))
    assert decode(json.dumps(doc).encode(), lab=LAB, dest=PARENT)
    return doc


def dumps(doc: Any) -> str:
    return json.dumps(doc)


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip_of_each_kind(kind: str) -> None:
    sent = packet(KINDS[kind])
    got = decode(encode(sent), lab=LAB, dest=PARENT)
    assert got == sent
    assert type(got.messages[0]) is type(KINDS[kind])
    assert got.messages[0].kind == kind


def test_round_trip_of_a_packet_with_every_kind() -> None:
    sent = packet(*KINDS.values())
    got = decode(encode(sent), lab=LAB, dest=PARENT)
    assert got == sent
    assert [m.kind for m in got.messages] == list(KINDS)


@pytest.mark.parametrize("data_class", list(DataClass))
def test_round_trip_of_each_data_class(data_class: DataClass) -> None:
    sent = packet(envelope(data_class=data_class, payload={"class": data_class.value, "n": 1.5}))
    got = decode(encode(sent), lab=LAB, dest=PARENT)
    assert got == sent
    env = got.messages[0]
    assert isinstance(env, Envelope)
    assert env.data_class is data_class
    assert env.priority is priority_of(data_class)
    assert env.data_class.upward is (data_class in {DataClass.INVENTORY, DataClass.DISCOVERY,
                                                    DataClass.STATUS, DataClass.SCF})


def test_priorities() -> None:
    assert priority_of(DataClass.SCF) is Priority.HIGH
    assert priority_of(DataClass.SITE_CONTROL) is Priority.HIGH
    assert priority_of(DataClass.STATUS) is Priority.LOW
    assert priority_of(DataClass.PACKAGE) is Priority.NORMAL


@pytest.mark.parametrize("kinds", [["data"], ["ack"], ["data", "ack", "resend"], sorted(KINDS)])
def test_encode_parts_decodes_to_the_same_packet(kinds: list[str]) -> None:
    msgs = [KINDS[k] for k in kinds]
    body = encode_parts(LAB, CHILD, PARENT, [encode_message(m) for m in msgs])
    assert decode(body, lab=LAB, dest=PARENT) == packet(*msgs)
    assert json.loads(body) == json.loads(encode(packet(*msgs)))


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_an_envelope_that_can_be_built_can_be_delivered(value: float) -> None:
    try:
        sent = packet(envelope(payload={"x": value}))
    except ValueError:
        return  # refusing to build it is a fix too
    try:
        decode(encode(sent), lab=LAB, dest=PARENT)
    except MalformedEnvelope as exc:
        pytest.fail(f"built and encoded, then refused by the receiver: {exc}")


def test_content_hash_is_stable_and_order_free() -> None:
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 2})
    assert len(content_hash({})) == 16


def test_payload_survives_with_unicode_and_nesting() -> None:
    payload = {"name": "Zürich \u2603 \"quoted\" \\", "deep": {"x": [None, True, -1, 2.5e-3]}}
    sent = packet(envelope(payload=payload))
    got = decode(encode(sent), lab=LAB, dest=PARENT)
    assert got.messages[0].payload == payload  # type: ignore[union-attr]


# -- refusals ---------------------------------------------------------------------------------


def spoiled(path: tuple[Any, ...], value: Any = ..., *, delete: bool = False) -> str:
    """``good()`` with the value at ``path`` replaced (or deleted), as JSON."""
    doc = good()
    node: Any = doc
    for part in path[:-1]:
        node = node[part]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return dumps(doc)


REFUSALS = [
    # (id, body, words the reason must contain)
    ("not JSON", "hello, broker", ["JSON", "top level"]),
    ("truncated JSON", dumps(good())[:-5], ["JSON"]),
    ("random bytes", b"\xff\xfe\x00\x81garbage\x00", []),
    ("empty body", b"", []),
    ("a JSON list", "[1, 2, 3]", ["top level"]),
    ("a JSON string", '"packet"', ["top level"]),
    ("JSON null", "null", ["top level"]),
    ("packet schema version 2", spoiled(("v",), 2), ["at v"]),
    ("message schema version 0", spoiled(("messages", 0, "v"), 0), ["messages.0.data.v"]),
    ("unknown kind", spoiled(("messages", 1, "kind"), "gossip"), ["gossip", "messages.1"]),
    ("message without kind", spoiled(("messages", 1, "kind"), delete=True), ["kind", "messages.1"]),
    ("missing txn_id", spoiled(("messages", 0, "txn_id"), delete=True),
     ["required", "messages.0.data.txn_id"]),
    ("missing lab", spoiled(("lab",), delete=True), ["required", "at lab"]),
    ("extra packet field", spoiled(("colour",), "blue"), ["Extra", "colour"]),
    ("extra envelope field", spoiled(("messages", 0, "colour"), "blue"),
     ["Extra", "messages.0.data.colour"]),
    ("lower-case site code", spoiled(("source",), "pr1"), ["at source"]),
    ("four-letter site code", spoiled(("dest",), "CENT"), ["at dest"]),
    ("site code with a newline", spoiled(("dest",), "CEN\n"), ["at dest"]),
    ("bad origin in an envelope", spoiled(("messages", 0, "origin"), "x"),
     ["messages.0.data.origin"]),
    ("unknown data class", spoiled(("messages", 0, "data_class"), "secrets"),
     ["messages.0.data.data_class"]),
    ("link_seq 0", spoiled(("messages", 0, "link_seq"), 0), ["messages.0.data.link_seq"]),
    ("negative incarnation", spoiled(("messages", 1, "incarnation"), -1),
     ["messages.1.ack.incarnation"]),
    ("empty key", spoiled(("messages", 0, "key"), ""), ["messages.0.data.key"]),
    ("payload not an object", spoiled(("messages", 0, "payload"), [1]),
     ["messages.0.data.payload"]),
    ("messages not a list", spoiled(("messages",), {"kind": "ack"}), ["messages"]),
    ("empty messages list", spoiled(("messages",), []), ["messages"]),
    ("another lab", spoiled(("lab",), "other-lab"), ["other-lab", LAB]),
    ("another site", spoiled(("dest",), "PR2"), ["PR2", PARENT]),
    ("message from another source", spoiled(("messages", 1, "source"), "PR2"),
     ["ack", "PR2->CEN", f"{CHILD}->{PARENT}"]),
    ("message to another dest", spoiled(("messages", 0, "dest"), "PR2"),
     ["data", f"{CHILD}->PR2", f"{CHILD}->{PARENT}"]),
    ("content hash mismatch", spoiled(("messages", 0, "payload", "serial"), 6),
     ["content hash mismatch", "seq 7", f"{CHILD}->{PARENT}"]),
    ("hash of another payload", spoiled(("messages", 0, "hash"), content_hash({})),
     ["content hash mismatch"]),
]


@pytest.mark.parametrize(("body", "words"), [pytest.param(b, w, id=i) for i, b, w in REFUSALS])
def test_decode_refuses_with_what_and_where(body: bytes | str, words: list[str]) -> None:
    reason = refusal(body)
    for word in words:
        assert word in reason, f"{word!r} not in {reason!r}"


def test_refusal_counts_the_errors() -> None:
    doc = good()
    del doc["lab"]
    doc["source"] = "x"
    assert "(2 error(s))" in refusal(dumps(doc))


def test_first_of_many_messages_disagreeing_is_named() -> None:
    bad = envelope(source=CHILD, dest="PR2", link_seq=2)
    body = encode(Packet.model_construct(v=1, lab=LAB, source=CHILD, dest=PARENT,
                                         messages=[KINDS["ack"], bad]))
    assert "data says PR1->PR2" in refusal(body)


def test_wrong_destination_is_checked_after_the_schema() -> None:
    body = encode(packet())
    assert decode(body, lab=LAB, dest=PARENT)
    assert f"reached site {CHILD}" in refusal(body, dest=CHILD)
    assert "reached lab 'elsewhere'" in refusal(body, lab="elsewhere")


def test_malformed_envelope_is_a_remote_protocol_error_and_a_value_error() -> None:
    from emulator.errors import RemoteProtocolError

    assert issubclass(MalformedEnvelope, RemoteProtocolError)
    assert issubclass(MalformedEnvelope, ValueError)


# -- fuzzing ----------------------------------------------------------------------------------


def decode_or_refuse(body: bytes) -> Packet | None:
    try:
        return decode(body, lab=LAB, dest=PARENT)
    except MalformedEnvelope:
        return None  # anything else propagates and fails the test


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


finite_json = st.recursive(
    st.none() | st.booleans() | st.integers(-MAX_JSON_INT, MAX_JSON_INT) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(st.dictionaries(st.text(max_size=10), finite_json, max_size=5),
       st.integers(min_value=1, max_value=MAX_SEQ), st.text(min_size=1, max_size=200))
def test_fuzz_round_trip_of_any_payload(payload: dict[str, Any], seq: int, key: str) -> None:
    sent = packet(envelope(payload=payload, link_seq=seq, txn_id=seq, key=key))
    got = decode(encode(sent), lab=LAB, dest=PARENT)
    assert got == sent
    body = encode_parts(LAB, CHILD, PARENT, [encode_message(m) for m in sent.messages])
    assert decode(body, lab=LAB, dest=PARENT) == sent


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(body: bytes) -> None:
    decode_or_refuse(body)


@FUZZ
@given(json_values)
def test_fuzz_arbitrary_json(value: Any) -> None:
    assert decode_or_refuse(json.dumps(value).encode()) is None


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, child in node.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            out += _paths(child, (*prefix, i))
    return out


GOOD_ALL = json.loads(encode(packet(*KINDS.values())))
GOOD_PATHS = _paths(GOOD_ALL)


@FUZZ
@given(st.sampled_from(GOOD_PATHS), json_values, st.booleans())
def test_fuzz_one_spoiled_field(path: tuple[Any, ...], value: Any, delete: bool) -> None:
    """A valid packet of every kind with one field replaced by any JSON, or deleted."""
    doc = copy.deepcopy(GOOD_ALL)
    node: Any = doc
    for part in path[:-1]:
        node = node[part]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    got = decode_or_refuse(json.dumps(doc).encode())
    if got is not None:  # whatever got through is a whole, consistent packet
        assert got.lab == LAB and got.dest == PARENT and got.messages
        for msg in got.messages:
            assert (msg.source, msg.dest) == (got.source, got.dest)
            if isinstance(msg, Envelope):
                assert msg.hash == content_hash(msg.payload)


@FUZZ
@given(st.binary(min_size=1, max_size=8), st.integers(min_value=0, max_value=400))
def test_fuzz_corrupted_bytes_of_a_valid_packet(junk: bytes, at: int) -> None:
    body = encode(packet(*KINDS.values()))
    at = at % len(body)
    decode_or_refuse(body[:at] + junk + body[at + len(junk):])


@pytest.mark.parametrize("depth", [100, 5000])
def test_deeply_nested_payload_never_crashes(depth: int) -> None:
    doc = good()
    doc["messages"][0]["payload"] = {"deep": "HOLE"}
    text = dumps(doc).replace('"HOLE"', "[" * depth + "0" + "]" * depth)
    decode_or_refuse(text.encode())


@given(payload=st.dictionaries(st.text(max_size=5), st.integers(-2**63, 2**63 - 1) | st.text(max_size=8)
                               | st.booleans() | st.none(), max_size=5),
       cls=st.sampled_from(list(wire.DataClass)))
def test_the_fast_envelope_encoder_gives_the_message_the_model_gives(payload: dict[str, Any], cls: wire.DataClass) -> None:
    fields: dict[str, Any] = {"source": "P01", "dest": "CEN", "incarnation": 2, "origin": "S01", "data_class": cls,
                              "key": "k-1", "txn_id": 9, "link_seq": 4, "op": "delete"}
    digest = wire.content_hash(payload)
    fast = wire.encode_envelope(**fields, hash_=digest, payload=payload)
    model = wire.Envelope(**fields, priority=wire.priority_of(cls), hash=digest, payload=payload)
    assert json.loads(fast) == json.loads(wire.encode_message(model))
    body = wire.encode_parts("lab-1", "P01", "CEN", [fast])
    assert wire.decode(body, lab="lab-1", dest="CEN").messages == [model]


# -- strict input: types, bounds, sizes, nesting (issue 10) ------------------------------------

STRICT = [
    # (message index, field, value): each refused, whatever decoding in lax mode would make of it
    (0, "link_seq", True),  # hardened mode read `true` as seq 1 and quarantined the real child
    (0, "link_seq", "7"),
    (0, "link_seq", 7.0),
    (0, "txn_id", 2**62),  # poisoned the watermark: every later report was stale
    (0, "txn_id", wire.MAX_SEQ + 1),
    (0, "incarnation", False),
    (0, "incarnation", wire.MAX_INCARNATION + 1),
    (0, "hash", "not-a-hash"),
    (1, "through", 2**62),  # a forged ack far past anything sent
    (1, "through", True),
    (1, "sent_through", "3"),
]


@pytest.mark.parametrize("index, field, value", STRICT, ids=[f"{f}={v!r}" for _, f, v in STRICT])
def test_strict_types_and_bounds(index: int, field: str, value: Any) -> None:
    doc = good()
    doc["messages"][index][field] = value
    assert field in refusal(dumps(doc))


@pytest.mark.parametrize("field, value", [("next_send_seq", True), ("txn_id", 2**62), ("recovery_id", "x" * 65),
                                          ("recovery_id", "a b")])
def test_strict_recovery_messages(field: str, value: Any) -> None:
    doc = json.loads(encode(packet(KINDS["recovery_announce"])))
    doc["messages"][0][field] = value
    assert field in refusal(dumps(doc))


def test_a_report_with_a_huge_serial_is_refused() -> None:
    doc = json.loads(encode(packet(KINDS["recovery_report"])))
    doc["messages"][0]["scf_serial"] = 2**62
    assert "scf_serial" in refusal(dumps(doc))


def test_the_bounds_themselves_are_accepted() -> None:
    sent = packet(envelope(link_seq=wire.MAX_SEQ, txn_id=wire.MAX_SEQ, incarnation=wire.MAX_INCARNATION))
    assert decode(encode(sent), lab=LAB, dest=PARENT) == sent


def test_a_packet_too_big_is_refused_before_it_is_parsed() -> None:
    body = b'{"v":1,' + b" " * wire.MAX_PACKET_BYTES + b"}"
    assert "bytes" in refusal(body)


def test_a_payload_too_big_is_refused() -> None:
    sent = packet(envelope(payload={"blob": "x" * (wire.MAX_PAYLOAD_BYTES + 1)}))
    assert "payload of" in refusal(encode(sent))
    small = packet(envelope(payload={"blob": "x" * (wire.MAX_PAYLOAD_BYTES - 100)}))
    assert decode(encode(small), lab=LAB, dest=PARENT) == small


def test_a_payload_nested_too_deep_is_refused() -> None:
    deep: Any = 0
    for _ in range(wire.MAX_DEPTH):
        deep = [deep]
    assert "nested" in refusal(encode(packet(envelope(payload={"d": deep}))))
    ok = deep[0]
    sent = packet(envelope(payload={"d": ok}))
    assert decode(encode(sent), lab=LAB, dest=PARENT) == sent


def test_a_payload_integer_beyond_64_bits_is_refused() -> None:
    doc = good()
    doc["messages"][0]["payload"] = {"n": 2**70}
    doc["messages"][0]["hash"] = content_hash({"n": 2**70})
    assert "64 bits" in refusal(dumps(doc))


def test_a_reported_object_nested_too_deep_is_refused() -> None:
    deep: Any = 0
    for _ in range(wire.MAX_DEPTH + 1):
        deep = {"x": deep}
    doc = json.loads(encode(packet(KINDS["recovery_report"])))
    doc["messages"][0]["objects"] = [deep]
    assert "nested" in refusal(dumps(doc))


def _bounded_reference(value: Any, max_depth: int) -> bool:
    """The rule of ``bounded``, written plainly: within ``max_depth`` levels, integers within 64
    bits, every number finite."""
    def ok(item: Any, depth: int) -> bool:
        if isinstance(item, dict | list):
            children = item.values() if isinstance(item, dict) else item
            return depth <= max_depth and all(ok(c, depth + 1) for c in children)
        if isinstance(item, bool) or item is None or isinstance(item, str):
            return True
        if isinstance(item, int):
            return -2**63 <= item <= 2**63 - 1
        return not isinstance(item, float) or not (math.isnan(item) or math.isinf(item))
    return ok(value, 1)


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.text(max_size=3) | st.floats() | st.integers(-2**65, 2**65)
    | st.sampled_from([2**63 - 1, 2**63, -2**63, -2**63 - 1]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3),
    max_leaves=25)


@given(_JSONISH, st.integers(1, 6))
def test_bounded_says_what_the_plain_rule_says(value: Any, max_depth: int) -> None:
    assert (wire.bounded(value, max_depth) is None) == _bounded_reference(value, max_depth)
