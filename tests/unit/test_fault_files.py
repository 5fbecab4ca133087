"""Faults as lab state on disk, without a broker: a fault file that does not read back is never
hidden (listed as damaged, healed by ``heal`` and ``down``), a value JSON cannot hold is refused
before anything changes, ``--for`` counts from when the fault took effect, and a disconnect
refuses the site's reconnects at the broker (per-site identities) until it is healed."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from broker import admin, names, relay
from emulator import faults, history, orchestrator
from emulator.cli import build_parser
from emulator.errors import ConfigError
from emulator.lab import LabDir, LabInfo
from emulator.topology import parse_topology

TOPOLOGY = parse_topology("""
lab: ff
sites:
  - {code: CEN, type: central, clients: 0}
  - {code: P01, type: primary, parent: CEN}
  - {code: S01, type: secondary, parent: P01}
""")


def lab(tmp_path: Path, identities: str = "unauthenticated") -> tuple[LabDir, LabInfo]:
    lab_dir = LabDir(tmp_path / "lab")
    info = LabInfo(lab_id="ff-1", amqp_urls=["amqp://127.0.0.1:1"], created=0.0, topology=TOPOLOGY,
                   identities=identities)  # type: ignore[arg-type]
    lab_dir.save(info)
    return lab_dir, info


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The links healing binds back to their inboxes (no broker: recorded)."""
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(admin, "restore_link", lambda _url, _lab, s, r: calls.append((s, r)))
    monkeypatch.setattr(relay, "drain", lambda *_a, **_k: 0)
    return calls


def spec(fault_id: str, links: list[tuple[str, str]], **params: float) -> faults.FaultSpec:
    return faults.FaultSpec(id=fault_id, kind="delay", target=f"{links[0][0]}<->{links[0][1]}", links=links,
                            seed=1, params=params, since=time.time(), state="on")


def test_a_fault_file_that_does_not_read_back_is_listed_as_damaged_and_healed(
        tmp_path: Path, restored: list[tuple[str, str]]) -> None:
    lab_dir, info = lab(tmp_path)
    faults.save(lab_dir, spec("f1", [("S01", "P01")], ms=100))
    damaged = json.loads(spec("f2", [("P01", "CEN"), ("CEN", "P01")], ms=100).model_dump_json())
    damaged["params"]["ms"] = None  # what a NaN became in JSON before such values were refused
    (lab_dir.faults_dir() / "f2.json").write_text(json.dumps(damaged))
    (lab_dir.faults_dir() / "f3.json").write_text("{ not json")  # names nothing it held

    on = {f.id: f for f in faults.active(lab_dir)}
    assert set(on) == {"f1", "f2", "f3"}
    assert on["f1"].damaged is None and on["f1"].state == "on"
    assert on["f2"].state == "damaged" and "ms" in (on["f2"].damaged or "")
    assert on["f2"].links == [("P01", "CEN"), ("CEN", "P01")] and on["f2"].seed == 1
    assert on["f3"].state == "damaged" and on["f3"].links == []
    rows = {r["id"]: r for r in faults.listing(lab_dir)}
    assert rows["f2"]["state"] == "damaged" and "damaged fault file" in rows["f2"]["description"]
    assert faults.diverted_links(lab_dir) >= {("P01", "CEN"), ("CEN", "P01"), ("S01", "P01")}

    assert faults.heal(lab_dir, info, "f2") is not None
    assert restored == [("P01", "CEN"), ("CEN", "P01")]
    restored.clear()
    faults.heal(lab_dir, info, "f3")  # every link no readable fault holds goes back to its inbox
    assert sorted(restored) == [("CEN", "P01"), ("P01", "CEN"), ("P01", "S01")]
    assert [f.id for f in faults.active(lab_dir)] == ["f1"]
    off = [e.fault for e in history.load(lab_dir, info) if e.kind == "fault_off"]
    assert off == ["f2", "f3"]


def test_down_heals_a_damaged_fault_too(tmp_path: Path, restored: list[tuple[str, str]]) -> None:
    lab_dir, info = lab(tmp_path)
    (lab_dir.faults_dir()).mkdir(parents=True, exist_ok=True)
    (lab_dir.faults_dir() / "f1.json").write_text('{"id": "f1", "kind": "partition", "links": [["P01", "CEN"]]')
    healed = faults.heal_all(lab_dir, info)
    assert [f.id for f in healed] == ["f1"] and faults.active(lab_dir) == []
    assert ("P01", "CEN") in restored


@pytest.mark.parametrize("kind, params", [
    ("delay", {"ms": math.nan}), ("delay", {"ms": math.inf}), ("delay", {"ms": 100, "jitter": math.inf}),
    ("delay", {"ms": 4e6}), ("reorder", {"max_hold": math.inf}), ("reorder", {"max_hold": 0}),
    ("drop", {"rate": math.nan}),
])
def test_a_value_json_cannot_hold_is_refused_before_anything_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, params: dict[str, float]) -> None:
    lab_dir, info = lab(tmp_path)
    monkeypatch.setattr(admin, "divert_link", lambda *_a, **_k: pytest.fail("the link was diverted"))
    monkeypatch.setattr(orchestrator, "ensure_daemon", lambda *_a, **_k: None)
    with pytest.raises(ConfigError):
        faults.apply_link_fault(lab_dir, info, kind, "P01", "CEN", params=params)
    assert faults.active(lab_dir) == []
    with pytest.raises(ValidationError):  # and the model would not take one either
        faults.FaultSpec(id="f1", kind="delay", target="x", seed=1, params={"ms": math.nan}, since=0.0)


