"""Fuzzed and forged messages into a running lab: nothing crashes, nothing stalls, nothing is lost.

    python bench/fuzz.py [--count 10000] [--seed 1] [--as-site P01] [--amqp URL] [--json]

A benchmark, not a test: it prints figures and asserts nothing about them.

The 5-site demo lab (examples/lab.yaml, its steady workload running) gets ``--count`` messages
from a foreign client holding only broker access, drawn from the seed, spread over every
site's inbox and control queue:

- random bytes, and JSON that is not a packet (deep nesting, huge numbers, strings of up to
  5 MB, wrong types);
- structure-aware packets that a neighbour could not have sent: envelopes at the next link
  numbers with an origin outside the sender's subtree, a payload naming another key, a
  transaction ID or version of 2**62, ``link_seq: true``, site data going down and global data
  going up; link acks far past what was sent; resend requests for numbers never sent; a
  recovery announce, resync or complete with no recovery;
- control commands that are not commands: unknown verbs, wrong types, out of bounds.

Then it waits until the lab converges and prints: site crashes (goal 0), stalls (a site that
does not answer a ping, or whose parent link stopped moving; goal 0), messages refused with a
reason (the dead-letter queue's depth, and the sites' own counters: refused envelopes, acks
ahead, resend requests refused, recovery messages refused), data lost (records CEN held before
the fuzz that it no longer holds at that version or newer, and the checker's ``lost``; goal
0), and the checker's verdict.

``--as-site P01``: the client holds P01's real credentials (the lab's per-site broker
identities, issue 10 item 1) instead of being a foreign client: everything it publishes carries
P01's validated ``user_id``, so a forgery in P01's own name meets only the strict-input rules
and one in any other site's name is refused for its identity. It also tries, every
``PROBE_EVERY`` messages, what P01's broker user may not do (publish with another site's
user_id, read another site's inbox, publish to a queue by name through the default exchange),
and prints what the broker refused, with its reply code. The refusals of the sites are
printed by reason (the dead-letter queue's reasons, numbers and names blanked).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import pika
import pika.exceptions
from _common import add_amqp_option, add_json_option, busy_before_run, log, machine_facts, temp_lab

from broker import admin, names, urls
from emulator import checker, identities, orchestrator
from emulator.lab import LabDir, LabInfo
from emulator.protocol import envelope as wire
from sites.store import read_only

ROOT = BENCH.parent
BIG = 2**62
PROBE_EVERY = 250  # --as-site: messages between two tries of what the site's user may not do


def _junk(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return rng.choice([None, True, False, rng.randint(-BIG, BIG), rng.random() * 1e300, "x" * rng.randint(0, 50),
                           10**rng.randint(20, 400) if rng.random() < 0.2 else 0])
    if roll < 0.65:
        return {rng.choice(["v", "lab", "source", "dest", "messages", "kind", "cmd", "x"]): _junk(rng, depth + 1)
                for _ in range(rng.randint(0, 5))}
    return [_junk(rng, depth + 1) for _ in range(rng.randint(0, 5))]


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def garbage(rng: random.Random) -> tuple[str, bytes]:
    roll = rng.random()
    if roll < 0.3:
        return "random bytes", os.urandom(rng.randint(0, 2000))
    if roll < 0.4:
        return "deep nesting", _nested(rng.choice([100, 1000, 100000]))
    if roll < 0.42:
        return "5 MB string", json.dumps({"v": 1, "lab": "x" * (5 << 20)}).encode()
    return "junk JSON", json.dumps(_junk(rng)).encode()


class Forger:
    """Well-formed packets that the named neighbour could not have sent, addressed as from it."""

    def __init__(self, info: LabInfo, lab_dir: LabDir) -> None:
        self.info = info
        self.lab_dir = lab_dir
        self.topo = info.topology
        self.links = [(a, b) for a, b in self.topo.links()] + [(b, a) for a, b in self.topo.links()]

    def _next_seq(self, sender: str, receiver: str) -> int:
        with read_only(self.lab_dir.site_db(receiver)) as store:
            if store is None:
                return 1
            link = store.load_links().get(sender)
            return link.next_expected if link else 1

    def packet(self, rng: random.Random) -> tuple[str, str, bytes]:
        sender, receiver = rng.choice(self.links)
        up = self.topo.parent(sender) == receiver
        seq = self._next_seq(sender, receiver)
        kind = rng.choice(["origin", "key", "txn", "version", "bool_seq", "direction", "ack", "resend",
                           "announce", "resync", "complete"])
        base: dict[str, Any] = {"v": 1, "source": sender, "dest": receiver, "incarnation": 1}
        client = f"{sender}-C001"
        payload: dict[str, Any] = {"client": client, "version": 1}
        msg: dict[str, Any]
        if kind in ("origin", "key", "txn", "version", "bool_seq", "direction"):
            data_class = "discovery" if up else "package"
            origin = sender if up else self.topo.codes[0]
            key = client if up else f"{origin}00099"
            if not up:
                payload = {"id": key, "kind": "package", "origin": origin, "name": "forged", "revision": 1}
            if kind == "origin":  # not in the sender's subtree going up, not an ancestor going down
                origin = receiver
            elif kind == "key":
                payload = dict(payload, client="SOMEONE-ELSE", id="SOMEONE-ELSE")
            elif kind == "version":
                payload = dict(payload, version=BIG, revision=BIG)
            elif kind == "direction":
                data_class = "package" if up else "discovery"
            msg = dict(base, kind="data", origin=origin, data_class=data_class, key=key,
                       priority=wire.priority_of(wire.DataClass(data_class)).value,
                       txn_id=BIG if kind == "txn" else 10**9 + seq, link_seq=True if kind == "bool_seq" else seq,
                       op="upsert", hash=wire.content_hash(payload), payload=payload)
        elif kind == "ack":
            msg = dict(base, kind="ack", through=10**9 + rng.randint(0, 1000), sent_through=0)
        elif kind == "resend":
            msg = dict(base, kind="resend", from_seq=10**9 + rng.randint(0, 1000))
        elif kind == "announce":
            msg = dict(base, kind="recovery_announce", recovery_id=f"forged-{rng.randrange(10**6)}", txn_id=1,
                       next_send_seq=1, next_expected=1)
        elif kind == "resync":
            msg = dict(base, kind="recovery_resync", recovery_id=f"forged-{rng.randrange(10**6)}", next_send_seq=1,
                       next_expected=1)
        else:
            msg = dict(base, kind="recovery_complete", recovery_id=f"forged-{rng.randrange(10**6)}")
        body = json.dumps({"v": 1, "lab": self.info.lab_id, "source": sender, "dest": receiver,
                           "messages": [msg]}).encode()
        return f"forged {kind}", receiver, body


def bad_command(rng: random.Random) -> tuple[str, bytes]:
    roll = rng.random()
    if roll < 0.25:
        return "unknown verb", json.dumps({"cmd": rng.choice(["rm -rf", "shutdown", "", "x" * 500])}).encode()
    if roll < 0.5:
        return "burst out of bounds", json.dumps({"cmd": "burst", "count": rng.choice([-1, 0, BIG]),
                                                  "keys": rng.choice([0, -5, "ten"]), "chunk": 0}).encode()
    if roll < 0.75:
        return "wrong types", json.dumps({"cmd": rng.choice([1, True, None, ["ping"]]), "extra": _junk(rng)}).encode()
    return "not JSON", os.urandom(rng.randint(0, 300))


def snapshot_cen(lab_dir: LabDir) -> dict[tuple[str, str], int]:
    with read_only(lab_dir.site_db("CEN")) as store:
        assert store is not None
        return {(c, k): v for c, k, v in store.db.execute("SELECT data_class, key, version FROM site_data")}


def counters(lab_dir: LabDir, codes: list[str]) -> dict[str, int]:
    out = {"refused_input": 0, "refused_identity": 0, "ack_ahead": 0, "resend_refused": 0, "recovery_refused": 0,
           "refused": 0}
    for code in codes:
        with read_only(lab_dir.site_db(code)) as store:
            if store is None:
                continue
            for link in store.load_links().values():
                out["refused"] += link.refused
                for k in ("refused_input", "refused_identity", "ack_ahead", "resend_refused", "recovery_refused"):
                    out[k] += int(link.extra.get(k, 0))
    return out


def parent_progress(lab_dir: LabDir, info: LabInfo) -> dict[str, int]:
    """Per child, what its parent has applied from it (next expected)."""
    out = {}
    for code in info.topology.codes:
        parent = info.topology.parent(code)
        if parent is None:
            continue
        with read_only(lab_dir.site_db(parent)) as store:
            out[code] = store.load_links()[code].next_expected if store else 0
    return out


def wait_envelopes(lab_dir: LabDir, info: LabInfo, n: int, deadline: float) -> None:
    """Until CEN has applied ``n`` envelopes from its children (the workload is flowing)."""
    end = time.monotonic() + deadline
    while sum(parent_progress(lab_dir, info).get(c, 0) for c in info.topology.children("CEN")) < n:
        if time.monotonic() > end:
            raise SystemExit(f"fuzz: the lab did not carry {n} envelopes to CEN within {deadline:.0f} s")
        time.sleep(0.2)


def converge(lab_dir: LabDir, info: LabInfo, deadline: float) -> checker.Report:
    """The checker (stores, then the history) until valid, or its last report at the deadline."""
    end = time.monotonic() + deadline
    while True:
        report = checker.check(lab_dir, info, with_history=False)
        if report.verdict == "valid":
            report = checker.check(lab_dir, info)
            if report.verdict == "valid":
                return report
        if time.monotonic() > end:
            return report
        time.sleep(0.5)


def reason_kind(reason: str) -> str:
    """A dead letter's reason with what varies blanked: quoted text, numbers, site codes."""
    text = re.sub(r"smslab-[\w-]+-(\w+)", r"USER-\1", reason)
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"\b(?!USER)[A-Z0-9]{3}\b|\d+", "#", text)
    return text[:110]


