"""Broker-level faults applied from outside a site (the site does not know about them)."""

from __future__ import annotations

import re
import shutil
import subprocess

from broker import names
from emulator.errors import LabError


def _rabbitmqctl(*args: str) -> str:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise LabError("rabbitmqctl is not on PATH", hint="broker faults need the broker's own CLI on this host")
    done = subprocess.run([exe, "-q", *args], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise LabError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def close_site_connection(lab: str, site: str, reason: str = "smslab fault: connection closed") -> int:
    """Close every broker connection of one site (``rabbitmqctl close_connection``)."""
    wanted = names.connection_name(lab, site)
    closed = 0
    for line in _rabbitmqctl("list_connections", "pid", "client_properties").splitlines():
        pid, _, props = line.partition("\t")
        if re.search(r'\{"connection_name","' + re.escape(wanted) + r'"\}', props):
            _rabbitmqctl("close_connection", pid.strip(), reason)
            closed += 1
    if closed == 0:
        raise LabError(f"site {site} of lab {lab} has no broker connection to close")
    return closed
