"""--json on the commands that act on a lab's sites, as a script runs them: stdout is one JSON
document with what was done (pids, ids, counts), the progress goes to stderr."""

from __future__ import annotations

import json
from typing import Any

import pytest

from emulator.testing import Lab, topology_yaml

pytestmark = pytest.mark.integration

SITES = [{"code": "CEN", "type": "central", "clients": 0}, {"code": "P01", "type": "primary", "parent": "CEN"}]


def as_json(lab: Lab, *args: str) -> Any:
    done = lab.cli(*args, "--json")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"smslab {' '.join(args)} --json printed no JSON: {done.stdout!r}") from exc


def test_the_site_commands_print_json(lab: Lab) -> None:
    lab.up(topology_yaml(SITES, lab="js"))
    killed = as_json(lab, "kill", "P01")
    assert killed["site"] == "P01" and killed["action"] == "kill" and killed["pid"] > 0
    started = as_json(lab, "start", "P01")
    assert started["site"] == "P01" and started["pid"] not in (None, killed["pid"])
    assert as_json(lab, "restart", "P01")["action"] == "restart"
    paused = as_json(lab, "pause", "P01")
    assert paused["kind"] == "pause" and paused["site"] == "P01" and paused["id"]
    assert as_json(lab, "resume", "P01") == {"site": "P01", "resumed": [paused["id"]]}
    assert as_json(lab, "workload", "pause") == {"action": "pause", "sites": ["CEN", "P01"]}
    assert as_json(lab, "syncchild", "CEN", "P01")["sent"] >= 0
    assert as_json(lab, "syncparent", "P01")["site"] == "P01"
    assert as_json(lab, "deljob", "P01", "CEN")["deleted"] >= 0
    stopped = as_json(lab, "stop", "P01")
    assert stopped["action"] == "stop"
    down = as_json(lab, "down", "--keep")
    assert down["lab"] == lab.lab_id and down["kept"] is True
