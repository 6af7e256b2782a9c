"""An embedded AWS endpoint (moto's server, in-process, on 127.0.0.1) for the demo and users' tests.

moto is an optional extra (`pip install treasure-engine[embedded]`), never a runtime dependency.
Known moto faults (see docs/internals.md): concurrent PutRecords to one shard can lose records, so callers
that write concurrently use `ordered=True` (one request in flight per shard) against it.
"""

from __future__ import annotations

import logging
import os
import socket
from types import TracebackType
from typing import Any, Self

__all__ = ["EmbeddedAWS"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedAWS:
    """Starts moto's threaded server on 127.0.0.1 and a free port; `endpoint_url` serves Kinesis and DynamoDB."""

    def __init__(self, port: int | None = None) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError("the embedded endpoint needs moto: pip install 'treasure-engine[embedded]'") from e
        self.port = port or _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._server: Any = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._env: dict[str, str | None] = {}

    def start(self) -> Self:
        # werkzeug logs every request at INFO; a burst would drown the user's output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        # moto accepts any credentials; make sure botocore finds some without touching the user's files.
        for key, value in (("AWS_ACCESS_KEY_ID", "embedded"), ("AWS_SECRET_ACCESS_KEY", "embedded")):
            if not os.environ.get(key):
                self._env[key] = os.environ.get(key)
                os.environ[key] = value
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()
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
        """Creates a stream and waits until it is ACTIVE."""
        import boto3

        client = boto3.client("kinesis", endpoint_url=self.endpoint_url, region_name=region)
        client.create_stream(StreamName=name, ShardCount=shards)
        client.get_waiter("stream_exists").wait(StreamName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 100})
