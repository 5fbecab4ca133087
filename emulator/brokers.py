"""Where a lab's broker comes from when none is given.

``smslab up`` with no ``--amqp`` (and no ``SMSLAB_AMQP_URL``) uses the local RabbitMQ if one
answers on localhost:5672; else it starts a private RabbitMQ node for the lab (its own node
name, ports and data directory inside the lab directory: ``broker.local``) when RabbitMQ is
installed; else a RabbitMQ container through testcontainers when a Docker engine answers;
else it fails, naming the ways to provide one. ``down`` stops what ``up`` started.

The tests' and the pytest plugin's broker comes from ``broker_for_tests``: the URL given, else
the local broker, else a container (stopped at the end of the session), else a reason to skip.
``SMSLAB_DEFAULT_AMQP_URL`` moves where the local broker is looked for; ``SMSLAB_RABBITMQ_SERVER=none``
makes an installed RabbitMQ count as absent.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from broker import admin
from emulator.errors import BrokerUnavailable, LabError
from emulator.lab import BrokerRef, LabDir

log = logging.getLogger("emulator.brokers")
DEFAULT_IMAGE = "rabbitmq:3.13.7-management"  # pinned; SMSLAB_RABBITMQ_IMAGE picks another (a local build)
Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def answers(url: str) -> str | None:
    """None if a broker answers at ``url``, else why not."""
    try:
        admin.check(url)
        return None
    except BrokerUnavailable as exc:
        return exc.message


def default_url() -> str:
    """Where a broker of this host answers if one runs (``SMSLAB_DEFAULT_AMQP_URL`` moves it,
    e.g. to show what happens on a machine where none runs)."""
    return os.environ.get("SMSLAB_DEFAULT_AMQP_URL") or admin.DEFAULT_URL


def image() -> str:
    return os.environ.get("SMSLAB_RABBITMQ_IMAGE") or DEFAULT_IMAGE


def start_container() -> tuple[str, Any]:
    """A RabbitMQ container through testcontainers: (its AMQP URL, the container to stop)."""
    try:
        from testcontainers.community.rabbitmq import RabbitMqContainer
        from testcontainers.core.config import testcontainers_config
    except ImportError as exc:
        raise BrokerUnavailable("testcontainers is not installed", hint="pip install testcontainers") from exc
    _ryuk_where_it_cannot_be_pulled(testcontainers_config)
    try:
        container = RabbitMqContainer(image())
        container.start()
    except Exception as exc:
        raise BrokerUnavailable(f"no RabbitMQ container ({image()}): {str(exc).splitlines()[0][:300]}",
                                hint="start a Docker engine, or set SMSLAB_RABBITMQ_IMAGE to an image it has") from exc
    params = container.get_connection_params()
    return f"amqp://guest:guest@{params.host}:{params.port}/%2F", container


def _ryuk_where_it_cannot_be_pulled(config: Any) -> None:
    """testcontainers' reaper (Ryuk) is one more image to pull; on an engine without a registry
    that has not got it, do without it: the containers started here are stopped here."""
    if os.environ.get("TESTCONTAINERS_RYUK_DISABLED"):
        return
    try:
        docker: Any = importlib.import_module("docker")
        docker.from_env().images.get(config.ryuk_image)
    except Exception:  # noqa: BLE001 - no such image, or no engine at all (the start will say)
        config.ryuk_disabled = True


def stop_container(container_id: str) -> None:
    try:
        docker: Any = importlib.import_module("docker")
        docker.from_env().containers.get(container_id).remove(force=True, v=True)  # its data volume too
    except Exception as exc:  # noqa: BLE001 - gone already
        log.debug("container %s: %r", container_id, exc)


def private_node(lab_dir: LabDir, progress: Progress = _quiet) -> tuple[str, BrokerRef]:
    from broker.local import LocalNode, find_server

    if find_server() is None:
        raise BrokerUnavailable("RabbitMQ is not installed here")
    base = lab_dir.path / "broker"
    node = LocalNode.load_or_new(base, name=f"lab-{os.getpid()}-{lab_dir.path.name}"[:60].replace(".", "-"))
    progress(f"starting a private RabbitMQ node for the lab ({node.node_name}, in {base})")
    node.start()
    return node.amqp_url, BrokerRef(kind="private", node_dir=str(base))


def local_cluster(base: Path, given: str | None) -> tuple[str, BrokerRef]:
    """The URLs of the local cluster in ``base`` (``smslab broker cluster up``); a lab on it is
    not its owner: ``down`` leaves the cluster running."""
    from broker import urls
    from broker.local import LocalCluster

    cluster = LocalCluster.load(base)
    if given and set(urls.split(given)) != set(cluster.urls):
        raise LabError(f"--amqp names other brokers than the cluster in {base}",
                       hint="give one of --amqp or --cluster")
    return urls.join(cluster.urls), BrokerRef(kind="cluster", node_dir=str(cluster.base_dir), owned=False)


def broker_for_lab(lab_dir: LabDir, given: str | None, progress: Progress = _quiet) -> tuple[str, BrokerRef]:
    """The broker ``up`` uses: the URL given, else the local one, else one of its own."""
    if given:
        return given, BrokerRef()
    local = default_url()
    why = answers(local)
    if why is None:
        return local, BrokerRef()
    reasons = [f"nothing answers at {admin._safe(local)} ({why})"]
    try:
        return private_node(lab_dir, progress)
    except (BrokerUnavailable, LabError) as exc:
        reasons.append(f"no private node: {exc.message}")
    try:
        progress(f"starting a RabbitMQ container for the lab ({image()})")
        url, container = start_container()
        return url, BrokerRef(kind="container", container=str(container.get_wrapped_container().id))
    except BrokerUnavailable as exc:
        reasons.append(exc.message)
    raise BrokerUnavailable(
        "no broker for the lab: " + "; ".join(reasons),
        hint="start RabbitMQ (rabbitmq-server -detached), install it (apt-get install rabbitmq-server) for a"
             " private node, start a Docker engine for a container (SMSLAB_RABBITMQ_IMAGE names an image it"
             f" has; default {DEFAULT_IMAGE}), or pass --amqp URL / SMSLAB_AMQP_URL")


def release(ref: BrokerRef) -> str | None:
    """Stop the broker a lab started for itself; say what was stopped."""
    if not ref.owned:
        return None
    if ref.kind == "private" and ref.node_dir and Path(ref.node_dir).exists():
        from broker.local import LocalNode

        try:
            node = LocalNode.load(Path(ref.node_dir))
        except Exception:  # noqa: BLE001 - never started, or its folder is damaged
            return None
        node.stop()
        return f"stopped the lab's private RabbitMQ node {node.node_name}"
    if ref.kind == "container" and ref.container:
        stop_container(ref.container)
        return f"stopped the lab's RabbitMQ container {ref.container[:12]}"
    return None


@contextmanager
def broker_for_tests(given: str | None = None) -> Iterator[tuple[str | None, str]]:
    """(URL, "") of a broker for a test session, or (None, why there is none). A container it
    starts is stopped when the block ends."""
    url = given or os.environ.get("SMSLAB_AMQP_URL") or default_url()
    why = answers(url)
    if why is None:
        yield url, ""
        return
    if given or os.environ.get("SMSLAB_AMQP_URL"):
        yield None, f"no broker at {admin._safe(url)}: {why}"
        return
    try:
        container_url, container = start_container()
    except BrokerUnavailable as exc:
        yield None, f"no broker at {admin._safe(url)} ({why}) and {exc.message}"
        return
    try:
        yield container_url, ""
    finally:
        stop_container(str(container.get_wrapped_container().id))
