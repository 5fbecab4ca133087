"""Object IDs on the command line are checked before anything is sent to a site."""

from __future__ import annotations

import pytest

from emulator.cli import build_parser


@pytest.mark.parametrize("verb", ["update", "delete"])
@pytest.mark.parametrize("bad", ["NOPE0001", "cen00001", "CEN0001", "CEN000012", ""])
def test_a_malformed_object_id_is_refused_by_the_cli(verb: str, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([verb, "P01", bad])
    assert done.value.code == 2
    assert "is not an object ID" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["update", "delete"])
def test_a_well_formed_object_id_is_taken(verb: str) -> None:
    assert build_parser().parse_args([verb, "P01", "P0100042"]).id == "P0100042"
