"""What ``smslab status`` and ``smslab diag`` show, read from the site stores (read-only)."""

from __future__ import annotations

import sqlite3
from typing import Any

from emulator.lab import LabDir, LabInfo
from emulator.protocol.sequencing import LinkState, health
from sites.store import SiteStore


def read_site(lab_dir: LabDir, code: str) -> dict[str, Any] | None:
    """A snapshot of one site's store, or None if it has none yet."""
    path = lab_dir.site_db(code)
    if not path.exists():
        return None
    try:
        store = SiteStore(path, readonly=True)
    except Exception:  # noqa: BLE001 - a store being replaced under us reads as absent
        return None
    try:
        meta = store.meta()
        links = store.load_links()
        outbox = store.outbox_counts()
        drops = dict(store.db.execute("SELECT reason, COUNT(*) FROM drops GROUP BY reason").fetchall())
        return {"meta": meta, "links": links, "outbox": outbox, "drops": drops,
                "allocators": store.allocators()}
    except sqlite3.DatabaseError:
        return None
    finally:
        store.close()


def collect(lab_dir: LabDir, info: LabInfo) -> dict[str, Any]:
    topo = info.topology
    settings = topo.settings
    sites: dict[str, dict[str, Any]] = {}
    snaps: dict[str, dict[str, Any] | None] = {}
    for code in topo.depth_order():
        spec = topo.site(code)
        snap = read_site(lab_dir, code)
        snaps[code] = snap
        pid = lab_dir.pid(code)
        meta = snap["meta"] if snap else {}
        state = meta.get("state", "new") if pid else "down"
        if pid and meta.get("recovery_phase") and meta.get("recovery_phase") != "complete":
            state = f"recovering:{meta['recovery_phase']}"
        sites[code] = {
            "code": code, "type": spec.type, "parent": spec.parent, "state": state, "pid": pid,
            "incarnation": int(meta.get("incarnation", 0)), "txn_id": int(meta.get("txn_id", 0)),
            "scf_serial": int(meta.get("scf_serial", 0)), "clients": topo.clients_of(code),
            "outbox": sum(snap["outbox"].values()) if snap else 0,
            "drops": snap["drops"] if snap else {},
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
            "health": _worst([
                health(x, degraded_after=settings.degraded_after, failed_after=settings.failed_after)
                for x in (pl, cl) if x is not None
            ]),
        })
    return {"lab": info.lab_id, "mode": topo.mode, "dir": str(lab_dir.path),
            "sites": list(sites.values()), "links": links}


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


_ORDER = ["active", "paused", "degraded", "failed", "quarantined"]


def _worst(states: list[str]) -> str:
    if not states:
        return "unknown"
    return max(states, key=_ORDER.index)


def render(status: dict[str, Any]) -> str:
    lines = [f"lab {status['lab']} ({status['mode']}) in {status['dir']}"]
    sites = {s["code"]: s for s in status["sites"]}
    links = {(l["parent"], l["child"]): l for l in status["links"]}
    children: dict[str | None, list[str]] = {}
    for s in status["sites"]:
        children.setdefault(s["parent"], []).append(s["code"])

    def walk(code: str, prefix: str, last: bool, root: bool) -> None:
        s = sites[code]
        branch = "" if root else ("└─ " if last else "├─ ")
        pid = s["pid"] or "-"
        lines.append(
            f"{prefix}{branch}{code} {s['type']:<9} {s['state']:<12} pid {pid:<7} inc {s['incarnation']}"
            f"  txn {s['txn_id']:<7} clients {s['clients']}  outbox {s['outbox']}"
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
            drops = {k: up[k] + down[k] for k in ("duplicates", "conflicts", "gaps", "stale", "fenced", "refused")}
            if any(drops.values()):
                lines.append(f"{inner}   drops " + " ".join(f"{k} {v}" for k, v in drops.items() if v))
        kids = children.get(code, [])
        for i, kid in enumerate(kids):
            walk(kid, inner, i == len(kids) - 1, False)

    for root in children.get(None, []):
        walk(root, "", True, True)
    return "\n".join(lines)
