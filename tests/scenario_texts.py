"""Scenario files the tests of ``smslab run`` (real processes) and of the simulator share."""

from __future__ import annotations

from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "examples" / "lab.yaml"

# Fails its step 2 (the lab is valid), then converges: exit 1, the failure named.
WRONG_EXPECTATION = f"""
scenario: wrong
topology: {DEMO}
steps:
  - wait-envelopes: 50
  - expect: {{check: invalid, within: 3}}
  - wait-converged: 120   # the run goes on after a failed expectation; the final verdict on a still lab
"""

# A fault on an idle link, over before anything crossed it: the final verdict unknown, exit 2.
IDLE_PARTITION = """
scenario: idle
topology:
  lab: idle
  defaults: {clients: 0, workload: {inventory_interval: 0, discovery_interval: 0, status_interval: 0,
                                    object_interval: 0, scf_interval: 0}}
  sites:
    - {code: CEN, type: central, clients: 0}
    - {code: P01, type: primary, parent: CEN}
steps:
  - wait: 1
  - fault: {kind: partition, a: P01, b: CEN, for: 2}   # nothing is sent while it is on
  - wait: 3
"""
