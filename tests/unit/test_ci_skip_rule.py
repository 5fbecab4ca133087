"""Under CI a broker is always there (.ci/run exports CI=true): an integration test that would
be skipped for want of one fails the run instead; elsewhere it is skipped with the reason. The
repository's own fixture (tests/conftest.py), run as .ci/run runs it, against a port where no
broker answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEST = "tests/integration/test_no_loss.py::test_deep_nesting_and_garbage_on_the_control_queue_are_dead_lettered_without_a_traceback"
NO_BROKER = "amqp://guest:guest@127.0.0.1:1/%2F"


def run_without_a_broker(ci: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CI": ci, "SMSLAB_AMQP_URL": NO_BROKER, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", TEST],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_an_integration_test_without_a_broker_fails_the_run(ci: str) -> None:
    done = run_without_a_broker(ci)
    assert done.returncode != 0, done.stdout
    assert "1 error" in done.stdout and "skipped" not in done.stdout, done.stdout


def test_elsewhere_it_is_skipped_with_the_reason() -> None:
    done = run_without_a_broker("false")
    assert done.returncode == 0, done.stdout
    assert "1 skipped" in done.stdout and "integration tests need RabbitMQ" in done.stdout, done.stdout


def test_ci_run_sets_ci_for_its_test_runs() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    before_tests = script.split("python3 -m pytest -q ||", 1)[0]
    assert 'export CI="${CI:-true}"' in before_tests
