"""Fixtures: a broker (SMSLAB_AMQP_URL, else localhost, else a RabbitMQ container, else the
integration tests are skipped with the reason) and labs that are always brought down."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator.brokers import broker_for_tests
from emulator.testing import Lab

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    with broker_for_tests() as (url, reason):
        if url is None:
            if os.environ.get("CI", "").lower() in ("true", "1"):
                # Under CI a broker is always there: a skipped integration test would pass the run
                # silently, so it fails it instead.
                pytest.fail(f"CI: integration tests need RabbitMQ and none answers: {reason}", pytrace=False)
            pytest.skip(f"integration tests need RabbitMQ: {reason}")
        yield url


@pytest.fixture
def lab(tmp_path: Path, amqp_url: str) -> Iterator[Lab]:
    handle = Lab(tmp_path, amqp_url)
    try:
        yield handle
    finally:
        handle.down()


@pytest.fixture
def make_lab(tmp_path: Path, amqp_url: str) -> Iterator[object]:
    """Several labs in one test."""
    made: list[Lab] = []

    def factory(name: str) -> Lab:
        (tmp_path / name).mkdir()
        handle = Lab(tmp_path / name, amqp_url)
        made.append(handle)
        return handle

    try:
        yield factory
    finally:
        for handle in made:
            handle.down()
