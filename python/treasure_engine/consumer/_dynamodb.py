"""The DynamoDB plumbing of the lease table: a lean client (SigV4-signed JSON posts over aiohttp), and writes kept
to a bounded number in flight.

The lease table's calls (renewals every few seconds, checkpoints, takes, the scan) are small JSON documents.
Through aiobotocore each one ran botocore's whole pipeline (parameter validation against the service model,
serialisation, event hooks, signing, parsing) for about 0.75 ms of CPU, and creating the client loaded the
DynamoDB model and two SSL contexts, about 0.1 s of CPU at every consumer's start. This client sends the same
documents (DynamoDB's JSON protocol takes the low-level API's arguments as they are) and returns the decoded
answers, and raises botocore's `ClientError` with the fields botocore's parser would fill (`Error.Code`,
`Error.Message`, `ResponseMetadata.HTTPStatusCode`, and the modelled members of the error body, such as the
`Item` of a failed condition with `ReturnValuesOnConditionCheckFailure`), so the lease table judges answers as
before. Retries are the caller's (LeaseTable's retry budget).
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable, Sequence
from typing import Any, Self, TypeVar

import aiohttp
import orjson
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, NoCredentialsError

from treasure_engine import _sigv4
from treasure_engine.kinesis import load_credentials

T = TypeVar("T")

CONCURRENCY = 16
"""Writes one call (sync_shards, renew_all, rebalance, release_all) keeps in flight at once."""

CONTENT_TYPE = "application/x-amz-json-1.0"
TARGET_PREFIX = "DynamoDB_20120810."

# The low-level operations the lease table uses, by their botocore (snake_case) names.
OPERATIONS = {
    "create_table": "CreateTable",
    "describe_table": "DescribeTable",
    "delete_item": "DeleteItem",
    "get_item": "GetItem",
    "put_item": "PutItem",
    "scan": "Scan",
    "update_item": "UpdateItem",
}


class DynamoDBClient:
    """`await client.call("put_item", TableName=..., Item=...)`: the low-level operation's answer as a dict, or
    botocore's `ClientError` for an error answer. Network failures raise aiohttp's errors, `TimeoutError` or
    `OSError` as they come."""

    def __init__(self, *, region: str, endpoint_url: str | None, timeout_s: float, max_connections: int) -> None:
        self.region = region
        self.url = (endpoint_url or f"https://dynamodb.{region}.amazonaws.com").rstrip("/") + "/"
        self._signer = _sigv4.Signer("dynamodb", region, self.url)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._credentials: Credentials | None = None

    async def __aenter__(self) -> Self:
        # The chain may read files or call the instance metadata service: keep it off the loop.
        self._credentials = await asyncio.get_running_loop().run_in_executor(None, load_credentials)
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, auto_decompress=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        name = OPERATIONS[op]
        if self._session is None:
            raise RuntimeError("DynamoDBClient is not open")
        if self._credentials is None:
            raise NoCredentialsError()
        frozen = self._credentials.get_frozen_credentials()
        body = orjson.dumps(args)
        headers = self._signer.headers(
            _sigv4.Credentials(frozen.access_key, frozen.secret_key, frozen.token),
            TARGET_PREFIX + name,
            CONTENT_TYPE,
            _sigv4.sha256_hex(body),
        )
        async with self._session.post(self.url, data=body, headers=headers) as resp:
            payload = await resp.read()
            status = resp.status
        try:
            doc = orjson.loads(payload) if payload else {}
        except orjson.JSONDecodeError:
            doc = None
        if status == 200:
            if isinstance(doc, dict):
                return doc
            # A garbled answer (a proxy's, a cut connection's): a network fault, retried as one.
            raise aiohttp.ClientPayloadError(f"DynamoDB {name}: not a JSON object: {payload[:200]!r}")
        raise _client_error(name, status, doc if isinstance(doc, dict) else {}, payload)


def _client_error(op: str, status: int, doc: dict[str, Any], payload: bytes) -> ClientError:
    """The `ClientError` botocore raises for this answer: the code after the `#` of `__type`, the message."""
    code = str(doc.get("__type", "")).rpartition("#")[2]
    message = doc.get("message") or doc.get("Message")
    if not code and status != 200:
        code = str(status)
    if message is None:
        message = payload[:200].decode("utf-8", "replace") if not doc else ""
    members = {k: v for k, v in doc.items() if k not in ("__type", "message", "Message")}
    response: dict[str, Any] = {
        **members,
        "Error": {"Code": code, "Message": str(message)},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, op)


async def gather_bounded(aws: Sequence[Awaitable[T]], limit: int = CONCURRENCY) -> builtins.list[T]:
    sem = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[T]) -> T:
        async with sem:
            return await aw

    return list(await asyncio.gather(*(one(aw) for aw in aws)))
