"""Shared fixtures: Kinesis and DynamoDB emulators on 127.0.0.1, unique streams, a fault-injecting proxy.

Markers (declared in pyproject.toml): ``integration`` (needs a real endpoint started by a fixture: put
it on tests using the fixtures below), ``slow`` (chaos, soak), ``bench``.

Fixtures
--------
aws_credentials (session)   fake AWS env (AWS_ACCESS_KEY_ID=testing, AWS_DEFAULT_REGION=us-east-1, no
                            profile/endpoint overrides, NO_PROXY=127.0.0.1), restored afterwards. The
                            server fixtures depend on it, so code under test sees fake credentials.
kinesalite (session)        a ``tests.support.emulators.Kinesalite``: ``.endpoint_url``; in-memory, streams
                            ACTIVE at once, shard limit 1000. Needs ``npm ci --prefix tests/emulators``;
                            without it tests fail, or are skipped when TREASURE_ALLOW_SKIP=1.
dynalite (session)          a ``tests.support.emulators.Dynalite`` (DynamoDB): ``.endpoint_url``; in-memory,
                            tables ACTIVE at once. The lease and consumer tests keep their leases here, with no
                            patch (dynalite applies a condition and its write atomically per item). Installed
                            with kinesalite; fails or skips the same way.
dynamodb_endpoint           dynalite's endpoint URL: the DynamoDB the lease and consumer tests use by default.
dynamodb_backend (param)    "dynalite" or "moto": lease tests using it run against both (moto's DynamoDB is
                            made atomic by ``EmbeddedAWS``'s lock; dynalite needs none).
moto_server (session)       a ``MotoServer`` (moto's server in-process): ``.endpoint_url``, ``.reset()``.
kinesis_backend (param)     "kinesalite" or "moto": tests using it (or kinesis_endpoint) run against both.
kinesis_endpoint            the endpoint URL of the kinesis_backend server.
stream_factory (function)   ``make(endpoint_url, shards=1, *, prefix="s") -> str``: creates a uniquely
                            named stream, waits for ACTIVE, deletes it at teardown.
kinesalite_stream           a fresh 1-shard stream on kinesalite: its name.
fault_proxy (function)      a ``ThreadedFaultProxy`` (seed 0) in front of kinesalite, stopped afterwards.
async_fault_proxy           the same as an asyncio ``FaultProxy`` in the test's event loop.

Imports: tests use ``from tests.support.emulators import ...`` (this file puts the repository root
on sys.path).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.support.emulators import (  # noqa: E402
    FAKE_AWS_ENV,
    INSTALL_HINT,
    NODE_MODULES,
    UNSET_AWS_ENV,
    Dynalite,
    Kinesalite,
    MotoServer,
    create_stream,
    delete_stream,
    dynalite_installed,
    kinesalite_installed,
)
from tests.support.faultproxy import FaultProxy, ThreadedFaultProxy  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Producers without a state_dir keep their dead-letter queue under XDG_DATA_HOME: one per test."""
    data_home = tmp_path_factory.mktemp("xdg-data")
    monkeypatch.setenv("XDG_DATA_HOME", str(data_home))
    return data_home


@pytest.fixture(scope="session")
def aws_credentials() -> Iterator[dict[str, str]]:
    with pytest.MonkeyPatch.context() as mp:
        for name in UNSET_AWS_ENV:
            mp.delenv(name, raising=False)
        for name, value in FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        yield dict(FAKE_AWS_ENV)


def _require_npm_emulator(name: str, installed: bool) -> None:
    if installed:
        return
    msg = f"{name} is not installed ({NODE_MODULES} missing it): {INSTALL_HINT}"
    if os.environ.get("TREASURE_ALLOW_SKIP") == "1":
        pytest.skip(msg)
    pytest.fail(msg + " (set TREASURE_ALLOW_SKIP=1 to skip these tests instead)", pytrace=False)


def _require_kinesalite() -> None:
    _require_npm_emulator("kinesalite", kinesalite_installed())


@pytest.fixture(scope="session")
def kinesalite(aws_credentials: dict[str, str]) -> Iterator[Kinesalite]:
    _require_kinesalite()
    server = Kinesalite()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dynalite(aws_credentials: dict[str, str]) -> Iterator[Dynalite]:
    _require_npm_emulator("dynalite", dynalite_installed())
    server = Dynalite()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dynamodb_endpoint(dynalite: Dynalite) -> str:
    return dynalite.endpoint_url


@pytest.fixture(params=["dynalite", "moto"])
def dynamodb_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def moto_server(aws_credentials: dict[str, str]) -> Iterator[MotoServer]:
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["kinesalite", "moto"])
def kinesis_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def kinesis_endpoint(request: pytest.FixtureRequest, kinesis_backend: str) -> str:
    server = request.getfixturevalue("kinesalite" if kinesis_backend == "kinesalite" else "moto_server")
    return str(server.endpoint_url)


_stream_seq = itertools.count()


@pytest.fixture
def stream_factory(aws_credentials: dict[str, str]) -> Iterator[Callable[..., str]]:
    created: list[tuple[str, str]] = []
    run = uuid.uuid4().hex[:8]

    def make(endpoint_url: str, shards: int = 1, *, prefix: str = "s") -> str:
        name = f"{prefix}-{run}-{next(_stream_seq)}"
        create_stream(endpoint_url, name, shards)
        created.append((endpoint_url, name))
        return name

    yield make
    for endpoint_url, name in created:
        # The server may be gone already; the stream dies with it.
        with contextlib.suppress(Exception):
            delete_stream(endpoint_url, name)


@pytest.fixture
def kinesalite_stream(kinesalite: Kinesalite, stream_factory: Callable[..., str]) -> str:
    return stream_factory(kinesalite.endpoint_url, 1)


@pytest.fixture
def fault_proxy(kinesalite: Kinesalite) -> Iterator[ThreadedFaultProxy]:
    with ThreadedFaultProxy(kinesalite.endpoint_url, seed=0) as proxy:
        yield proxy


@pytest_asyncio.fixture
async def async_fault_proxy(kinesalite: Kinesalite) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(kinesalite.endpoint_url, seed=0) as proxy:
        yield proxy
