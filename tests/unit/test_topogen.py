"""``smslab topology generate``: a valid topology for any number of sites up to the code space."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from emulator.errors import ConfigError
from emulator.topogen import CODE_SPACE, capacity, generate
from emulator.topology import Topology, load_topology

CODE = re.compile(r"^[A-Z0-9]{3}$")


def depth_of(topo: Topology, code: str) -> int:
    depth = 0
    while (parent := topo.parent(code)) is not None:
        code, depth = parent, depth + 1
    return depth


@pytest.mark.parametrize(("sites", "depth", "fanout", "secondaries"),
                         [(1, 0, 0, 0), (2, 1, 1, 0), (20, 2, 4, 1), (150, 3, 5, 2), (1000, 4, 5, 2)])
def test_a_generated_topology_has_the_sites_and_the_shape_asked_for(sites: int, depth: int, fanout: int,
                                                                      secondaries: int) -> None:
    topo = generate(sites, depth=depth, fanout=fanout, secondaries=secondaries, clients=2)
    codes = topo.codes
    assert len(codes) == sites == len(set(codes))
    assert all(CODE.match(c) for c in codes)
    assert [s.code for s in topo.sites if s.type == "central"] == ["CEN"]
    for spec in topo.sites:
        if spec.type == "secondary":
            assert topo.site(spec.parent or "").type == "primary" and not topo.children(spec.code)
        if spec.type == "primary":
            assert 1 <= depth_of(topo, spec.code) <= depth
            assert len([c for c in topo.children(spec.code) if topo.site(c).type == "primary"]) <= fanout


def test_the_whole_code_space_fits_and_one_more_site_is_refused() -> None:
    topo = generate(CODE_SPACE, depth=3, fanout=60, secondaries=4, clients=0)
    assert len(set(topo.codes)) == CODE_SPACE
    assert all(CODE.match(c) for c in topo.codes)
    with pytest.raises(ConfigError, match="code space"):
        generate(CODE_SPACE + 1, depth=3, fanout=60, secondaries=4)


def test_a_shape_too_small_is_refused_with_its_capacity() -> None:
    most = capacity(2, 2, 1)
    assert most == 1 + (2 + 4) * 2
    with pytest.raises(ConfigError, match=f"at most {most}"):
        generate(most + 1, depth=2, fanout=2, secondaries=1)
    with pytest.raises(ConfigError, match="at least one"):
        generate(0, depth=1, fanout=1)


def test_the_command_writes_a_file_the_lab_loads(tmp_path: Path) -> None:
    out = tmp_path / "big.yaml"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "emulator", "topology", "generate", "--sites", "300", "--depth", "3",
                           "--fanout", "6", "--secondaries", "2", "--workload-of", str(root / "examples" / "lab-20.yaml"),
                           "-o", str(out)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    topo = load_topology(out)
    assert len(topo.codes) == 300
    assert topo.defaults.workload == load_topology(root / "examples" / "lab-20.yaml").defaults.workload
    bad = subprocess.run([sys.executable, "-m", "emulator", "topology", "generate", "--sites", "100", "--depth", "1",
                          "--fanout", "2", "--secondaries", "0"], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0 and "at most 3" in bad.stdout + bad.stderr and "Traceback" not in bad.stderr
