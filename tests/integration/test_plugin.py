"""The pytest plugin as a user meets it (pytester: a separate pytest run with the plugin loaded
from the installed package's entry point): the README's example passes as written, a failing
test still cleans up and reports the lab, and without a broker the tests are skipped."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from broker import admin

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

README_EXAMPLE = '''
def test_primary_recovers(lab_factory):
    lab = lab_factory("examples/lab.yaml")
    b = lab.backup("P01")
    lab.wait_envelopes(300)
    lab.kill("P01")
    lab.start("P01", restore=b)
    assert not lab.check().valid
    lab.recover("P01", backup=b)
    lab.wait_converged(timeout=120)
    assert lab.check().valid
'''


def readme_example() -> str:
    """The example exactly as the README shows it (a fenced block)."""
    text = (REPO / "README.md").read_text()
    start = text.index("def test_primary_recovers(lab_factory):")
    return text[start:text.index("```", start)].strip() + "\n"


@pytest.mark.slow  # half a minute: two recoveries on real processes; the slow suite runs it (.ci/run)
def test_the_readme_example_passes_as_written(pytester: pytest.Pytester, amqp_url: str) -> None:
    """In a fresh directory outside the repository, with no examples/ of its own: the
    example's examples/lab.yaml is the one that ships with smslab."""
    assert readme_example().strip() == README_EXAMPLE.strip(), "the README's example is the one tested here"
    assert not (pytester.path / "examples").exists() and REPO not in pytester.path.parents
    pytester.makepyfile(test_user=README_EXAMPLE)
    result = pytester.runpytest_subprocess("--amqp-url", amqp_url, "-p", "no:cacheprovider", timeout=600)
    result.assert_outcomes(passed=1)


