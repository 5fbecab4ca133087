"""Helpers for tests that run real labs: a broker URL, a lab handle, waiting on conditions.

Used by smslab's own tests; the pytest plugin of a later release builds on the same pieces.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml

from broker import admin, urls
from emulator import checker, identities, orchestrator
from emulator.errors import LabError
from emulator.lab import BrokerRef, LabDir, LabInfo
from sites.store import read_only

T = TypeVar("T")


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.1) -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


FAST_SETTINGS = {"sync_interval": 0.3, "resend_after": 1.0}


def topology_yaml(sites: list[dict[str, Any]], *, lab: str = "t", mode: str = "sms20",
                  clients: int = 2, workload: dict[str, float] | None = None,
                  settings: dict[str, Any] | None = None) -> str:
    doc = {
        "lab": lab, "mode": mode,
        "defaults": {"clients": clients, "workload": workload or {
            "inventory_interval": 0.5, "discovery_interval": 2.0, "status_interval": 2.0,
            "object_interval": 1.0, "scf_interval": 3.0}},
        "settings": {**FAST_SETTINGS, **(settings or {})},
        "sites": sites,
    }
    return yaml.safe_dump(doc, sort_keys=False)


DEMO_SITES = [
    {"code": "CEN", "type": "central", "clients": 0},
    {"code": "P01", "type": "primary", "parent": "CEN"},
    {"code": "P02", "type": "primary", "parent": "CEN"},
    {"code": "S01", "type": "secondary", "parent": "P01"},
    {"code": "S02", "type": "secondary", "parent": "P02"},
]


class Lab:
    """A lab brought up for a test, with the operations tests need."""

    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        self.url = url
        self.dir = LabDir(root / "lab")
        self.info: LabInfo | None = None

    # lifetime
    def up(self, topology_text: str, timeout: float = 60.0, broker: BrokerRef | None = None,
           netns: Sequence[str] = ()) -> LabInfo:
        path = self.root / "topology.yaml"
        path.write_text(topology_text)
        self.info = orchestrator.up(path, self.dir, self.url, timeout=timeout, broker=broker, netns=netns)
        return self.info

    def down(self) -> None:
        if self.dir.exists():
            orchestrator.down(self.dir, keep=True)

    @property
    def lab_id(self) -> str:
        assert self.info is not None
        return self.info.lab_id

    # the CLI, as a user runs it
    def cli(self, *args: str, check: bool = True, timeout: float = 180,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, SMSLAB_AMQP_URL=self.url, **(env or {}))
        done = subprocess.run(
            [sys.executable, "-m", "emulator", "--lab", str(self.dir.path), *args],
            capture_output=True, text=True, timeout=timeout, env=env, check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"smslab {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def control(self, site: str, cmd: dict[str, Any], timeout: float = 10.0,
                request_id: str | None = None) -> dict[str, Any]:
        url = self.info.amqp_url if self.info is not None else self.url  # the controller, with identities
        return admin.control_request(url, self.lab_id, site, cmd, timeout=timeout, request_id=request_id)

    def answer(self, site: str, cmd: dict[str, Any], timeout: float = 2.0) -> dict[str, Any] | None:
        """What ``control`` answers, or None when the site does not answer within ``timeout``
        (it is reconnecting, restarting, paused): for polling with ``wait_for``."""
        try:
            return self.control(site, cmd, timeout=timeout)
        except LabError:
            return None

    def site_url(self, code: str) -> str:
        """The broker URL logged in as site ``code`` (its own identity), or the lab's URL when
        the lab is unauthenticated: a client holding that site's credentials."""
        assert self.info is not None
        login = identities.site_login(self.dir, self.info, code)
        return urls.with_login(self.info.admin_url, *login) if login else self.url

    # reading site stores
    @contextmanager
    def db(self, site: str) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(f"file:{self.dir.site_db(site)}?mode=ro", uri=True, timeout=10)
        try:
            yield conn
        finally:
            conn.close()

    def query(self, site: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.db(site) as conn:
            return conn.execute(sql, args).fetchall()

    def link(self, site: str, peer: str) -> dict[str, Any]:
        with read_only(self.dir.site_db(site)) as store:
            link = store.load_links().get(peer) if store else None
            return link.to_row() if link else {}

    def meta(self, site: str, key: str) -> str | None:
        with read_only(self.dir.site_db(site)) as store:
            return store.get_meta(key) if store else None

    def status(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = json.loads(self.cli("status", "--json").stdout)
        return snapshot

    def link_health(self, parent: str, child: str) -> str:
        for link in self.status()["links"]:
            if (link["parent"], link["child"]) == (parent, child):
                return str(link["health"])
        raise KeyError((parent, child))

    def check(self) -> checker.Report:
        return checker.check(self.dir)

    def pause(self) -> None:
        assert self.info is not None
        for code in self.info.topology.depth_order():
            if self.dir.pid(code):
                self.control(code, {"cmd": "pause-workload"})

    def wait_converged(self, timeout: float = 60.0) -> checker.Report:
        self.pause()
        deadline = time.monotonic() + timeout
        while True:
            report = checker.check(self.dir, with_history=False)
            if report.verdict == "valid":
                report = self.check()
            if report.verdict == "valid":
                return report
            if time.monotonic() > deadline:
                raise AssertionError(f"the lab did not converge in {timeout:.0f}s:\n{report.render()}")
            time.sleep(0.3)
