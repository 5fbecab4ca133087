"""What ``smslab status`` and ``smslab diag`` show, read from the site stores (read-only)."""

from __future__ import annotations

import sqlite3
from typing import Any

from broker import urls
from emulator import identities
from emulator.lab import LabDir, LabInfo
from emulator.protocol.sequencing import LinkState, health
from emulator.protocol.signing import fingerprint
from sites.store import SiteStore, read_only


def read_site(lab_dir: LabDir, code: str) -> dict[str, Any] | None:
    """A snapshot of one site's store, or None if it has none yet."""
    with read_only(lab_dir.site_db(code)) as store:
        if store is None:
            return None
        try:
            meta = store.meta()
            links = store.load_links()
            outbox = store.outbox_counts()
            drops: dict[str, int] = {}
            for reasons in store.drop_counts().values():
                for reason, n in reasons.items():
                    drops[reason] = drops.get(reason, 0) + n
            return {"meta": meta, "links": links, "outbox": outbox, "drops": drops,
                    "allocators": store.allocators(),
                    "workload_paused": store.get_control("workload_paused") is True}
        except sqlite3.DatabaseError:
            return None


def collect(lab_dir: LabDir, info: LabInfo) -> dict[str, Any]:
    topo = info.topology
    settings = topo.settings
    sites: dict[str, dict[str, Any]] = {}
    snaps: dict[str, dict[str, Any] | None] = {}
    paused = _paused(lab_dir)
    for code in topo.depth_order():
        spec = topo.site(code)
        snap = read_site(lab_dir, code)
        snaps[code] = snap
        pid = lab_dir.pid(code)
        meta = snap["meta"] if snap else {}
        state = meta.get("state", "new") if pid else "down"
        if pid and meta.get("recovery_phase") and meta.get("recovery_phase") != "complete":
            state = f"recovering:{meta['recovery_phase']}"
        if pid and code in paused:
            state = "paused"  # its store says what it was when it was stopped
        sites[code] = {
            "code": code, "type": spec.type, "parent": spec.parent, "state": state, "pid": pid,
            "incarnation": int(meta.get("incarnation", 0)), "txn_id": int(meta.get("txn_id", 0)),
            "scf_serial": int(meta.get("scf_serial", 0)), "clients": topo.clients_of(code),
            "outbox": sum(snap["outbox"].values()) if snap else 0,
            "drops": snap["drops"] if snap else {},
            "workload_paused": bool(snap and snap["workload_paused"]),
            "broker_node": lab_dir.broker_node(code) if pid else None,
        }
    links = []
    for parent, child in topo.links():
        p = snaps.get(parent)
        c = snaps.get(child)
        pl: LinkState | None = p["links"].get(child) if p else None
        cl: LinkState | None = c["links"].get(parent) if c else None
        links.append({
            "parent": parent, "child": child,
            "down": _direction(pl, cl),
            "up": _direction(cl, pl),
            "health": "down" if not (sites[parent]["pid"] and sites[child]["pid"]) else _worst([
                health(x, degraded_after=settings.degraded_after, failed_after=settings.failed_after)
                for x in (pl, cl) if x is not None
            ]),
        })
    return {"lab": info.lab_id, "mode": topo.mode, "dir": str(lab_dir.path),
            "broker": info.broker.describe(info.amqp_url), "broker_kind": info.broker.kind,
            "identities": info.identities, "identities_note": identities.describe(info),
            "broker_nodes": [urls.where(u) for u in info.amqp_urls] if info.broker.kind != "simulated" else [],
            "sites": list(sites.values()), "links": links}


def _paused(lab_dir: LabDir) -> set[str]:
    """The sites a pause fault holds stopped (SIGSTOP): their store cannot say so."""
    from emulator import faults  # the fault files; faults imports more than status needs

    try:
        return {f.site for f in faults.active(lab_dir) if f.kind == "pause" and f.state == "on" and f.site}
    except OSError:
        return set()


