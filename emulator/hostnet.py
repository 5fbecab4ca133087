"""Sites on hosts of their own, and network faults that cut a host or a broker node off.

Theory of operation
-------------------
A *site host* is a Linux network namespace this module made for one site of one lab, joined to
this host by a veth pair: the host end holds ``10.231.A.B+1/30``, the namespace end
``10.231.A.B+2/30`` (one /30 of 10.231.0.0/16 per site, chosen free under a host-wide lock, so
parallel labs never share one). The site process runs inside it (``ip netns exec NS python -m
sites ...``) and reaches the brokers over its own interface: its broker URLs on 127.0.0.1 are
rewritten to the host end's address, so the brokers must listen there too (a local cluster
started with ``--listen 0.0.0.0``). What a lab made is kept in ``DIR/hosts/CODE.json`` before
it is made, so ``down`` (and a failed ``up``) deletes all of it; names carry the lab id
(namespace ``smslab-LABID-code``, veth ``sHASH..``) so two labs never meet.

``isolate``: the namespace end of the veth goes down. The site's connections stall, its
reconnects fail at once (no route), the broker drops it after the heartbeat timeout; the site
itself is not touched. ``reconnect`` sets the link up again (the /30 is on the link: no route to
restore).

A *broker partition* of a local cluster's node is a chain of iptables rules (``SMSLAB-HASH``,
jumped to from OUTPUT: loopback traffic passes there) that rejects, with a TCP reset, the
Erlang distribution traffic between that node and each other node: the node's own connections
leave from its own loopback address (``LocalNode.dist_source``) and the peers' come to its
distribution port. AMQP, epmd and rabbitmqctl are not cut: clients of the cut node find it
paused (``pause_minority``) and fail over. Deleting the chain heals it.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, ValidationError

from emulator.errors import ConfigError, LabError
from emulator.lab import LabDir

SUBNET = ipaddress.IPv4Network("10.231.0.0/16")
LOCK_FILE = Path("/run/lock/smslab-hostnet.lock")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class SiteHost(BaseModel):
    """One site's namespace and its link to this host."""

    model_config = ConfigDict(extra="forbid")

    site: str
    netns: str
    veth_host: str
    veth_ns: str
    host_address: str  # the host end: where the site finds the brokers
    ns_address: str  # the site's own address


# -- what is needed ------------------------------------------------------------------------------


