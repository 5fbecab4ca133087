"""Hardened mode's end-to-end signatures on the real broker with real site processes (issue 10,
item 2): keys pinned as sites attach, a recovered site's new key pinned above it, and the
Preinst key verbs re-pinning by hand."""

from __future__ import annotations

import json

import pytest

from emulator.protocol.signing import fingerprint
from emulator.testing import Lab, wait_for
from tests.integration.test_recovery import kill, status_ids, traffic, up

pytestmark = pytest.mark.integration


def pins(lab: Lab, site: str) -> dict[str, tuple[int, str]]:
    return {s: (inc, fingerprint(pub)) for s, inc, pub in lab.query(site, "SELECT site, inc, pub FROM site_keys")}


def test_keys_are_pinned_as_sites_attach_renewed_by_a_recovery_and_re_pinned_by_hand(lab: Lab) -> None:
    up(lab, mode="hardened")
    traffic(lab, "CEN", "P01", 10)
    wait_for("CEN to pin every site's key", lambda: set(pins(lab, "CEN")) >= {"P01", "P02", "S01", "S02"}, timeout=60)

    # the Preinst verbs: S01's key handed to every site above it, CEN's to every site below
    done = json.loads(lab.cli("keyforparent", "S01", "--json").stdout)
    assert done["pinned_at"] == ["P01", "CEN"] and done["inc"] == 1
    assert pins(lab, "CEN")["S01"] == pins(lab, "P01")["S01"] == (1, done["fingerprint"])
    down = json.loads(lab.cli("keyforchild", "CEN", "--json").stdout)
    assert sorted(down["pinned_at"]) == ["P01", "P02", "S01", "S02"]
    assert all(pins(lab, s)["CEN"] == (1, down["fingerprint"]) for s in down["pinned_at"])
    refused = lab.cli("keyforparent", "CEN", check=False)
    assert refused.returncode == 2 and "central site" in refused.stderr
    refused = lab.cli("keyforchild", "S02", check=False)
    assert refused.returncode == 2 and "no child sites" in refused.stderr

    # a recovery from a backup: a new incarnation, a new key, pinned above it
    backup_id = lab.cli("backup", "P01").stdout.strip()
    before = pins(lab, "CEN")["P01"]
    traffic(lab, "CEN", "P01", 10)
    kill(lab, "P01")
    lab.cli("recover", "P01", "--backup", backup_id)
    wait_for("CEN to pin P01's new key", lambda: pins(lab, "CEN")["P01"][0] == 2, timeout=60)
    assert pins(lab, "CEN")["P01"][1] != before[1]
    assert 5210 in status_ids(lab, "CEN")  # the key of P01 changed, said at CEN
    assert lab.cli("wait-converged", "--timeout", "90", check=False).returncode == 0
    assert lab.cli("check", check=False).returncode == 0
