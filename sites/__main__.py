"""``python -m sites --lab DIR --site P01``: run one site process until stopped."""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import random
import signal
import sys
import threading
import time

from tenacity import RetryCallState, Retrying, retry_if_exception_type

from broker import urls
from broker.transport import PikaTransport
from emulator import identities
from emulator.errors import BrokerUnavailable, SmslabError
from emulator.lab import LabDir
from sites.clients import ClientStore
from sites.runtime import SiteRuntime
from sites.store import SiteStore

log = logging.getLogger("sites")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sites",
        description="Run one site of a lab until stopped (the orchestrator starts these for you).")
    parser.add_argument("--lab", required=True, help="lab directory")
    parser.add_argument("--site", required=True, help="site code")
    parser.add_argument("--amqp", default=None, help="broker URL (default: the lab's)")
    parser.add_argument("--recover", metavar="RECOVERY_ID", default=None,
                        help="start as the recovery agent of this site (resumes a recovery with the same ID)")
    parser.add_argument("--reference", default=None, help="recovery: the child whose copy of our objects we take back")
    parser.add_argument("--log", default=None, metavar="FILE",
                        help="write the log to FILE, rotated by the topology's log_max_bytes and log_backups"
                             " (default: stderr)")
    args = parser.parse_args(argv)
    fmt = f"%(asctime)s {args.site} %(levelname)s %(name)s: %(message)s"
    level = os.environ.get("SMSLAB_LOG_LEVEL", "INFO")
    if args.log:
        logging.basicConfig(level=level, format=fmt, handlers=[_log_file(args.log, LabDir(args.lab))])
    else:
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    logging.getLogger("pika").setLevel(logging.WARNING)  # its connection steps are not the site's news
    try:
        return run(LabDir(args.lab), args.site, args.amqp, args.recover, args.reference)
    except SmslabError as exc:
        log.error("%s%s", exc, f" ({exc.hint})" if exc.hint else "")
        return 2


def _log_file(path: str, lab_dir: LabDir) -> logging.Handler:
    """The site's own log file, rotated past the topology's ``log_max_bytes`` (``site.log`` is
    always the current one; ``site.log.1`` ... the ones before)."""
    try:
        settings = lab_dir.load().topology.settings
        max_bytes, backups = settings.log_max_bytes, settings.log_backups
    except Exception:  # noqa: BLE001 - the lab's own error is reported by run(), in this log
        max_bytes, backups = 10_000_000, 3
    return logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")


def run(lab_dir: LabDir, site: str, amqp: str | None, recover: str | None = None,
        reference: str | None = None) -> int:
    info = lab_dir.load()
    topology = info.topology
    spec = topology.site(site)
    store = SiteStore(lab_dir.site_db(site))
    SiteRuntime.initialize_store(store, lab=info.lab_id, topology=topology, site=site)
    clients = ClientStore(lab_dir.clients_db(site), site, topology.clients_of(site)) if spec.type != "central" or topology.clients_of(site) else None
    # Per-site identity: the site's own broker user and password (from the lab's 0600 secrets
    # file), never the controller's the lab file's URL would log in as.
    login = identities.site_login(lab_dir, info, site)
    transport = PikaTransport(
        amqp or info.admin_url, lab=info.lab_id, site=site,
        prefetch=topology.settings.prefetch, queue_type=topology.settings.queue_type,
        delivery_limit=topology.settings.quorum_delivery_limit,
        neighbours=[p for p in [topology.parent(site), *topology.children(site)] if p],
        dead_letter_max=topology.settings.dead_letter_max,
        user=login[0] if login else None, password=login[1] if login else None,
    )
    runtime = SiteRuntime(lab=info.lab_id, topology=topology, site=site, store=store, clients=clients,
                          transport=transport, identities=identities.identities_of(info))
    if recover:
        runtime.recovery.begin(recover, reference)
    lab_dir.write_pid(site, os.getpid())
    alive = lab_dir.alive_file(site)
    broker_file = lab_dir.broker_file(site)
    broker_file.unlink(missing_ok=True)

    def heartbeat() -> None:
        # How the harness on another host (a compose lab's tools container) sees this process
        # is alive: a file touched every second, also while the broker is away (a thread of its
        # own: it shares nothing with the site's loop). Beside it, the broker node the site is
        # connected to (status shows it); a plain read of two attributes of the transport.
        shown: str | None = "?"
        while True:
            try:
                alive.touch()
                node = transport.connected_to
                if node != shown:
                    tmp = broker_file.with_suffix(".tmp")
                    tmp.write_text(json.dumps({"node": node, "nodes": [urls.where(u) for u in transport.urls],
                                               "since": time.time()}))
                    os.replace(tmp, broker_file)
                    shown = node
            except OSError:
                pass
            time.sleep(0.5)

    threading.Thread(target=heartbeat, name="heartbeat", daemon=True).start()

    def on_term(_sig: int, _frame: object) -> None:
        # Only a flag: the workload tick (at most 0.5 s apart) stops the site from inside
        # (calling into pika from a signal handler could deadlock on its locks).
        runtime.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log.info("site %s starting (lab %s, pid %s)", site, info.lab_id, os.getpid())
    def backoff(_state: RetryCallState) -> float:
        # Every node once quickly (fail over), then each round of them waits twice as long.
        rounds = max(0, transport.failures - 1) // len(transport.urls)
        return min(5.0, 0.2 * 2.0 ** rounds) + random.uniform(0, 0.1 if rounds == 0 else 0.5)

    retrying = Retrying(
        retry=retry_if_exception_type(BrokerUnavailable),
        wait=backoff,
        before_sleep=lambda rs: log.warning(
            "broker unavailable (%s); reconnecting to %s, attempt %d", rs.outcome.exception() if rs.outcome else "?",
            transport.node, rs.attempt_number),
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                if runtime.stopping:
                    break
                transport.run(runtime)
                if not runtime.stopping:
                    raise BrokerUnavailable("the broker connection closed")
    finally:
        store.close()
        if clients:
            clients.close()
        try:
            if lab_dir.pid_file(site).read_text().split()[0] == str(os.getpid()):
                lab_dir.pid_file(site).unlink()
        except OSError:
            pass
    log.info("site %s stopped", site)
    return 0


if __name__ == "__main__":
    sys.exit(main())
