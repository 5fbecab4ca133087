"""Topology file: the example labs, every refusal rule with its line, and round trips."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from emulator.errors import ConfigError
from emulator.topology import (
    SiteSpec,
    Topology,
    Workload,
    load_topology,
    parse_topology,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def parse(text: str) -> Topology:
    """Parse a dedented topology named ``t.yaml`` in errors."""
    return parse_topology(textwrap.dedent(text).lstrip("\n"), source="t.yaml")


def refused(text: str) -> ConfigError:
    """The ``ConfigError`` raised for ``text`` (fails the test if it parses)."""
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert info.value.hint, "every refusal says what to do"
    return info.value


def first_line(err: ConfigError) -> str:
    return str(err).splitlines()[0]


# -- the examples -----------------------------------------------------------------------------


def test_demo_lab_shape() -> None:
    topo = load_topology(EXAMPLES / "lab.yaml")
    assert topo.lab == "demo"
    assert topo.mode == "sms20"
    assert topo.codes == ["CEN", "P01", "P02", "S01", "S02"]
    assert topo.central == "CEN"
    assert topo.children("CEN") == ["P01", "P02"]
    assert topo.children("P01") == ["S01"]
    assert topo.children("S02") == []
    assert topo.parent("S02") == "P02"
    assert topo.parent("CEN") is None
    assert topo.ancestors("S01") == ["P01", "CEN"]
    assert topo.ancestors("CEN") == []
    assert topo.subtree("P02") == ["P02", "S02"]
    assert topo.subtree("CEN") == ["CEN", "P01", "S01", "P02", "S02"]
    assert topo.depth_order() == ["CEN", "P01", "P02", "S01", "S02"]
    assert topo.links() == [("CEN", "P01"), ("CEN", "P02"), ("P01", "S01"), ("P02", "S02")]
    assert topo.clients_of("CEN") == 0
    assert [topo.clients_of(c) for c in ("P01", "P02", "S01", "S02")] == [3, 3, 3, 3]
    assert topo.workload_of("P01") == Workload(
        inventory_interval=2,
        discovery_interval=10,
        status_interval=5,
        object_interval=5,
        scf_interval=15,
    )
    assert topo.settings.degraded_after == 12
    assert topo.settings.failed_after == 24


def test_twenty_site_lab_shape() -> None:
    topo = load_topology(EXAMPLES / "lab-20.yaml")
    assert len(topo.sites) == 20
    assert len(set(topo.codes)) == 20
    types = [s.type for s in topo.sites]
    assert types.count("central") == 1
    assert topo.children("CEN")[:5] == ["P01", "P02", "P03", "P04", "P05"]
    assert all(topo.site(c).type == "primary" for c in topo.children("CEN"))
    assert {"P11", "P12"} <= set(topo.children("P01"))
    assert {"P21", "P22"} <= set(topo.children("P02"))
    assert topo.ancestors("S08") == ["P11", "P01", "CEN"]
    for site in topo.sites:
        assert topo.clients_of(site.code) == 2
        if site.type == "secondary":
            assert topo.children(site.code) == []
            assert topo.site(site.parent or "").type != "secondary"
    order = topo.depth_order()
    assert sorted(order) == sorted(topo.codes)
    for code in order:
        for ancestor in topo.ancestors(code):
            assert order.index(ancestor) < order.index(code)
    assert topo.workload_of("P01").inventory_interval == 5.0
    demo = load_topology(EXAMPLES / "lab.yaml")
    for field in Workload.model_fields:
        if field.endswith("_interval"):  # slower: longer intervals (max_objects is no rate)
            assert getattr(topo.defaults.workload, field) > getattr(demo.defaults.workload, field)


@pytest.mark.parametrize("name", ["lab.yaml", "lab-20.yaml", "lab-quorum.yaml"])
def test_examples_round_trip(name: str) -> None:
    topo = load_topology(EXAMPLES / name)
    assert "null" not in topo.to_yaml()
    again = parse_topology(topo.to_yaml())
    assert again == topo
    assert again.model_dump() == topo.model_dump()
    assert Topology.model_validate(topo.model_dump()) == topo
    assert Topology.model_validate_json(topo.model_dump_json()) == topo


# -- lookups, defaults and overrides ---------------------------------------------------------

MINIMAL = """
    sites:
      - code: CEN
        type: central
      - code: P01
        type: primary
        parent: CEN
        clients: 5
        workload: {inventory_interval: 1.0, object_interval: 0}
      - code: S01
        type: secondary
        parent: CEN
        workload: {status_interval: 7}