def _direction(sender: LinkState | None, receiver: LinkState | None) -> dict[str, Any]:
    return {
        "sent": sender.sent_through if sender else None,
        "acked": sender.acked_through if sender else None,
        "expected": receiver.next_expected if receiver else None,
        "duplicates": receiver.duplicates if receiver else 0,
        "conflicts": receiver.conflicts if receiver else 0,
        "gaps": receiver.gaps if receiver else 0,
        "stale": receiver.stale if receiver else 0,
        "fenced": receiver.fenced if receiver else 0,
        "refused": receiver.refused if receiver else 0,
        "resends": sender.resends if sender else 0,
    }


def _drops_text(d: dict[str, Any]) -> str:
    parts = []
    if d["duplicates"]:
        reused = f" ({d['conflicts']} with new content: numbers reused)" if d["conflicts"] else ""
        parts.append(f"{d['duplicates']} already seen{reused}")
    for key, word in (("gaps", "out of sequence"), ("stale", "stale"), ("fenced", "fenced"),
                      ("refused", "refused (quarantined)")):
        if d[key]:
            parts.append(f"{d[key]} {word}")
    return ", ".join(parts)


_ORDER = ["active", "paused", "degraded", "failed", "quarantined", "down"]


def _worst(states: list[str]) -> str:
    if not states:
        return "unknown"
    return max(states, key=_ORDER.index)


def render(status: dict[str, Any]) -> str:
    lines = [f"lab {status['lab']} ({status['mode']}) in {status['dir']}, broker: {status.get('broker', '?')}"]
    if status.get("identities_note"):
        lines.append(f"broker identities: {status['identities_note']}")
    sites = {s["code"]: s for s in status["sites"]}
    nodes = status.get("broker_nodes") or []
    links = {(l["parent"], l["child"]): l for l in status["links"]}
    children: dict[str | None, list[str]] = {}
    for s in status["sites"]:
        children.setdefault(s["parent"], []).append(s["code"])

    def walk(code: str, prefix: str, last: bool, root: bool) -> None:
        s = sites[code]
        branch = "" if root else ("└─ " if last else "├─ ")
        pid = s["pid"] or "-"
        lines.append(
            f"{prefix}{branch}{code} {s['type']:<9} {s['state']:<18} pid {pid:<7} inc {s['incarnation']}"
            f"  txn {s['txn_id']:<7} clients {s['clients']}  outbox {s['outbox']}"
            + ("  workload paused" if s.get("workload_paused") and s["pid"] else "")
            + (f"  broker {s.get('broker_node') or 'reconnecting'}" if s["pid"] and len(nodes) > 1 else "")
        )
        inner = prefix + ("" if root else ("   " if last else "│  "))
        if s["parent"]:
            l = links[(s["parent"], code)]
            up, down = l["up"], l["down"]
            lines.append(
                f"{inner}   link {l['health']:<8} up {code}->{s['parent']}: sent {up['sent']} acked {up['acked']}"
                f" expected {up['expected']}  |  down: sent {down['sent']} acked {down['acked']}"
                f" expected {down['expected']}"
            )
            for receiver, sender, d in ((s["parent"], code, up), (code, s["parent"], down)):
                text = _drops_text(d)
                if text:
                    lines.append(f"{inner}   dropped at {receiver} (from {sender}): {text}")
        kids = children.get(code, [])
        for i, kid in enumerate(kids):
            walk(kid, inner, i == len(kids) - 1, False)

    for root in children.get(None, []):
        walk(root, "", True, True)
    return "\n".join(lines)