@pytest.mark.parametrize("argv", [
    ["fault", "delay", "P01", "CEN", "--ms", "inf"], ["fault", "delay", "P01", "CEN", "--ms", "nan"],
    ["fault", "delay", "P01", "CEN", "--ms", "10", "--jitter", "-1"],
    ["fault", "partition", "P01", "CEN", "--for", "inf"], ["fault", "partition", "P01", "CEN", "--verify", "nan"],
    ["fault", "reorder", "P01", "CEN", "--window", "0"], ["fault", "reorder", "P01", "CEN", "--max-hold", "inf"],
    ["fault", "alarm", "--for", "inf"], ["history", "--limit", "-3"], ["history", "--limit", "0"],
])
def test_the_cli_refuses_numbers_that_make_no_fault(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert "error: argument" in capsys.readouterr().err


class FakeControl:
    """A broker control that records what the fault asked of it."""

    def __init__(self, slow: float = 0.0) -> None:
        self.calls: list[tuple[str, str]] = []
        self.slow = slow
        self.closed_at = 0.0

    def describe(self) -> str:
        return "a fake broker"

    def refuse_user(self, user: str) -> None:
        self.calls.append(("refuse", user))

    def allow_user(self, user: str) -> None:
        self.calls.append(("allow", user))

    def close_connections(self, name: str, reason: str) -> int:
        time.sleep(self.slow)  # rabbitmqctl takes seconds on a busy host
        self.calls.append(("close", name))
        self.closed_at = time.time()
        return 1


@pytest.mark.parametrize("identities", ["per-site", "unauthenticated"])
def test_a_disconnect_refuses_the_site_s_reconnects_at_the_broker_until_healed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, identities: str) -> None:
    lab_dir, info = lab(tmp_path, identities)
    control = FakeControl(slow=0.3)
    monkeypatch.setattr(faults, "control_for", lambda *_a: control)
    monkeypatch.setattr(orchestrator, "ensure_daemon", lambda *_a, **_k: None)
    fault = faults.apply_disconnect(lab_dir, info, "P01", for_s=5)
    user = names.broker_user(info.lab_id, "P01")
    conn = names.connection_name(info.lab_id, "P01")
    if identities == "per-site":  # refused first: no reconnect slips in before the close
        assert control.calls == [("refuse", user), ("close", conn)]
    else:
        assert control.calls == [("close", conn)]
    (on,) = faults.active(lab_dir)
    assert on.until is not None and on.until >= control.closed_at + 5, "--for counts from the effect"
    faults.heal(lab_dir, info, fault.id)
    assert control.calls[-1] == (("allow", user) if identities == "per-site" else ("close", conn))
    assert faults.active(lab_dir) == []


def test_the_for_of_any_fault_counts_from_when_it_took_effect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab_dir, info = lab(tmp_path)

    def slow_divert(*_a: Any, **_k: Any) -> None:
        time.sleep(0.3)

    monkeypatch.setattr(admin, "divert_link", slow_divert)
    monkeypatch.setattr(orchestrator, "ensure_daemon", lambda *_a, **_k: None)
    monkeypatch.setattr(faults, "_verify_link_fault", lambda *_a, **_k: None)
    before = time.time()
    faults.apply_link_fault(lab_dir, info, "partition", "P01", "CEN", for_s=10)
    (on,) = faults.active(lab_dir)
    assert on.until is not None and on.until >= before + 0.6 + 10 - 0.05  # two links diverted first


def test_heal_all_heals_the_broker_s_faults_before_the_links_so_the_relays_can_drain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab_dir, info = lab(tmp_path)
    faults.save(lab_dir, spec("f1", [("P01", "CEN")], ms=100))
    faults.save(lab_dir, faults.FaultSpec(id="f2", kind="alarm", target="broker", seed=1, since=time.time() + 1,
                                          params={"watermark": 0.4}, state="on"))
    order: list[str] = []
    monkeypatch.setattr(faults, "heal", lambda _d, _i, fault_id, **_k: order.append(fault_id))
    faults.heal_all(lab_dir, info)
    assert order == ["f2", "f1"]  # the alarm (newer) first: it would block the relay's forwarding


def test_a_heal_does_not_race_a_live_daemon_that_is_slow_to_drain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restored: list[tuple[str, str]]) -> None:
    lab_dir, info = lab(tmp_path)
    faults.save(lab_dir, spec("f1", [("P01", "CEN")], ms=100))
    faults.save_stats(lab_dir, "f1", faults.FaultStats())  # the daemon runs its relays
    monkeypatch.setattr(LabDir, "daemon_pid", lambda _self: 12345)
    monkeypatch.setattr(relay, "drain", lambda *_a, **_k: pytest.fail("drained under the daemon's feet"))
    said: list[str] = []
    faults.heal(lab_dir, info, "f1", wait_drain=0.3, progress=said.append)
    assert restored == [("P01", "CEN")] and faults.active(lab_dir) == []
    assert any("goes on draining" in line for line in said)