"""


def test_defaults_apply_when_keys_are_absent() -> None:
    topo = parse(MINIMAL)
    assert topo.lab == "lab"
    assert topo.mode == "sms20"
    assert topo.settings.queue_type == "classic"
    assert topo.settings.txn_margin == 20
    assert topo.defaults.clients == 3
    assert topo.clients_of("CEN") == 3
    assert topo.clients_of("P01") == 5


def test_workload_override_merges_over_defaults() -> None:
    topo = parse(MINIMAL)
    p01 = topo.workload_of("P01")
    assert p01.inventory_interval == 1.0
    assert p01.object_interval == 0.0
    assert p01.discovery_interval == topo.defaults.workload.discovery_interval
    assert p01.scf_interval == topo.defaults.workload.scf_interval
    assert topo.workload_of("CEN") == topo.defaults.workload


def test_secondary_never_has_admin_actions() -> None:
    topo = parse(MINIMAL)
    s01 = topo.workload_of("S01")
    assert s01.status_interval == 7.0
    assert s01.object_interval == 0.0
    assert s01.inventory_interval == topo.defaults.workload.inventory_interval


def test_secondary_under_central_is_allowed() -> None:
    assert parse(MINIMAL).parent("S01") == "CEN"


def test_override_round_trip_keeps_only_given_keys() -> None:
    topo = parse(MINIMAL)
    text = topo.to_yaml()
    assert parse_topology(text) == topo
    p01 = next(s for s in parse_topology(text).sites if s.code == "P01")
    assert p01.workload is not None
    assert p01.workload.model_dump(exclude_none=True) == {
        "inventory_interval": 1.0,
        "object_interval": 0.0,
    }


def test_lookups_follow_model_copy_and_do_not_affect_equality() -> None:
    topo = parse(MINIMAL)
    fresh = parse(MINIMAL)
    topo.subtree("CEN")  # fills the lookup cache of one of them only
    assert topo == fresh
    trimmed = topo.model_copy(update={"sites": topo.sites[:2]})
    assert trimmed.children("CEN") == ["P01"]
    with pytest.raises(ConfigError):
        trimmed.site("S01")


def test_unknown_site_lookup() -> None:
    topo = parse(MINIMAL)
    with pytest.raises(ConfigError, match=r"unknown site X99; sites in this lab: CEN, P01, S01"):
        topo.site("X99")
    with pytest.raises(ConfigError, match="unknown site"):
        topo.children("X99")


def test_models_are_built_directly_too() -> None:
    topo = Topology(
        lab="direct",
        sites=[
            SiteSpec(code="CEN", type="central"),
            SiteSpec(code="P01", type="primary", parent="CEN"),
        ],
    )
    assert topo.children("CEN") == ["P01"]
    with pytest.raises(ValueError, match="HMAN 3301"):
        Topology(sites=[SiteSpec(code="CEN", type="central"), SiteSpec(code="CEN", type="primary")])


# -- refusals: site codes and keys -------------------------------------------------------------


def test_bad_site_code() -> None:
    err = refused("""
        sites:
          - code: CEN
            type: central
          - code: p1
            type: primary
            parent: CEN
    """)
    assert first_line(err) == (
        "t.yaml:4: sites[1].code: bad site code 'p1': "
        "a site code is exactly 3 characters A-Z or 0-9"
    )


@pytest.mark.parametrize("code", ["P0", "P001", "P-1", "p01", "P 1"])
def test_bad_site_code_variants(code: str) -> None:
    err = refused(f"""
        sites:
          - {{code: "{code}", type: central}}
    """)
    assert first_line(err).startswith(f"t.yaml:2: sites[0].code: bad site code {code!r}")


def test_code_yaml_reads_as_number_says_so() -> None:
    err = refused("""
        sites:
          - {code: CEN, type: central}
          - {code: 001, type: primary, parent: CEN}
    """)
    assert first_line(err).startswith("t.yaml:3: sites[1].code: bad site code 1:")
    assert "(YAML read 001 as 1)" in first_line(err)
    assert '"001"' in (err.hint or "")


def test_quoted_numeric_code_is_fine() -> None:
    topo = parse("""
        sites:
          - {code: "001", type: central}
          - {code: "002", type: primary, parent: "001"}
    """)
    assert topo.children("001") == ["002"]


def test_bad_parent_code() -> None:
    err = refused("""
        sites:
          - {code: CEN, type: central}
          - code: P01
            type: primary
            parent: cen
    """)
    assert first_line(err) == (
        "t.yaml:5: sites[1].parent: bad site code 'cen': "
        "a site code is exactly 3 characters A-Z or 0-9"
    )


def test_unknown_site_key_is_named() -> None:
    err = refused("""
        sites:
          - code: CEN
            type: central
          - code: P01
            type: primary
            prent: CEN
    """)
    assert first_line(err) == "t.yaml:6: sites[1].prent: unknown key 'prent'"
    assert "parent" in (err.hint or "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("colour: blue\nsites: [{code: CEN, type: central}]\n", "t.yaml:1: colour: unknown key"),
        (
            "settings:\n  windw: 10\nsites: [{code: CEN, type: central}]\n",
            "t.yaml:2: settings.windw: unknown key 'windw'",
        ),
        (
            "defaults:\n  workload:\n    inventory: 1\nsites: [{code: CEN, type: central}]\n",
            "t.yaml:3: defaults.workload.inventory: unknown key 'inventory'",
        ),
        (
            "sites:\n  - code: CEN\n    type: central\n    workload: {scf: 1}\n",
            "t.yaml:4: sites[0].workload.scf: unknown key 'scf'",
        ),
    ],
)
def test_unknown_keys_everywhere(text: str, expected: str) -> None:
    err = refused(text)
    assert first_line(err).startswith(expected)
    assert (err.hint or "").startswith("allowed keys here:")


def test_missing_site_type() -> None:
    err = refused("""
        sites:
          - code: CEN
            type: central
          - code: P01
            parent: CEN
    """)
    assert first_line(err) == "t.yaml:4: sites[1].type: required key 'type' is missing"


def test_bad_site_type() -> None:
    err = refused("""
        sites:
          - {code: CEN, type: central}
          - {code: P01, type: tertiary, parent: CEN}
    """)
    assert first_line(err).startswith("t.yaml:3: sites[1].type: Input should be")
    assert "'tertiary'" in first_line(err)


def test_duplicate_yaml_key() -> None:
    err = refused("""
        sites:
          - code: CEN
            type: central
          - code: P01
            type: primary
            parent: CEN
            parent: P02
    """)
    assert first_line(err) == "t.yaml:7: key 'parent' written twice in one mapping (also at line 6)"


def test_several_errors_are_all_listed_first_line_first() -> None:
    err = refused("""
        lab: Bad Name
        sites:
          - {code: CEN, type: central}
          - {code: p1, type: primary, parent: CEN}
    """)
    lines = str(err).splitlines()
    assert lines[0].startswith("t.yaml:1: lab: bad lab name 'Bad Name'")
    assert lines[1] == "also:"
    assert lines[2].startswith("  t.yaml:4: sites[1].code: bad site code 'p1'")


# -- refusals: the hierarchy -------------------------------------------------------------------


def test_duplicate_site_code_is_hman_3301() -> None:
    err = refused("""
        sites:
          - code: CEN
            type: central
          - code: P01
            type: primary
            parent: CEN
          - code: P01
            type: primary
            parent: CEN
    """)
    assert first_line(err) == "t.yaml:7: HMAN 3301: duplicate site code P01 (also at line 4)"


def test_duplicate_beats_other_problems() -> None:
    err = refused("""
        sites:
          - {code: CEN, type: central}
          - {code: CEN, type: secondary, parent: S99}
    """)
    assert first_line(err) == "t.yaml:3: HMAN 3301: duplicate site code CEN (also at line 2)"


def test_no_central() -> None:
    err = refused("""
        sites:
          - {code: CEN, type: primary}
          - {code: P01, type: primary, parent: CEN}
    """)
    assert first_line(err) == (
        "t.yaml:2: site CEN: a primary site must have a parent (and the lab has no central site)"
    )
    assert "make it 'type: central'" in (err.hint or "")


def test_two_centrals() -> None:
    err = refused("""
        sites:
          - code: CEN
            type: central
          - code: CE2
            type: central
    """)
    assert first_line(err) == (
        "t.yaml:5: site CE2: a lab has exactly one central site and "
        "CEN (at line 3) is already the central site"
    )


def test_central_with_parent() -> None:
    err = refused("""
        sites:
          - code: P01
            type: primary
            parent: CEN
          - code: CEN
            type: central
            parent: P01
    """)
    assert (
        first_line(err) == "t.yaml:7: site CEN: the central site has no parent (it says parent P01)"
    )


@pytest.mark.parametrize("kind", ["primary", "secondary"])
def test_missing_parent(kind: str) -> None:
    err = refused(f"""
        sites:
          - code: CEN
            type: central
          - code: X01
            type: {kind}
    """)
    assert first_line(err) == f"t.yaml:4: site X01: a {kind} site must have a parent"


def test_unknown_parent() -> None:
    err = refused("""
        sites:
          - code: CEN
            type: central
          - code: P01
            type: primary
            parent: CEN
          - code: S09
            type: secondary
            parent: P07
    """)
    assert first_line(err) == "t.yaml:9: site S09: parent P07 is not in the topology"
    assert "CEN, P01, S09" in (err.hint or "")


def test_secondary_under_secondary() -> None:
    err = refused("""
        sites:
          - {code: CEN, type: central}
          - {code: P01, type: primary, parent: CEN}
          - {code: S01, type: secondary, parent: P01}
          - {code: S02, type: secondary, parent: S01}
    """)
    assert first_line(err) == "t.yaml:5: secondary site S02 cannot report to secondary site S01"


def test_primary_under_secondary() -> None:
    err = refused("""
        sites:
          - {code: CEN, type: central}
          - {code: S01, type: secondary, parent: CEN}
          - {code: P02, type: primary, parent: S01}
    """)
    assert first_line(err) == (
        "t.yaml:4: site P02: parent S01 is a secondary site; secondary sites cannot have children"
    )


def test_loop_is_hman_3300() -> None:
    err = refused("""
        sites:
          - code: CEN
            type: central
          - code: P01
            type: primary
            parent: P02
          - code: P02
            type: primary
            parent: P01
    """)
    assert first_line(err) == (
        "t.yaml:6: HMAN 3300: site P01 is trying to report to a site that already reports "
        "to site P01 (loop P01 -> P02 -> P01)"
    )


def test_loop_without_any_central_is_still_a_loop() -> None:
    err = refused("""
        sites:
          - {code: P03, type: primary, parent: P01}
          - {code: P01, type: primary, parent: P02}
          - {code: P02, type: primary, parent: P03}
    """)
    assert first_line(err) == (
        "t.yaml:2: HMAN 3300: site P03 is trying to report to a site that already reports "
        "to site P03 (loop P03 -> P01 -> P02 -> P03)"
    )


def test_loop_hanging_below_a_tree_reports_only_the_loop() -> None:
    err = refused("""
        sites:
          - {code: CEN, type: central}
          - {code: P01, type: primary, parent: CEN}
          - {code: P05, type: primary, parent: P06}
          - {code: P06, type: primary, parent: P07}
          - {code: P07, type: primary, parent: P06}
          - {code: S01, type: secondary, parent: P05}
    """)
    assert str(err) == (
        "t.yaml:5: HMAN 3300: site P06 is trying to report to a site that already reports "
        "to site P06 (loop P06 -> P07 -> P06)"
    )


def test_site_reporting_to_itself() -> None:
    err = refused("""
        sites:
          - {code: CEN, type: central}
          - {code: P01, type: primary, parent: P01}
    """)
    assert first_line(err) == (
        "t.yaml:3: HMAN 3300: site P01 is trying to report to a site that already reports "
        "to site P01 (loop P01 -> P01)"
    )


def test_two_loops_are_both_listed() -> None:
    err = refused("""
        sites:
          - {code: CEN, type: central}
          - {code: P01, type: primary, parent: P02}
          - {code: P02, type: primary, parent: P01}
          - {code: P03, type: primary, parent: P04}
          - {code: P04, type: primary, parent: P03}
    """)
    lines = str(err).splitlines()
    assert "(loop P01 -> P02 -> P01)" in lines[0]
    assert lines[2].startswith("  t.yaml:5: HMAN 3300: site P03")


# -- refusals: settings, values, documents ---------------------------------------------------


def test_failed_after_must_exceed_degraded_after() -> None:
    err = refused("""
        settings:
          degraded_after: 10
          failed_after: 10
        sites: [{code: CEN, type: central}]
    """)
    assert first_line(err) == (
        "t.yaml:3: settings.failed_after: must be greater than degraded_after (10), got 10"
    )


@pytest.mark.parametrize(
    ("body", "path", "line"),
    [
        ("settings:\n  sync_interval: 0\n", "settings.sync_interval", 2),
        ("settings:\n  resend_after: -1\n", "settings.resend_after", 2),
        (
            "defaults:\n  workload:\n    status_interval: -1\n",
            "defaults.workload.status_interval",
            3,
        ),
        ("defaults:\n  clients: -2\n", "defaults.clients", 2),
        ("settings:\n  queue_type: mirrored\n", "settings.queue_type", 2),
        ("mode: paranoid\n", "mode", 1),
    ],
)
def test_bad_values(body: str, path: str, line: int) -> None:
    err = refused(body + "sites: [{code: CEN, type: central}]\n")
    assert first_line(err).startswith(f"t.yaml:{line}: {path}: ")


def test_zero_intervals_disable() -> None:
    topo = parse("""
        defaults:
          workload: {inventory_interval: 0, discovery_interval: 0}
        sites: [{code: CEN, type: central}]
    """)
    assert topo.workload_of("CEN").inventory_interval == 0.0


def test_site_override_interval_is_checked() -> None:
    err = refused("""
        sites:
          - code: CEN
            type: central
            workload:
              scf_interval: -5
    """)
    assert first_line(err).startswith("t.yaml:5: sites[0].workload.scf_interval: ")


def test_bad_lab_name() -> None:
    err = refused("lab: Demo_Lab\nsites: [{code: CEN, type: central}]\n")
    assert first_line(err).startswith("t.yaml:1: lab: bad lab name 'Demo_Lab'")


def test_no_sites() -> None:
    assert first_line(refused("lab: demo\n")) == "t.yaml:1: sites: required key 'sites' is missing"
    assert first_line(refused("lab: demo\nsites: []\n")).startswith(
        "t.yaml:2: sites: a lab needs at least one site"
    )


def test_yaml_syntax_error_has_line() -> None:
    err = refused("""
        lab: demo
        sites:
          - code: CEN
            type: "central
    """)
    assert first_line(err).startswith("t.yaml:5: YAML syntax error:")


def test_document_must_be_a_mapping() -> None:
    err = refused("""
        # a comment
        - code: CEN
          type: central
    """)
    assert first_line(err).startswith("t.yaml:2: the topology must be a YAML mapping")


def test_empty_document() -> None:
    assert first_line(refused("# nothing\n")) == "t.yaml:1: the topology is empty"


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_topology(tmp_path / "nope.yaml")


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sites:\n  - {code: CEN, type: central}\n  - {code: CEN, type: primary}\n")
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    assert str(info.value).startswith(f"{path}:3: HMAN 3301: duplicate site code CEN")


def test_a_setting_out_of_range_is_not_told_that_zero_disables_it(tmp_path: Path) -> None:
    # sync_interval must be > 0; only a workload interval of 0 disables its kind of event
    path = tmp_path / "t.yaml"
    path.write_text("lab: t\nsites:\n  - {code: CEN, type: central}\nsettings:\n  sync_interval: -1\n")
    with pytest.raises(ConfigError) as bad:
        load_topology(path)
    assert "t.yaml:5" in str(bad.value) and "0 disables" not in (bad.value.hint or "")
    path.write_text("lab: t\ndefaults:\n  workload: {inventory_interval: -1}\nsites:\n  - {code: CEN, type: central}\n")
    with pytest.raises(ConfigError) as bad:
        load_topology(path)
    assert "t.yaml:3" in str(bad.value) and "0 disables" in (bad.value.hint or "")