def diag(lab_dir: LabDir, info: LabInfo, code: str) -> dict[str, Any]:
    """The ``.trs``-like view of one site: watermarks per (source, class), links, outbox, drops."""
    path = lab_dir.site_db(code)
    if not path.exists():
        from emulator.errors import LabError

        raise LabError(f"site {code} has no store", hint="is the lab up? (smslab status)")
    settings = info.topology.settings
    store = SiteStore(path, readonly=True)
    try:
        watermarks = store.watermark_summary()
        drops = store.drop_counts()
        meta = store.meta()
        links = {}
        outbox = store.outbox_counts()
        for peer, link in store.load_links().items():
            row = link.to_row()
            row["health"] = health(link, degraded_after=settings.degraded_after, failed_after=settings.failed_after)
            row["outbox"] = outbox.get(peer, 0)
            links[peer] = row
        recent = store.recent_status(10, skip=(5000,))
        tables = store.table_sizes()
        pid = lab_dir.pid(code)
        return {
            "site": code,
            "state": meta.get("state") if pid else "down",
            "pid": pid,
            "counters": {k: int(meta.get(k) or 0) for k in ("txn_id", "incarnation", "scf_serial",
                                                              "status_serial", "control_serial_processed")},
            "object_next": store.allocators().get("object"),
            "recovery": {k: meta.get(k) for k in ("recovery_id", "recovery_phase", "recovery_waiting",
                                                    "recovered_at") if meta.get(k)},
            "watermarks": watermarks,
            "links": links,
            "drops": drops,
            "recent_status": recent,
            "tables": tables,
            "store_bytes": sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file()),
            # hardened mode: the keys pinned here per origin (emulator.protocol.signing)
            "keys": {site: {"inc": inc, "fingerprint": fingerprint(pub)} for site, (inc, pub) in store.site_keys().items()},
        }
    finally:
        store.close()


def render_diag(d: dict[str, Any]) -> str:
    c = d["counters"]
    head = (f"site {d['site']}: {d['state']} (pid {d['pid'] or '-'}), transaction ID {c['txn_id']},"
            f" incarnation {c['incarnation']}, SCF serial {c['scf_serial']}, next object {d['object_next']}")
    lines = [head]
    if d["recovery"]:
        lines.append("recovery: " + ", ".join(f"{k} {v}" for k, v in d["recovery"].items()))
    lines.append("watermarks (.trs) per source and data class: keys, highest transaction ID")
    for source, classes in sorted(d["watermarks"].items()):
        lines.append(f"  [{source}] " + "  ".join(f"{cls}={v['max_txn']} ({v['keys']} key{'' if v['keys'] == 1 else 's'})"
                                                  for cls, v in sorted(classes.items())))
    lines.append("links")
    for peer, l in sorted(d["links"].items()):
        lines.append(
            f"  {peer} ({l['role']}) {l['health']}: send next {l['next_send_seq']} acked {l['acked_through']}"
            f" outbox {l['outbox']} | receive next {l['next_expected']} | dup {l['duplicates']}"
            f" conflict {l['conflicts']} gap {l['gaps']} stale {l['stale']} fenced {l['fenced']}"
            f" refused {l['refused']} | resends {l['resends']} unavailable {l['resend_unavailable']}"
            f" | failed syncs out {l['out_failed_syncs']} in {l['in_failed_syncs']}"
        )
    if d["drops"]:
        lines.append("drops recorded: " + "; ".join(
            f"from {src}: " + ", ".join(f"{r} {n}" for r, n in sorted(rs.items()))
            for src, rs in sorted(d["drops"].items())))
    if d.get("keys"):
        lines.append("keys pinned (hardened): " + ", ".join(
            f"{site} {k['fingerprint']} (incarnation {k['inc']})" for site, k in sorted(d["keys"].items())))
    if d["recent_status"]:
        lines.append("recent status messages (newest first, heartbeats left out)")
        for m in d["recent_status"]:
            lines.append(f"  {m['id']} {m['severity']:<7} {m['component']}: {m['text']}")
    if d.get("tables"):
        lines.append(f"store: {d['store_bytes']:,} bytes on disk (with its WAL); per table: rows, bytes (tables and"
                     " their indexes, from dbstat)")
        for name, t in sorted(d["tables"].items(), key=lambda kv: (-kv[1]["bytes"], kv[0])):
            size = f"{t['bytes']:,}" if t["bytes"] >= 0 else "?"
            lines.append(f"  {name:<16} {t['rows']:>10,} {size:>14}")
    return "\n".join(lines)


def dump(lab_dir: LabDir, code: str) -> dict[str, Any]:
    """``/dump``: the site control files a site holds (its own and its subtree's)."""
    store = SiteStore(lab_dir.site_db(code), readonly=True)
    try:
        scfs = {row["key"]: row["payload"] for row in store.site_data("scf")}
        return {"site": code, "scf": scfs}
    finally:
        store.close()
