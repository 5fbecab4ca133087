"""What a site does for each control command (validated by ``emulator.protocol.control``):
the workload switches, the administrator's object commands and the Preinst-equivalent verbs.

Every handler runs inside the batch transaction of the delivery that carried the command; an
``SmslabError`` it raises is the command's refusal (undone to the savepoint, answered)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker import names
from emulator.errors import SmslabError
from emulator.protocol import control as ctl
from sites import status_ids as sid

if TYPE_CHECKING:
    from sites.runtime import SiteRuntime


def run(rt: SiteRuntime, command: ctl.Command, now: float) -> dict[str, Any]:
    if isinstance(command, ctl.Ping):
        return ping(rt)
    if isinstance(command, ctl.PauseWorkload | ctl.ResumeWorkload):
        rt.workload_paused = isinstance(command, ctl.PauseWorkload)
        rt.store.set_control("workload_paused", True if rt.workload_paused else None)
        return {}
    if isinstance(command, ctl.SetWorkload):
        rates = command.model_dump(exclude_none=True, exclude={"cmd"})
        if rt.spec.type == "secondary":
            rates.pop("object_interval", None)  # secondaries have no administrators
        rt.workload.set(rt.workload.w.model_copy(update=rates), now)
        return {"workload": rt.workload.w.model_dump()}
    if command.cmd in ctl.ADMINISTRATIVE and rt.state != "active":
        hint = (f"wait for smslab recover {rt.site} to finish" if rt.state == "recovering"
                else f"recover it first: smslab recover {rt.site}")
        raise SmslabError(f"{rt.site} is {rt.state}: administrative actions are refused", hint=hint)
    if isinstance(command, ctl.Create):
        if rt.spec.type == "secondary":
            raise SmslabError(f"{rt.site} is a secondary site: objects are created at primaries")
        return {"object": rt.create_object(command.kind, command.name, now)}
    if isinstance(command, ctl.Update | ctl.Delete):
        name = command.name if isinstance(command, ctl.Update) else None
        return {"object": rt.update_object(command.id, name, isinstance(command, ctl.Delete), now)}
    if isinstance(command, ctl.Report):
        rt.client_catch_up(now, full=True)
        return {}
    if isinstance(command, ctl.Burst):
        rt.burst(command.count, command.keys, command.chunk)
        return {}
    if isinstance(command, ctl.Stop):
        rt.transport.call_later(0, rt.shutdown)
        return {}
    return preinst(rt, command, now)


def ping(rt: SiteRuntime) -> dict[str, Any]:
    return {"site": rt.site, "state": rt.state, "pid": rt.process_id, "run": rt.run_id,
            "recovering": rt.store.get_meta("recovery_phase") not in (None, "complete"),
            "heard_from": sorted(rt.heard_from), "workload_paused": rt.workload_paused,
            "connects": rt.connects,
            "links": {p: {"acked_through": l.acked_through, "applied_through": l.applied_through,
                          "sent_through": l.sent_through} for p, l in rt.links.items()}}


def preinst(rt: SiteRuntime, command: ctl.Command, now: float) -> dict[str, Any]:
    """The Preinst-equivalent verbs."""
    from sites.recovery import sync_objects_to, sync_site_data_up

    if isinstance(command, ctl.SyncChild):
        child = command.child
        if child not in rt.children:
            raise SmslabError(f"{child} is not a child of {rt.site}",
                              hint=f"children of {rt.site}: {', '.join(rt.children) or 'none'}")
        return {"sent": sync_objects_to(rt, child)}
    if isinstance(command, ctl.SyncParent):
        sent = sync_site_data_up(rt, now) if rt.parent else 0
        for child in rt.children:  # "the current site and all its child sites"
            rt.transport.publish(names.control_key(child), ctl.encode(ctl.SyncParent(cmd="syncparent")),
                                 correlation_id=rt.new_id(32))
        return {"sent": sent, "children": rt.children}
    if isinstance(command, ctl.DelJob):
        dest = command.dest
        if dest not in rt.links:
            raise SmslabError(f"{dest} is not a neighbour of {rt.site}")
        deleted = rt.store.outbox_clear(dest)
        rt.published[dest] = rt.links[dest].sent_through
        rt.event("void", now, link=f"{rt.site}->{dest}", detail={"why": "deljob", "deleted": deleted})
        return {"deleted": deleted}
    if isinstance(command, ctl.DelSite):
        target, parent = command.site, command.parent
        if target == rt.site:
            raise SmslabError("delsite deletes another site's data, not this site's own")
        if target not in rt.topology.codes:
            raise SmslabError(f"unknown site {target}; sites in this lab: {', '.join(rt.topology.codes)}")
        actual = rt.topology.parent(target)
        if actual != parent:
            return {"deleted": 0, "note": f"{target} reports to {actual}, not {parent}: nothing deleted"}
        removed = rt.store.delete_site_data_of([target])
        jobs = rt.store.outbox_clear(target) if target in rt.links else 0
        if target in rt.links:
            rt.event("void", now, link=f"{rt.site}->{target}", detail={"why": "delsite", "deleted": jobs})
        rt.status(sid.SITE_DELETED, "info",
                  f"delsite: deleted {removed} record(s) of site {target} and {jobs} job(s)", now)
        return {"deleted": removed, "jobs": jobs}
    if isinstance(command, ctl.Key | ctl.TrustKey):
        return keys(rt, command, now)
    raise SmslabError(f"unknown control command {command.cmd!r}")


def keys(rt: SiteRuntime, command: ctl.Key | ctl.TrustKey, now: float) -> dict[str, Any]:
    """Hardened mode's keys: show this site's, or pin another site's by hand."""
    from emulator.protocol import signing

    if not rt.signing:
        raise SmslabError(f"keys are hardened mode's and this lab runs {rt.mode}: nothing is signed",
                          hint="mode: hardened in the topology's settings")
    if isinstance(command, ctl.TrustKey):
        if command.site == rt.site:
            raise SmslabError(f"{rt.site} does not pin its own key")
        try:
            signing.verify_key(command.pub)
        except ValueError as exc:
            raise SmslabError(f"not an Ed25519 public key: {exc}") from exc
        rt.pin(command.site, signing.Pin(command.inc, command.pub), now, why="pinned by hand (keyforparent/keyforchild)")
        return {"site": command.site, "inc": command.inc, "fingerprint": signing.fingerprint(command.pub)}
    me = rt.signer()
    return {"site": rt.site, "inc": me.inc, "pub": me.pub, "fingerprint": signing.fingerprint(me.pub),
            "pins": {site: {"inc": pin.inc, "fingerprint": pin.fingerprint} for site, pin in sorted(rt.pins().items())}}
