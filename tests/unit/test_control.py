"""Control commands are validated before a site acts on them: typed, bounded, nothing extra."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.protocol import control as ctl


def parse(obj: object) -> ctl.Command:
    return ctl.parse(json.dumps(obj).encode())


def test_good_commands_parse_to_their_models() -> None:
    burst = parse({"cmd": "burst", "count": 10, "keys": 5})
    assert isinstance(burst, ctl.Burst) and (burst.count, burst.keys, burst.chunk) == (10, 5, 1000)
    assert isinstance(parse({"cmd": "create", "kind": "package", "name": "Office"}), ctl.Create)
    assert isinstance(parse({"cmd": "delsite", "site": "S01", "parent": "P01"}), ctl.DelSite)
    assert ctl.parse(ctl.encode(ctl.SyncParent(cmd="syncparent"))) == ctl.SyncParent(cmd="syncparent")


@pytest.mark.parametrize("obj, where", [
    ({"cmd": "burst", "count": 10, "keys": 0}, "keys"),
    ({"cmd": "burst", "count": 10, "chunk": 0}, "chunk"),
    ({"cmd": "burst", "count": 10**12}, "count"),
    ({"cmd": "burst", "count": True}, "count"),
    ({"cmd": "burst", "count": "10"}, "count"),
    ({"cmd": "create", "kind": "package", "name": ""}, "name"),
    ({"cmd": "create", "kind": "package", "extra": 1}, "extra"),
    ({"cmd": "update", "id": "nope"}, "id"),
    ({"cmd": "syncchild", "child": "s01"}, "child"),
    ({"cmd": "nope"}, "cmd"),
    ({"no": "cmd"}, "cmd"),
])
def test_bad_commands_are_refused_saying_where(obj: object, where: str) -> None:
    with pytest.raises(ctl.MalformedCommand, match=where):
        parse(obj)


def test_not_json_or_too_deep_is_one_clear_error() -> None:
    with pytest.raises(ctl.MalformedCommand, match="malformed control command"):
        ctl.parse(b"\xff\xfe")
    with pytest.raises(ctl.MalformedCommand, match="recursion limit"):
        ctl.parse(b'{"cmd": "ping", "x": ' + b"[" * 10000 + b"]" * 10000 + b"}")


def test_a_command_too_big_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(ctl.MalformedCommand, match="bytes, more than"):
        ctl.parse(b'{"cmd": "ping", "x": "' + b"x" * ctl.MAX_COMMAND_BYTES + b'"}')


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
).map(lambda v: json.dumps({"cmd": "burst", "count": v}).encode()))
def test_nothing_but_malformed_command_ever_comes_out(body: bytes) -> None:
    try:
        ctl.parse(body)
    except ctl.MalformedCommand:
        pass