def dead_reasons(url: str, lab: str) -> dict[str, int]:
    """Every dead letter's reason, by kind (read and put back: nothing is consumed)."""
    kinds: dict[str, int] = {}
    with admin.blocking(url, name="smslab-fuzz-dead") as conn:
        ch = conn.channel()
        while True:
            method, _props, body = ch.basic_get(names.dead_queue(lab), auto_ack=False)
            if method is None:
                break
            try:
                reason = str(json.loads(body).get("reason", "?"))
            except (ValueError, AttributeError):
                reason = "(not a site's dead letter)"
            kind = reason_kind(reason)
            kinds[kind] = kinds.get(kind, 0) + 1
        ch.close()
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def probes(url: str, info: LabInfo, site: str, rng: random.Random) -> list[tuple[str, str]]:
    """What ``site``'s broker user may not do, each tried once: (what, how the broker answered)."""
    others = [c for c in info.topology.codes if c != site]
    other = rng.choice(others)
    tries: list[tuple[str, Any]] = [
        (f"publish with {other}'s user_id", lambda ch: ch.basic_publish(
            names.exchange(info.lab_id), names.link_key(other, info.topology.codes[0]), b"{}",
            pika.BasicProperties(user_id=names.broker_user(info.lab_id, other)), mandatory=True)),
        ("publish with the controller's user_id", lambda ch: ch.basic_publish(
            names.exchange(info.lab_id), names.control_key(other), b'{"cmd": "ping"}',
            pika.BasicProperties(user_id=names.broker_user(info.lab_id, names.CONTROLLER)), mandatory=True)),
        (f"read {other}'s inbox", lambda ch: ch.basic_get(names.site_queue(info.lab_id, other))),
        (f"delete {other}'s control queue", lambda ch: ch.queue_delete(names.control_queue(info.lab_id, other))),
        ("publish to a queue by name (default exchange)", lambda ch: ch.basic_publish(
            "", names.site_queue(info.lab_id, other), b"{}",
            pika.BasicProperties(user_id=names.broker_user(info.lab_id, site)))),
    ]
    out = []
    with admin.blocking(url, name="smslab-fuzz-probe") as conn:
        for what, action in tries:
            ch = conn.channel()
            ch.confirm_delivery()
            try:
                action(ch)
                out.append((what, "ALLOWED"))
            except pika.exceptions.ChannelClosedByBroker as exc:
                out.append((what, f"{exc.reply_code} {exc.reply_text.split(' - ')[0]}"))
    return out