def missing(tools: Sequence[str] = ("ip",)) -> str | None:
    """Why network namespaces (and ``tools``) cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces and firewall rules need root (this process is not)"
    lacking = [t for t in tools if shutil.which(t) is None]
    if lacking:
        return f"{', '.join(lacking)} not found (apt-get install iproute2 iptables)"
    return None


def _require(tools: Sequence[str] = ("ip",)) -> None:
    why = missing(tools)
    if why:
        raise LabError(f"cannot make network namespaces here: {why}",
                       hint="run as root on Linux with iproute2, or leave the sites on this host's network")


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)}: {exc}") from exc
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()[:300]}")
    return done


# -- site hosts --------------------------------------------------------------------------------------


def hosts_dir(lab_dir: LabDir) -> Path:
    return lab_dir.path / "hosts"


def _host_file(lab_dir: LabDir, code: str) -> Path:
    return hosts_dir(lab_dir) / f"{code}.json"


def host_of(lab_dir: LabDir, code: str) -> SiteHost | None:
    """The namespace the site runs in, None if it runs on this host's network."""
    try:
        return SiteHost.model_validate_json(_host_file(lab_dir, code).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:
        raise LabError(f"{_host_file(lab_dir, code)}: not a site host description: {exc}",
                       hint="smslab down deletes the lab's namespaces") from exc


def hosts(lab_dir: LabDir) -> list[SiteHost]:
    folder = hosts_dir(lab_dir)
    if not folder.exists():
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        found = host_of(lab_dir, path.stem)
        if found is not None:
            out.append(found)
    return out


def names_for(lab_id: str, code: str, index: int) -> tuple[str, str, str]:
    """(namespace, host veth, namespace veth) of a site: lab-unique, veth names within 15 chars."""
    tag = hashlib.blake2b(lab_id.encode(), digest_size=4).hexdigest()
    return f"smslab-{lab_id}-{code.lower()}", f"s{tag}{index:02d}h", f"s{tag}{index:02d}n"


def _used_addresses() -> set[ipaddress.IPv4Address]:
    out = _run(["ip", "-4", "-o", "addr", "show"]).stdout
    used = set()
    for line in out.split("\n"):
        parts = line.split()
        if "inet" in parts:
            address = ipaddress.ip_interface(parts[parts.index("inet") + 1]).ip
            if isinstance(address, ipaddress.IPv4Address) and address in SUBNET:
                used.add(address)
    return used


def _free_block(used: set[ipaddress.IPv4Address]) -> ipaddress.IPv4Network:
    for block in SUBNET.subnets(new_prefix=30):
        if not any(a in block for a in used):
            return block
    raise LabError(f"no free /30 left in {SUBNET} on this host", hint="smslab down the labs you no longer need")


def create_hosts(lab_dir: LabDir, lab_id: str, codes: Iterable[str], order: Sequence[str]) -> list[SiteHost]:
    """A namespace for each site of ``codes``, linked to this host; recorded before it is made."""
    _require()
    made = []
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two labs never take one /30
        try:
            for code in codes:
                if host_of(lab_dir, code) is not None:
                    continue
                block = _free_block(_used_addresses())
                netns, veth_host, veth_ns = names_for(lab_id, code, order.index(code))
                host = SiteHost(site=code, netns=netns, veth_host=veth_host, veth_ns=veth_ns,
                                host_address=str(block[1]), ns_address=str(block[2]))
                path = _host_file(lab_dir, code)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(host.model_dump_json(indent=2))  # first: down deletes whatever follows
                _make(host, block.prefixlen)
                made.append(host)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return made


def _make(host: SiteHost, prefix: int) -> None:
    ns = host.netns
    _run(["ip", "netns", "add", ns])
    _run(["ip", "link", "add", host.veth_host, "type", "veth", "peer", "name", host.veth_ns, "netns", ns])
    _run(["ip", "addr", "add", f"{host.host_address}/{prefix}", "dev", host.veth_host])
    _run(["ip", "link", "set", host.veth_host, "up"])
    _run(["ip", "-n", ns, "addr", "add", f"{host.ns_address}/{prefix}", "dev", host.veth_ns])
    _run(["ip", "-n", ns, "link", "set", "lo", "up"])
    _run(["ip", "-n", ns, "link", "set", host.veth_ns, "up"])


def delete_host(lab_dir: LabDir, host: SiteHost) -> None:
    """Delete the namespace (its veth end, so the pair, goes with it) and its record."""
    _run(["ip", "netns", "del", host.netns], check=False)
    _run(["ip", "link", "del", host.veth_host], check=False)  # if the namespace was gone already
    _host_file(lab_dir, host.site).unlink(missing_ok=True)


def delete_hosts(lab_dir: LabDir) -> int:
    found = hosts(lab_dir)
    for host in found:
        delete_host(lab_dir, host)
    return len(found)


def exists(host: SiteHost) -> bool:
    return (Path("/run/netns") / host.netns).exists()


def exec_prefix(host: SiteHost) -> list[str]:
    return ["ip", "netns", "exec", host.netns]


def urls_from(host: SiteHost, amqp_urls: Iterable[str]) -> list[str]:
    """The broker URLs as the site in ``host`` reaches them: this host's loopback is the host
    end of its veth."""
    out = []
    for url in amqp_urls:
        parts = urlsplit(url)
        if parts.hostname in LOOPBACK:
            netloc = parts.netloc.rsplit("@", 1)
            where = host.host_address + (f":{parts.port}" if parts.port else "")
            parts = parts._replace(netloc=f"{netloc[0]}@{where}" if len(netloc) == 2 else where)
        out.append(urlunsplit(parts))
    return out


def link_up(host: SiteHost) -> bool:
    out = _run(["ip", "-n", host.netns, "-j", "link", "show", "dev", host.veth_ns]).stdout
    rows = json.loads(out or "[]")
    return bool(rows) and "UP" in rows[0].get("flags", []) and rows[0].get("operstate") != "DOWN"


def isolate(host: SiteHost) -> None:
    """The site's host loses the network: its link goes down."""
    _run(["ip", "-n", host.netns, "link", "set", host.veth_ns, "down"])


def reconnect(host: SiteHost) -> None:
    if exists(host):
        _run(["ip", "-n", host.netns, "link", "set", host.veth_ns, "up"])


def reachable(host: SiteHost, url: str, timeout: float = 2.0) -> bool:
    """Whether a TCP connection from inside the namespace reaches ``url``'s host and port."""
    parts = urlsplit(url)
    probe = ("import socket,sys\n"
             "try:\n"
             f"    socket.create_connection(({parts.hostname!r}, {parts.port or 5672}), timeout={timeout}).close()\n"
             "except OSError:\n"
             "    sys.exit(1)\n")
    done = _run([*exec_prefix(host), sys.executable, "-c", probe], check=False, timeout=timeout + 10)
    return done.returncode == 0


# -- broker partitions ---------------------------------------------------------------------------


def chain_name(lab_id: str, fault_id: str) -> str:
    return "SMSLAB-" + hashlib.blake2b(f"{lab_id}/{fault_id}".encode(), digest_size=5).hexdigest()


def partition_rules(cut: tuple[str, int], peers: Sequence[tuple[str, int]]) -> list[list[str]]:
    """iptables rule arguments cutting the distribution traffic between node ``cut`` (its
    source address, its distribution port) and each of ``peers``, both ways."""
    source, port = cut
    rules = []
    # Resets pass: the reset a rule sends back must reach the socket, so that both ends see the
    # connection broken at once (not after net_ticktime).
    reset = ["-p", "tcp", "!", "--tcp-flags", "RST", "RST"]
    cut_off = ["-j", "REJECT", "--reject-with", "tcp-reset"]
    for peer_source, peer_port in peers:
        for src, dport in ((source, peer_port), (peer_source, port)):
            rules.append([*reset, "-s", src, "--dport", str(dport), *cut_off])
        for dst, sport in ((source, peer_port), (peer_source, port)):
            rules.append([*reset, "-d", dst, "--sport", str(sport), *cut_off])
    return rules


def add_chain(chain: str, rules: Sequence[Sequence[str]]) -> None:
    _require(("iptables",))
    delete_chain(chain)
    _run(["iptables", "-w", "-N", chain])
    for rule in rules:
        _run(["iptables", "-w", "-A", chain, *rule])
    _run(["iptables", "-w", "-I", "OUTPUT", "-j", chain])


def delete_chain(chain: str) -> None:
    if shutil.which("iptables") is None:
        return
    for _ in range(10):
        if _run(["iptables", "-w", "-D", "OUTPUT", "-j", chain], check=False).returncode != 0:
            break
    _run(["iptables", "-w", "-F", chain], check=False)
    _run(["iptables", "-w", "-X", chain], check=False)


def chain_exists(chain: str) -> bool:
    return shutil.which("iptables") is not None and _run(["iptables", "-w", "-S", chain], check=False).returncode == 0


def check_codes(codes: Iterable[str], known: Sequence[str]) -> list[str]:
    out = []
    for code in codes:
        code = code.strip().upper()
        if code == "ALL":
            return list(known)
        if code not in known:
            raise ConfigError(f"--netns {code}: no such site", hint=f"sites: {', '.join(known)}, or all")
        out.append(code)
    return out
