"""AWS emulators for the tests: kinesalite and dynalite (npm), moto's server (PyPI), plus boto3 helpers.

Every server listens on 127.0.0.1 only. kinesalite (Kinesis) and dynalite (DynamoDB) run as Node subprocesses,
each in its own process group; moto runs in-process in a background thread (``moto.server.ThreadedMotoServer``).
The lease and consumer tests keep their leases on dynalite, which applies a conditional write atomically by
itself (moto needs a lock for that: see ``MotoServer``).

The boto3 helpers pass fake credentials explicitly, so they work whatever the environment holds;
``FAKE_AWS_ENV`` is what the ``aws_credentials`` fixture puts into ``os.environ`` for code under test.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any, Self

import boto3
import botocore.config

from treasure_engine._demo._embedded import EmbeddedAWS

REGION = "us-east-1"
FAKE_AWS_ENV: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
# Variables that could make a client talk to something else than the emulator.
UNSET_AWS_ENV: tuple[str, ...] = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_KINESIS",
    "AWS_ENDPOINT_URL_DYNAMODB",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)

EMULATORS_DIR = Path(__file__).resolve().parent.parent / "emulators"
NODE_MODULES = EMULATORS_DIR / "node_modules"
KINESALITE_CLI = NODE_MODULES / "kinesalite" / "cli.js"
# Wrapper around kinesalite that binds 127.0.0.1 only (cli.js binds every interface).
KINESALITE_SERVE = EMULATORS_DIR / "serve.js"
DYNALITE_CLI = NODE_MODULES / "dynalite" / "cli.js"
# Wrapper around dynalite that binds 127.0.0.1 only and accepts --port 0 (cli.js turns 0 into 4567).
DYNALITE_SERVE = EMULATORS_DIR / "serve-dynalite.js"
INSTALL_HINT = "run `npm ci --prefix tests/emulators` (Node >= 20) to install kinesalite and dynalite"


def kinesalite_installed() -> bool:
    return KINESALITE_CLI.is_file()


def dynalite_installed() -> bool:
    return DYNALITE_CLI.is_file()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (racy by nature; prefer port 0 where possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing answers on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


class _NodeEmulator:
    """An npm emulator served by one of the ``serve*.js`` wrappers on 127.0.0.1, in its own process group.

    ``port=None`` lets the OS pick the port (read back from the wrapper's "Listening at" line), so there is no
    free-port race. ``.endpoint_url``, ``.port``, ``.output``, ``.stop()``; usable as a context manager.
    """

    name = "emulator"
    serve: Path
    installed_marker: Path

    def __init__(self, port: int | None, *, node: str, start: bool, startup_timeout: float) -> None:
        self.port = port or 0
        self.node = node
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._output: list[str] = []
        self._reader: threading.Thread | None = None
        if start:
            self.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _options(self) -> list[str]:
        return []

    def start(self) -> None:
        if not self.installed_marker.is_file():
            raise RuntimeError(f"{self.name} is not installed in {NODE_MODULES}: {INSTALL_HINT}")
        cmd = [self.node, str(self.serve), "--host", "127.0.0.1", "--port", str(self.port), *self._options()]
        self._output = []
        self.proc = subprocess.Popen(
            cmd,
            cwd=EMULATORS_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() kills the whole group
        )
        listening = threading.Event()
        assert self.proc.stdout is not None
        self._reader = threading.Thread(
            target=self._pump, args=(self.proc.stdout, listening), name=f"{self.name}-output", daemon=True
        )
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout
        while not listening.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = "".join(self._output)
                self.stop()
                raise RuntimeError(f"{self.name} did not start ({' '.join(cmd)}):\n{out}")
        wait_for_port(self.port, timeout=max(1.0, deadline - time.monotonic()))

    def _pump(self, stream: IO[bytes], listening: threading.Event) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            if len(self._output) < 1000:
                self._output.append(line)
            m = re.search(r"Listening at https?://[^\s]*:(\d+)", line)
            if m and not listening.is_set():
                self.port = int(m.group(1))
                listening.set()
        stream.close()

    @property
    def output(self) -> str:
        """What the emulator printed so far (first 1000 lines)."""
        return "".join(self._output)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.endpoint_url})"


class Kinesalite(_NodeEmulator):
    """A kinesalite server (in-memory store) on 127.0.0.1.

    ``Kinesalite(port=None, *, shard_limit=1000, stream_ms=0, start=True)``; ``.endpoint_url``,
    ``.port``, ``.stop()``; usable as a context manager. ``port=None`` lets the OS pick the port
    (read back from kinesalite's "Listening at" line), so there is no free-port race.
    """

    name = "kinesalite"
    serve = KINESALITE_SERVE
    installed_marker = KINESALITE_CLI

    def __init__(
        self,
        port: int | None = None,
        *,
        shard_limit: int = 1000,
        stream_ms: int = 0,
        node: str = "node",
        start: bool = True,
        startup_timeout: float = 20.0,
    ) -> None:
        self.shard_limit = shard_limit
        self.stream_ms = stream_ms
        super().__init__(port, node=node, start=start, startup_timeout=startup_timeout)

    def _options(self) -> list[str]:
        ms = str(self.stream_ms)
        return [
            "--createStreamMs", ms,
            "--deleteStreamMs", ms,
            "--updateStreamMs", ms,
            "--shardLimit", str(self.shard_limit),
        ]  # fmt: skip


class Dynalite(_NodeEmulator):
    """A dynalite server (DynamoDB, in-memory store) on 127.0.0.1.

    ``Dynalite(port=None, *, table_ms=0, start=True)``; ``.endpoint_url``, ``.port``, ``.stop()``; usable as a
    context manager. ``table_ms`` is how long a table stays CREATING/DELETING/UPDATING (dynalite's default is
    500 ms; 0 makes CreateTable answer ACTIVE at once). dynalite applies a condition and its write under one
    lock per item (as DynamoDB does), so nothing is patched: what the lease tests see is what the code does.
    """

    name = "dynalite"
    serve = DYNALITE_SERVE
    installed_marker = DYNALITE_CLI

    def __init__(
        self,
        port: int | None = None,
        *,
        table_ms: int = 0,
        node: str = "node",
        start: bool = True,
        startup_timeout: float = 20.0,
    ) -> None:
        self.table_ms = table_ms
        super().__init__(port, node=node, start=start, startup_timeout=startup_timeout)

    def _options(self) -> list[str]:
        ms = str(self.table_ms)
        return ["--createTableMs", ms, "--deleteTableMs", ms, "--updateTableMs", ms]


class MotoServer(EmbeddedAWS):
    """The package's embedded endpoint (moto's server in-process, a werkzeug thread, on 127.0.0.1), started at
    construction, with two test-only extras. Serves every moto service
    (Kinesis, DynamoDB, ...) on one port; state is shared by every client of the server.

    ``MotoServer(port=None, *, fast_put=True, start=True)``; ``.endpoint_url``, ``.port``, ``.reset()``,
    ``.stop()``.

    ``fast_put``: moto's Kinesis ``Shard.put_record`` finds the last sequence number with
    ``list(self.records.keys())[-1]``, O(records in the shard) per record, so PutRecords slows down
    quadratically (about 900 records/s once a shard holds 100,000). This replaces that lookup, in
    this process, with the O(1) ``next(reversed(self.records))``: same result, no change in
    semantics (moto still loses records under concurrent PutRecords to one shard).

    DynamoDB's conditional writes are atomic per item, as on AWS, only because ``EmbeddedAWS`` serializes moto's
    DynamoDB calls (a lock patched into moto, in this process): the lease tests that also run on moto depend on it.
    Their default backend is ``Dynalite``, which needs no patch.
    """

    def __init__(self, port: int | None = None, *, fast_put: bool = True, start: bool = True) -> None:
        super().__init__(port)
        self.fast_put = fast_put
        if start:
            self.start()

    def start(self) -> MotoServer:
        if self.fast_put:
            _patch_moto_kinesis_put()
        super().start()
        wait_for_port(self.port)
        return self

    def reset(self) -> None:
        """Drop every resource in every backend (moto's /moto-api/reset)."""
        import urllib.request

        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST", data=b"")
        with _no_proxy_opener().open(req, timeout=10) as resp:
            resp.read()

    def __enter__(self) -> MotoServer:
        return self  # started at construction

    def __repr__(self) -> str:
        return f"MotoServer({self.endpoint_url})"


def _patch_moto_kinesis_put() -> None:
    from moto.kinesis.models import Shard

    if getattr(Shard.get_max_sequence_number, "_treasure_fast", False):
        return

    def get_max_sequence_number(self: Any) -> int:
        while True:  # another request thread may insert between reversed() and next()
            try:
                return int(next(reversed(self.records)))
            except StopIteration:
                return 0
            except RuntimeError:  # "OrderedDict mutated during iteration"
                continue

    get_max_sequence_number._treasure_fast = True  # type: ignore[attr-defined]
    Shard.get_max_sequence_number = get_max_sequence_number  # type: ignore[method-assign]


def _no_proxy_opener() -> Any:
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ---------------------------------------------------------------------------------------------
# boto3 helpers


_SESSION_LOCK = threading.Lock()
_SESSION: Any = None


def _session() -> Any:
    # One shared boto3 session (its loader caches the service models: a client then costs ~5 ms
    # instead of ~70 ms). Sessions are not thread-safe, so clients are created under a lock.
    global _SESSION
    if _SESSION is None:
        _SESSION = boto3.session.Session()
    return _SESSION


def kinesis_client(endpoint_url: str, *, timeout: float = 30.0, retries: int = 0, **kwargs: Any) -> Any:
    """A boto3 Kinesis client for an emulator (fake credentials, no proxies, retries off by default
    so that failures show up instead of being retried away). Clients are thread-safe."""
    config = botocore.config.Config(
        region_name=REGION,
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"max_attempts": retries, "mode": "standard"} if retries else {"total_max_attempts": 1},
        proxies={},
        max_pool_connections=kwargs.pop("max_pool_connections", 32),
    )
    with _SESSION_LOCK:
        return _session().client(
            "kinesis",
            endpoint_url=endpoint_url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            aws_session_token="testing",
            config=config,
            **kwargs,
        )


def wait_stream_active(endpoint_url: str, name: str, timeout: float = 30.0, client: Any = None) -> dict[str, Any]:
    client = client or kinesis_client(endpoint_url)
    deadline = time.monotonic() + timeout
    while True:
        desc = client.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
        if desc["StreamStatus"] == "ACTIVE":
            return dict(desc)
        if time.monotonic() > deadline:
            raise TimeoutError(f"stream {name} still {desc['StreamStatus']} after {timeout}s")
        time.sleep(0.02)


def create_stream(endpoint_url: str, name: str, shards: int = 1, timeout: float = 30.0) -> dict[str, Any]:
    """Create a stream and wait until it is ACTIVE; returns DescribeStreamSummary's description."""
    client = kinesis_client(endpoint_url)
    client.create_stream(StreamName=name, ShardCount=shards)
    return wait_stream_active(endpoint_url, name, timeout, client)


def delete_stream(endpoint_url: str, name: str) -> None:
    client = kinesis_client(endpoint_url)
    with contextlib.suppress(client.exceptions.ResourceNotFoundException):
        client.delete_stream(StreamName=name, EnforceConsumerDeletion=True)


def list_shards(endpoint_url: str, name: str) -> list[dict[str, Any]]:
    """All shards (open and closed) in shard-id order, following NextToken."""
    client = kinesis_client(endpoint_url)
    shards: list[dict[str, Any]] = []
    resp = client.list_shards(StreamName=name)
    shards.extend(resp["Shards"])
    while resp.get("NextToken"):
        resp = client.list_shards(NextToken=resp["NextToken"])
        shards.extend(resp["Shards"])
    return shards


def open_shards(endpoint_url: str, name: str) -> list[dict[str, Any]]:
    return [s for s in list_shards(endpoint_url, name) if "EndingSequenceNumber" not in s["SequenceNumberRange"]]


def _hash_range(shard: dict[str, Any]) -> tuple[int, int]:
    r = shard["HashKeyRange"]
    return int(r["StartingHashKey"]), int(r["EndingHashKey"])


def split_shard(
    endpoint_url: str,
    name: str,
    shard_id: str,
    new_starting_hash_key: int | None = None,
    timeout: float = 30.0,
) -> list[str]:
    """Split ``shard_id`` (at the middle of its hash range by default), wait until the stream is ACTIVE
    again, and return the two child shard ids (lower range first). Use kinesalite for resharding:
    moto keeps writing to a closed parent."""
    before = {s["ShardId"] for s in list_shards(endpoint_url, name)}
    shard = next(s for s in list_shards(endpoint_url, name) if s["ShardId"] == shard_id)
    lo, hi = _hash_range(shard)
    key = new_starting_hash_key if new_starting_hash_key is not None else (lo + hi + 1) // 2
    client = kinesis_client(endpoint_url)
    client.split_shard(StreamName=name, ShardToSplit=shard_id, NewStartingHashKey=str(key))
    wait_stream_active(endpoint_url, name, timeout, client)
    children = [s for s in list_shards(endpoint_url, name) if s["ShardId"] not in before]
    children.sort(key=lambda s: _hash_range(s)[0])
    return [s["ShardId"] for s in children]


def merge_shards(endpoint_url: str, name: str, shard_id: str, adjacent_shard_id: str, timeout: float = 30.0) -> str:
    """Merge two adjacent shards, wait until ACTIVE, return the child shard id."""
    before = {s["ShardId"] for s in list_shards(endpoint_url, name)}
    client = kinesis_client(endpoint_url)
    client.merge_shards(StreamName=name, ShardToMerge=shard_id, AdjacentShardToMerge=adjacent_shard_id)
    wait_stream_active(endpoint_url, name, timeout, client)
    (child,) = [s["ShardId"] for s in list_shards(endpoint_url, name) if s["ShardId"] not in before]
    return str(child)


def put_records(
    endpoint_url: str,
    name: str,
    records: Iterable[tuple[str, bytes]] | Sequence[dict[str, Any]],
    *,
    client: Any = None,
) -> dict[str, Any]:
    """One PutRecords call; ``records`` are (partition_key, data) pairs or boto3-shaped entries."""
    client = client or kinesis_client(endpoint_url)
    entries = [r if isinstance(r, dict) else {"PartitionKey": r[0], "Data": r[1]} for r in records]
    return dict(client.put_records(StreamName=name, Records=entries))