def test_a_failing_test_still_cleans_up_and_reports_its_lab(pytester: pytest.Pytester, amqp_url: str) -> None:
    marker = pytester.path / "lab.json"
    pytester.makepyfile(test_user=f'''
import json

def test_breaks(lab_factory):
    lab = lab_factory({{"lab": "plug", "sites": [{{"code": "CEN", "type": "central", "clients": 0}},
                                               {{"code": "P01", "type": "primary", "parent": "CEN"}}]}})
    lab.fault("partition", "P01", "CEN")
    open({str(marker)!r}, "w").write(json.dumps({{"lab": lab.lab_id, "dir": str(lab.dir.path)}}))
    assert False, "the user's test fails"
''')
    result = pytester.runpytest_subprocess("--amqp-url", amqp_url, "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(failed=1)
    made = json.loads(marker.read_text())
    out = result.stdout.str()
    assert f"smslab lab {made['lab']}" in out and "verdict:" in out and "last" in out, out[-3000:]
    # nothing left: no broker objects, no site process, no fault daemon, the directory gone
    assert admin.queue_depths(amqp_url, made["lab"], ["CEN", "P01"]) == {"CEN": -1, "P01": -1, "dead": -1}
    assert not Path(made["dir"]).exists()
    alive = subprocess.run(["pgrep", "-f", made["dir"]], capture_output=True, text=True, check=False).stdout
    assert alive.strip() == "", alive


def test_an_interrupted_test_still_cleans_up(pytester: pytest.Pytester, amqp_url: str) -> None:
    """Ctrl-C in the middle of a test (SIGINT to the pytest process) with a fault on: the
    fault healed, the sites stopped, the broker objects and users gone."""
    marker = pytester.path / "lab.json"
    pytester.makepyfile(test_user=f'''
import json, os, signal, time

def test_interrupted(lab_factory):
    lab = lab_factory({{"lab": "intr", "sites": [{{"code": "CEN", "type": "central", "clients": 0}},
                                               {{"code": "P01", "type": "primary", "parent": "CEN"}}]}})
    lab.fault("partition", "P01", "CEN")
    open({str(marker)!r}, "w").write(json.dumps({{"lab": lab.lab_id, "dir": str(lab.dir.path)}}))
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
    raise AssertionError("not interrupted")
''')
    result = pytester.runpytest_subprocess("--amqp-url", amqp_url, "-p", "no:cacheprovider", timeout=300)
    assert "KeyboardInterrupt" in result.stdout.str(), result.stdout.str()[-2000:]
    made = json.loads(marker.read_text())
    assert admin.queue_depths(amqp_url, made["lab"], ["CEN", "P01"]) == {"CEN": -1, "P01": -1, "dead": -1}
    assert not Path(made["dir"]).exists()
    alive = subprocess.run(["pgrep", "-f", made["dir"]], capture_output=True, text=True, check=False).stdout
    assert alive.strip() == "", alive
    if shutil.which("rabbitmqctl"):  # the broker users made for the lab's sites (identities)
        users = subprocess.run(["rabbitmqctl", "-q", "list_users"], capture_output=True, text=True,
                               check=False).stdout
        assert made["lab"] not in users


def test_a_relative_topology_is_found_beside_the_test_and_a_missing_one_is_named(
        pytester: pytest.Pytester, amqp_url: str) -> None:
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests" / "one.yaml").write_text("lab: beside\nsites:\n  - {code: CEN, type: central}\n")
    (pytester.path / "tests" / "test_user.py").write_text('''
import pytest
from emulator.errors import ConfigError

def test_beside(lab_factory):
    assert lab_factory("one.yaml").topology.lab == "beside"

def test_missing(lab_factory):
    with pytest.raises(ConfigError, match="topology file nowhere.yaml not found .looked in"):
        lab_factory("nowhere.yaml")
''')
    result = pytester.runpytest_subprocess("--amqp-url", amqp_url, "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=2)


API_TOPOLOGY = """lab: api
settings: {sync_interval: 0.3, resend_after: 1.0}
sites:
  - {code: CEN, type: central, clients: 0}
  - {code: P01, type: primary, parent: CEN}
"""
API_SCENARIO = """scenario: small
topology: two.yaml
steps:
  - wait-envelopes: 10
  - fault: {kind: drop, a: P01, b: CEN, rate: 0.3, for: 2}
  - wait: 3
  - wait-converged: 60
  - expect: {check: valid}
"""
API_TEST = '''import pytest

@pytest.mark.smslab_topology("two.yaml")
def test_every_method(lab, tmp_path):
    assert lab.topology.lab == "api"
    assert lab.wait_envelopes(10) >= 10
    assert lab.stop("P01") > 0 and lab.start("P01") > 0
    pid = lab.kill("P01"); assert pid > 0
    lab.start("P01")
    paused = lab.pause("P01")
    assert [f["id"] for f in lab.faults()] == [paused]
    lab.resume("P01")
    assert lab.faults() == []
    fid = lab.fault("partition", "P01", "CEN")
    assert lab.faults()[0]["id"] == fid
    lab.heal(fid)
    lab.fault("delay", "P01", "CEN", ms=50, for_s=1)
    lab.heal()
    assert lab.faults() == []
    b = lab.backup("P01")
    lab.wait_envelopes(20)
    lab.kill("P01")
    lab.start("P01", restore=b)
    lab.recover("P01", backup=b)
    assert lab.wait_converged(timeout=90).valid
    assert lab.check().valid
    kinds = {e.kind for e in lab.history()}
    assert {"fault_on", "fault_off", "process", "sent", "applied"} <= kinds
    assert all(e.site == "P01" for e in lab.history(site="P01"))
    assert {s["code"] for s in lab.status()["sites"]} == {"CEN", "P01"}
    for code in ("CEN", "P01"):
        lab.control(code, {"cmd": "resume-workload"})
    result = lab.run("small.yaml", seed=5, run_dir=tmp_path / "run")
    assert result.exit_code == 0 and result.seed == 5, (result.error, result.outcomes)
    assert (tmp_path / "run" / "report.html").exists()
'''


@pytest.mark.slow  # half a minute; the README example exercises the fixture in the default run
def test_the_lab_fixture_offers_every_method(pytester: pytest.Pytester, amqp_url: str) -> None:
    """The `lab` fixture with @pytest.mark.smslab_topology, and each method the issue names:
    kill, stop, start, pause, resume, backup, recover, fault, heal, history, check,
    wait_converged, wait_envelopes, status, run(scenario, seed)."""
    (pytester.path / "two.yaml").write_text(API_TOPOLOGY)
    (pytester.path / "small.yaml").write_text(API_SCENARIO)
    pytester.makepyfile(test_user=API_TEST)
    result = pytester.runpytest_subprocess("--amqp-url", amqp_url, "-p", "no:cacheprovider", timeout=600)
    result.assert_outcomes(passed=1)


def test_keep_keeps_the_lab_directory(pytester: pytest.Pytester, amqp_url: str) -> None:
    pytester.makepyfile(test_user='''
def test_one_site(lab_factory):
    lab = lab_factory({"lab": "keep", "sites": [{"code": "CEN", "type": "central", "clients": 1}]})
    assert lab.wait_converged(timeout=30).valid
''')
    result = pytester.runpytest_subprocess("--amqp-url", amqp_url, "--smslab-keep", "-s", "-p", "no:cacheprovider",
                                           timeout=300)
    result.assert_outcomes(passed=1)
    kept = [line.split(" in ", 1)[1].strip() for line in result.stdout.lines if "smslab: kept lab" in line]
    assert kept and (Path(kept[0]) / "history.jsonl").exists()


def test_without_a_broker_the_lab_tests_are_skipped_with_the_reason(pytester: pytest.Pytester,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "false")
    pytester.makepyfile(test_user='''
def test_needs_a_lab(lab):
    raise AssertionError("never runs")
''')
    result = pytester.runpytest_subprocess("--amqp-url", "amqp://guest:guest@127.0.0.1:1/%2F", "-rs",
                                           "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(skipped=1)
    assert "smslab labs need RabbitMQ" in result.stdout.str()
    monkeypatch.setenv("CI", "true")  # a CI run always has a broker: there it fails instead
    result = pytester.runpytest_subprocess("--amqp-url", "amqp://guest:guest@127.0.0.1:1/%2F",
                                           "-p", "no:cacheprovider", timeout=120)
    assert result.ret != 0 and "no RabbitMQ for the labs" in result.stdout.str()
