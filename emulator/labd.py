"""``python -m emulator.labd --lab DIR``: the lab's fault daemon, one process per lab.

It carries out what lasts of the faults in ``DIR/faults/``: the relays of link faults (one
``broker.relay.RelayHub`` for all of them), closing a disconnected site's connections again
while its fault is on, healing a fault at the end of its ``--for``; and it merges the sites'
history into ``history.jsonl`` every second, so the history is near complete even if nobody
asks for it. The CLI starts it (``up``, ``start``, ``recover``, any fault) and ``down`` stops
it. Killed at any moment, it loses nothing: what a relay held goes back to its queue.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from broker import names
from broker.relay import Counters, RelayEvent, RelayHub
from emulator import faults, history
from emulator.errors import BrokerUnavailable, SmslabError
from emulator.lab import LabDir, LabInfo, write_atomically

log = logging.getLogger("emulator.labd")

SCAN = 0.2  # seconds between two looks at the fault files
MERGE = 1.0  # seconds between two history merges
REASSERT = 1.0  # seconds between two re-assertions of the diverted links


class Daemon:
    def __init__(self, lab_dir: LabDir, info: LabInfo) -> None:
        self.lab_dir = lab_dir
        self.info = info
        self.stopping = threading.Event()
        self.hub = RelayHub(info.amqp_url, info.lab_id, on_event=self._relay_event,
                            keep_user_id=info.identities == "per-site")
        self._keepers: dict[str, threading.Thread] = {}
        self._healing: set[str] = set()  # faults a heal thread is healing (at the end of their --for)
        self._last_reassert = 0.0

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        merger = threading.Thread(target=self._merge_loop, name="history", daemon=True)
        merger.start()
        # The end of a --for is watched apart from the relays: a relay publishing while a memory
        # alarm is on is blocked by the broker until the alarm ends, and the alarm must still end.
        expiry = threading.Thread(target=self._expiry_loop, name="expiry", daemon=True)
        expiry.start()
        while not self.stopping.is_set():
            try:
                if not self.hub.connected:
                    self.hub.connect()
                self._cycle()
            except BrokerUnavailable as exc:
                log.warning("%s; reconnecting in 1 s", exc)
                self.hub.close()
                self.stopping.wait(1.0)
            except SmslabError as exc:
                log.error("%s%s", exc, f" ({exc.hint})" if exc.hint else "")
                self.stopping.wait(1.0)
            except Exception:
                log.exception("unexpected error; the daemon goes on")
                self.stopping.wait(1.0)
        self.hub.close()
        self._merge_once()

    def _cycle(self) -> None:
        deadline = time.monotonic() + SCAN
        while time.monotonic() < deadline and not self.stopping.is_set():
            due = self.hub.next_due()
            wait = deadline - time.monotonic()
            if due is not None:
                wait = min(wait, max(0.0, due - time.time()))
            self.hub.poll(max(0.0, min(wait, SCAN)))
            self.hub.tick()
        self._sync()

    def _sync(self) -> None:
        specs = {f.id: f for f in faults.active(self.lab_dir)}
        on = {link: f for f in specs.values() if f.is_link_fault and f.state == "on" for link in f.links}
        for link, spec in on.items():
            if link not in self.hub.relays:
                self.hub.open(spec.id, link[0], link[1], spec.shaper(), self.info.topology.settings.queue_type)
                log.info("relay %s->%s open for fault %s (%s)", link[0], link[1], spec.id, spec.describe())
        for link in list(self.hub.relays):
            relay = self.hub.relays[link]
            held_by = specs.get(relay.fault)
            if held_by is None or held_by.state != "on":
                counters = self.hub.shut(*link)
                log.info("relay %s->%s drained and closed (fault %s healed)", link[0], link[1], relay.fault)
                if held_by is not None:
                    self._write_stats(held_by, final=counters, link=relay.name, drained=True)
        for spec in specs.values():
            if spec.state == "on" and spec.is_link_fault:
                self._write_stats(spec)
            if spec.kind == "disconnect" and spec.state == "on" and spec.id not in self._keepers:
                keeper = threading.Thread(target=self._keep_closed, args=(spec,), name=f"disconnect-{spec.id}",
                                          daemon=True)
                self._keepers[spec.id] = keeper
                keeper.start()
        self._reassert(on)

    def _expiry_loop(self) -> None:
        while not self.stopping.wait(SCAN):
            try:
                self._expire()
            except Exception:
                log.exception("looking for faults at the end of their --for failed; trying again")

    def _expire(self) -> None:
        """Heal every fault whose --for is over, one heal thread per fault (the spec stays "on"
        until the heal gets the lab's lock)."""
        for spec in faults.active(self.lab_dir):
            if (spec.until is not None and spec.state == "on" and time.time() >= spec.until
                    and spec.id not in self._healing):
                log.info("fault %s (%s) is over (--for): healing", spec.id, spec.describe())
                self._healing.add(spec.id)
                threading.Thread(target=self._heal, args=(spec.id,), name=f"heal-{spec.id}", daemon=True).start()

    def _reassert(self, on: dict[tuple[str, str], faults.FaultSpec]) -> None:
        """A site that declared its inbox again (deleted under it) bound its link keys again:
        the diverted ones go back to their relays."""
        now = time.monotonic()
        if now - self._last_reassert < REASSERT or not on:
            return
        self._last_reassert = now
        from broker import admin

        for sender, receiver in on:
            try:
                admin.unbind_inbox(self.info.amqp_url, self.info.lab_id, sender, receiver)
            except BrokerUnavailable:
                pass

    def _write_stats(self, spec: faults.FaultSpec, final: Counters | None = None, link: str | None = None,
                     drained: bool = False) -> None:
        current = faults.stats(self.lab_dir, spec.id)
        for relay in self.hub.relays.values():
            if relay.fault == spec.id:
                current.links[relay.name] = faults.LinkStats(held=len(relay.held), **vars(relay.counters))
        if final is not None and link is not None:
            current.links[link] = faults.LinkStats(**vars(final))
        if drained:
            current.drained = not any(r.fault == spec.id for r in self.hub.relays.values())
        current.updated = time.time()
        faults.save_stats(self.lab_dir, spec.id, current)

    # -- helpers on threads ---------------------------------------------------------------------

    def _keep_closed(self, spec: faults.FaultSpec) -> None:
        """While the disconnect fault is on, close the site's connections as they come."""
        assert spec.site is not None
        control = faults.control_for(self.lab_dir, self.info)
        name = names.connection_name(self.info.lab_id, spec.site)
        while not self.stopping.is_set():
            if not any(f.id == spec.id and f.state == "on" for f in faults.active(self.lab_dir)):
                break
            try:
                closed = control.close_connections(name, "smslab fault: connection closed")
            except BrokerUnavailable:
                closed = 0
            if closed:
                with faults.locked(self.lab_dir):  # not after a heal deleted its files
                    if any(f.id == spec.id for f in faults.active(self.lab_dir)):
                        current = faults.stats(self.lab_dir, spec.id)
                        current.closed += closed
                        current.updated = time.time()
                        faults.save_stats(self.lab_dir, spec.id, current)
            self.stopping.wait(0.3)
        self._keepers.pop(spec.id, None)

    def _heal(self, fault_id: str) -> None:
        try:
            faults.heal(self.lab_dir, self.info, fault_id)
        except SmslabError as exc:
            log.error("healing fault %s: %s", fault_id, exc)
        finally:
            self._healing.discard(fault_id)

    def _relay_event(self, event: RelayEvent) -> None:
        fault_id, link, action, count, first, last = event
        history.record(self.lab_dir, "relay", link=link, fault=fault_id, seq=first,
                       detail={"action": action, "envelopes": count, "last_seq": last})

    def _merge_loop(self) -> None:
        while not self.stopping.wait(MERGE):
            self._merge_once()

    def _merge_once(self) -> None:
        try:
            history.merge(self.lab_dir, self.info)
        except Exception:
            log.exception("merging the history failed; trying again in a second")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulator.labd",
                                     description="The lab's fault daemon (the CLI starts and stops it).")
    parser.add_argument("--lab", required=True, help="lab directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("SMSLAB_LOG_LEVEL", "INFO"),
                        format="%(asctime)s labd %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("pika").setLevel(logging.WARNING)
    lab_dir = LabDir(args.lab)
    try:
        info = lab_dir.load()
    except SmslabError as exc:
        log.error("%s", exc)
        return 2
    daemon = Daemon(lab_dir, info)

    def on_term(_sig: int, _frame: object) -> None:
        daemon.stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    write_atomically(lab_dir.daemon_pid_file(), f"{os.getpid()}\n")
    log.info("fault daemon of lab %s running (pid %s)", info.lab_id, os.getpid())
    try:
        daemon.run()
    finally:
        try:
            if lab_dir.daemon_pid_file().read_text().split()[0] == str(os.getpid()):
                lab_dir.daemon_pid_file().unlink()
        except OSError:
            pass
    log.info("fault daemon stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
