"""smslab's pytest plugin, installed with the package (entry point ``pytest11``).

Fixtures:

- ``amqp_url`` (session): ``--amqp-url`` / the ``smslab_amqp_url`` ini option /
  ``SMSLAB_AMQP_URL``, else a local broker that answers, else a RabbitMQ container through
  testcontainers (stopped at the end of the session), else the test is skipped with the reason
  (under ``CI=true`` it fails instead: a CI run always has a broker);
- ``lab_factory``: ``lab_factory("examples/lab.yaml")`` (a path, a mapping or a ``Topology``)
  brings a lab up in the test's own directory and returns an ``emulator.api.Lab``; every lab
  gets a unique id, so tests share one broker. A relative path is looked for in the current
  directory, beside the test file, in pytest's rootdir, and last among the topologies that
  ship with smslab (``examples/lab.yaml`` works from any directory);
- ``lab``: one lab of the 5-site demo topology (or ``@pytest.mark.smslab_topology(path)``).

Teardown heals every fault, stops every process and deletes the lab's broker objects, also
when the test failed or was interrupted; the lab directory goes too unless ``--smslab-keep``.
A failing test's report gets a section with each lab's check verdict and its last history
events.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from emulator import brokers, checker, history
from emulator.api import Lab
from emulator.errors import ConfigError, SmslabError
from emulator.topology import Topology

LABS_KEY = pytest.StashKey[list[Lab]]()
DEMO = {
    "lab": "demo",
    "mode": "sms20",
    "sites": [
        {"code": "CEN", "type": "central", "clients": 0},
        {"code": "P01", "type": "primary", "parent": "CEN"},
        {"code": "P02", "type": "primary", "parent": "CEN"},
        {"code": "S01", "type": "secondary", "parent": "P01"},
        {"code": "S02", "type": "secondary", "parent": "P02"},
    ],
}
_LIVE: list[Lab] = []  # labs not yet brought down: atexit's last chance


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("smslab", "smslab labs")
    group.addoption("--amqp-url", dest="smslab_amqp_url", default=None,
                    help="RabbitMQ URL for smslab labs (default: SMSLAB_AMQP_URL, localhost, or a container)")
    group.addoption("--smslab-keep", action="store_true", default=False,
                    help="keep each lab's directory (stores, logs, history) after the test")
    parser.addini("smslab_amqp_url", "RabbitMQ URL for smslab labs", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "smslab_topology(path): the topology of the `lab` fixture")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


@pytest.fixture(scope="session")
def amqp_url(pytestconfig: pytest.Config) -> Iterator[str]:
    given = pytestconfig.getoption("smslab_amqp_url") or pytestconfig.getini("smslab_amqp_url") or None
    with brokers.broker_for_tests(given) as (url, reason):
        if url is None:
            if _in_ci():
                pytest.fail(f"smslab: no RabbitMQ for the labs: {reason}", pytrace=False)
            pytest.skip(f"smslab labs need RabbitMQ: {reason}")
        yield url


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest, tmp_path: Path,
                amqp_url: str) -> Iterator[Callable[..., Lab]]:
    made: list[Lab] = []
    request.node.stash[LABS_KEY] = made

    def factory(topology: str | Path | dict[str, Any] | Topology, *, timeout: float = 60.0) -> Lab:
        if isinstance(topology, str | Path):
            topology = find_topology(topology, request.path.parent, request.config.rootpath)
        root = tmp_path / f"lab{len(made) + 1}"
        lab = Lab.up(topology, root=root, amqp_url=amqp_url, timeout=timeout)
        made.append(lab)
        _LIVE.append(lab)
        return lab

    try:
        yield factory
    finally:
        keep = bool(request.config.getoption("smslab_keep"))
        for lab in made:
            _bring_down(lab, keep=keep)
            if keep:
                print(f"\nsmslab: kept lab {lab.lab_id} in {lab.dir.path}")


def find_topology(path: str | Path, *near: Path) -> Path:
    """A topology path as a test names it: as given (absolute, or relative to the current
    directory), else relative to each of ``near`` (the test file's directory, the rootdir),
    else among the topologies shipped with smslab (``examples/lab.yaml``, the demo lab)."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    candidates = [base / given for base in near] + [base / given for base in shipped_dirs()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(dict.fromkeys(str(c.parent) for c in [Path.cwd() / given, *candidates]))
    raise ConfigError(f"topology file {given} not found (looked in {looked})",
                      hint="give the path of a topology YAML file, absolute or relative to the test file")


def shipped_dirs() -> list[Path]:
    """Where smslab's own files are: the source tree it runs from (``examples/`` beside the
    packages; ``pip install -e .`` as the README says)."""
    import emulator

    return [Path(emulator.__file__).resolve().parents[1]]


@pytest.fixture
def lab(request: pytest.FixtureRequest, lab_factory: Callable[..., Lab]) -> Lab:
    marker = request.node.get_closest_marker("smslab_topology")
    topology = marker.args[0] if marker and marker.args else DEMO
    return lab_factory(topology)


def _bring_down(lab: Lab, *, keep: bool) -> None:
    try:
        lab.down(keep=keep)
    except SmslabError as exc:  # a half-made lab: still stop what can be stopped
        print(f"\nsmslab: bringing lab {lab.lab_id} down: {exc.message}")
    finally:
        if lab in _LIVE:
            _LIVE.remove(lab)


@atexit.register
def _down_what_is_left() -> None:
    for lab in _LIVE:
        _bring_down(lab, keep=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    labs = item.stash.get(LABS_KEY, [])
    if report.failed and labs and report.when in ("call", "setup"):
        for lab in labs:
            report.sections.append((f"smslab lab {lab.lab_id}", _post_mortem(lab)))
    return report


def _post_mortem(lab: Lab, events: int = 25) -> str:
    lines = [f"lab directory: {lab.dir.path}"]
    try:
        lines.append(checker.check(lab.dir, lab.info, confirm=0).render(limit=15))
    except SmslabError as exc:
        lines.append(f"check: {exc.message}")
    try:
        tail = history.load(lab.dir, lab.info)[-events:]
        lines.append(f"last {len(tail)} history events:")
        lines.extend("  " + history.render(e) for e in tail)
    except SmslabError as exc:
        lines.append(f"history: {exc.message}")
    return "\n".join(lines)