def run(url: str, count: int, seed: int, as_site: str | None = None) -> dict[str, Any]:
    rng = random.Random(seed)
    topology = (ROOT / "examples" / "lab.yaml").read_text()
    with temp_lab("smslab-fuzz-", topology, "fuzz: ") as (topo, lab_dir):
        info = orchestrator.up(topo, lab_dir, url, progress=lambda m: log(f"fuzz: {m.strip()}"))
        codes = info.topology.codes
        controller = info.amqp_url  # the lab's controller with identities: pings and pauses are its
        fuzz_url = url
        if as_site is not None:
            login = identities.site_login(lab_dir, info, as_site)
            if login is None:
                raise SystemExit(f"fuzz: --as-site needs per-site broker identities, and the lab is"
                                 f" {identities.describe(info)}")
            fuzz_url = urls.with_login(info.admin_url, *login)
        user_id = admin.login_user(fuzz_url)
        refused_by_broker: dict[str, int] = {}
        pids = {c: lab_dir.pid(c) for c in codes}
        wait_envelopes(lab_dir, info, 50, deadline=60)
        before = snapshot_cen(lab_dir)
        progress_before = parent_progress(lab_dir, info)
        counters_before = counters(lab_dir, codes)
        forger = Forger(info, lab_dir)
        kinds: dict[str, int] = {}
        unroutable = 0
        params = admin.parameters(fuzz_url)
        params.client_properties = {"connection_name": "smslab-fuzz"}
        conn = pika.BlockingConnection(params)
        ch = conn.channel()
        ch.confirm_delivery()
        t0 = time.monotonic()
        for i in range(count):
            roll = rng.random()
            if roll < 0.35:
                what, body = garbage(rng)
                key = names.site_key(rng.choice(codes))
            elif roll < 0.8:
                what, site, body = forger.packet(rng)
                key = names.site_key(site)
            else:
                what, body = bad_command(rng)
                key = names.control_key(rng.choice(codes))
            kinds[what] = kinds.get(what, 0) + 1
            props = pika.BasicProperties(delivery_mode=2, user_id=user_id)
            try:
                ch.basic_publish(names.exchange(info.lab_id), key, body, props, mandatory=True)
            except pika.exceptions.UnroutableError:
                unroutable += 1
            if as_site is not None and (i + 1) % PROBE_EVERY == 0:
                for what, answer in probes(fuzz_url, info, as_site, rng):
                    refused_by_broker[f"{what}: {answer}"] = refused_by_broker.get(f"{what}: {answer}", 0) + 1
            if (i + 1) % 1000 == 0:
                log(f"fuzz: {i + 1}/{count} sent ({time.monotonic() - t0:.1f} s)")
        sent_s = time.monotonic() - t0
        conn.close()
        log("fuzz: sent; every site must answer and every link to a parent move on")
        crashed = [c for c in codes if lab_dir.pid(c) != pids[c]]
        stalled = []
        for code in codes:
            try:
                admin.control_request(controller, info.lab_id, code, {"cmd": "ping"}, timeout=10)
            except Exception:  # noqa: BLE001 - any failure to answer is a stall
                stalled.append(code)
        deadline = time.monotonic() + 60
        while True:
            now_progress = parent_progress(lab_dir, info)
            stuck = [c for c in progress_before if now_progress.get(c, 0) <= progress_before[c]]
            if not stuck or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        stalled += [f"{c}->{info.topology.parent(c)}" for c in stuck]
        log("fuzz: workload paused; waiting for the lab to converge")
        for code in codes:
            try:
                admin.control_request(controller, info.lab_id, code, {"cmd": "pause-workload"}, timeout=10)
            except Exception as exc:  # noqa: BLE001 - counted as a stall above already
                log(f"fuzz: {code} did not pause its workload: {exc}")
        started = time.monotonic()
        report = converge(lab_dir, info, deadline=180)
        converge_s = time.monotonic() - started
        crashed += [c for c in codes if lab_dir.pid(c) != pids[c] and c not in crashed]
        after = snapshot_cen(lab_dir)
        lost = [k for k, v in before.items() if after.get(k, -1) < v]
        counts = counters(lab_dir, codes)
        refused = {k: counts[k] - counters_before[k] for k in counts}
        dead = admin.queue_depth(url, names.dead_queue(info.lab_id))
        by_reason = dead_reasons(url, info.lab_id)
        return {
            "count": count, "seed": seed, "as": as_site or "a foreign client", "identities": identities.describe(info),
            "sent_s": round(sent_s, 2), "by_kind": dict(sorted(kinds.items())),
            "refused_by_broker": refused_by_broker, "dead_by_reason": by_reason,
            "unroutable": unroutable, "crashed": crashed, "stalled": stalled, "dead_lettered": dead,
            "refused_by_sites": refused, "records_before": len(before), "lost_records": len(lost),
            "lost_examples": lost[:5], "verdict": report.verdict,
            "violations": sorted({v.kind for v in report.violations}), "converge_s": round(converge_s, 1),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--as-site", default=None, metavar="CODE",
                        help="fuzz with this site's real broker credentials (a lab with per-site identities)")
    add_amqp_option(parser)
    add_json_option(parser)
    args = parser.parse_args(argv)
    load = busy_before_run(args.amqp)
    result = run(args.amqp, args.count, args.seed, args.as_site)
    result["machine"] = machine_facts(args.amqp, load)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    r = result
    print(f"smslab fuzz: {r['count']:,} fuzzed and forged messages into the 5-site demo lab, seed {r['seed']}"
          f" (sent in {r['sent_s']} s)")
    print(f"  from {r['as']}; the lab: {r['identities']}")
    for what, n in r["by_kind"].items():
        print(f"  {what:28s} {n:6,}")
    if r["refused_by_broker"]:
        print("  what the site's broker user tried and the broker answered:")
        for what, n in r["refused_by_broker"].items():
            print(f"    {n:5,} x {what}")
    print(f"  site crashes                 {len(r['crashed']):6}  (goal 0) {' '.join(r['crashed'])}")
    print(f"  stalls                       {len(r['stalled']):6}  (goal 0) {' '.join(r['stalled'])}")
    print(f"  dead-lettered with a reason  {r['dead_lettered']!s:>6}")
    print(f"  refused, the sites' counters {r['refused_by_sites']}")
    print("  dead letters by reason:")
    for what, n in r["dead_by_reason"].items():
        print(f"    {n:6,}  {what}")
    print(f"  data lost                    {r['lost_records']:6}  (goal 0) of {r['records_before']:,} records CEN held"
          f" before {r['lost_examples'] or ''}")
    print(f"  verdict after                {r['verdict']} {' '.join(r['violations'])} (converged in"
          f" {r['converge_s']} s)")
    print(f"  machine: {r['machine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
