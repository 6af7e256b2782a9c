"""An embedded AWS endpoint (moto's server, in-process, on 127.0.0.1) for the demo and users' tests.

moto is an optional extra (`pip install treasure-engine[embedded]`), never a runtime dependency.
Known moto faults (see docs/internals.md): concurrent PutRecords to one shard can lose records, so callers
that write concurrently use `ordered=True` (one request in flight per shard) against it.
"""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import Any, Self

__all__ = ["EmbeddedAWS"]


class EmbeddedAWS:
    """Starts moto's threaded server on 127.0.0.1 and a free port; `endpoint_url` serves Kinesis and DynamoDB."""

    def __init__(self, port: int | None = None) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError("the embedded endpoint needs moto: pip install 'treasure-engine[embedded]'") from e
        self._server_class: Any = ThreadedMotoServer
        self.port = port or 0
        """The port served on; 0 until started when none was asked for (the kernel picks a free one)."""
        self._server: Any = None
        self._env: dict[str, str | None] = {}

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        # werkzeug logs every request at INFO; a burst would drown the user's output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        # moto accepts any credentials; make sure botocore finds some without touching the user's files.
        for key, value in (("AWS_ACCESS_KEY_ID", "embedded"), ("AWS_SECRET_ACCESS_KEY", "embedded")):
            if not os.environ.get(key):
                self._env[key] = os.environ.get(key)
                os.environ[key] = value
        _atomic_dynamodb_conditions()
        self._server = self._server_class(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = int(self._server.get_host_and_port()[1])
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            inner = server._server  # werkzeug's server
            server.stop()
            if inner is not None:
                inner.server_close()  # ThreadedMotoServer.stop() leaves the listening socket open
        for key, old in self._env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        self._env.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def create_stream(self, name: str, shards: int, region: str = "us-east-1") -> None:
        """Creates a stream on this endpoint and waits until it is ACTIVE."""
        create_stream(self.endpoint_url, name, shards, region)


def _atomic_dynamodb_conditions() -> None:
    """DynamoDB evaluates a condition and applies its write atomically per item; moto checks, then writes, with
    no lock, so two workers racing for one lease could both win. Serializes moto's DynamoDB item operations in
    this process (where the server runs) to restore the guarantee the lease table relies on."""
    import functools
    import threading

    from moto.dynamodb.models import DynamoDBBackend

    if getattr(DynamoDBBackend.update_item, "_treasure_atomic", False):
        return
    lock = threading.RLock()
    for name in ("create_table", "put_item", "update_item", "delete_item", "scan", "get_item"):
        original = getattr(DynamoDBBackend, name)

        def locked(*args: Any, __f: Any = original, **kwargs: Any) -> Any:
            with lock:
                return __f(*args, **kwargs)

        wrapped = functools.wraps(original)(locked)
        wrapped._treasure_atomic = True  # type: ignore[attr-defined]
        setattr(DynamoDBBackend, name, wrapped)


def create_stream(endpoint_url: str, name: str, shards: int, region: str = "us-east-1") -> None:
    """Creates a stream on any Kinesis endpoint (the embedded one, kinesalite, AWS) and waits until it is ACTIVE."""
    import boto3

    client = boto3.client("kinesis", endpoint_url=endpoint_url, region_name=region)
    client.create_stream(StreamName=name, ShardCount=shards)
    client.get_waiter("stream_exists").wait(StreamName=name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 150})
