"""The lean DynamoDB client (treasure_engine.consumer._dynamodb) against a scripted HTTP server on 127.0.0.1:
what it sends (a signed JSON-protocol POST carrying the low-level arguments as they are) and how each kind of
answer comes back (a dict, botocore's ClientError with the fields the lease table reads, or a network error for a
garbled 200).
The lease table's behaviour on a real emulator is tested in tests/integration/test_leases.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from botocore.exceptions import ClientError

from treasure_engine.consumer._dynamodb import DynamoDBClient

ITEM = {"shard_id": {"S": "shardId-0"}, "owner": {"S": "w2"}, "counter": {"N": "7"}}


class Scripted:
    def __init__(self) -> None:
        self.answers: list[tuple[int, bytes]] = []
        self.seen: list[tuple[dict[str, str], Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((dict(request.headers), orjson.loads(await request.read())))
        status, body = self.answers.pop(0)
        return web.Response(status=status, body=body, content_type="application/x-amz-json-1.0")


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Scripted, DynamoDBClient]]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    scripted = Scripted()
    app = web.Application()
    app.router.add_post("/", scripted.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = DynamoDBClient(region="eu-west-1", endpoint_url=f"http://127.0.0.1:{port}", timeout_s=5, max_connections=4)
    async with client:
        yield scripted, client
    await runner.cleanup()


async def test_sends_the_arguments_signed_and_returns_the_answer(server: tuple[Scripted, DynamoDBClient]) -> None:
    scripted, client = server
    scripted.answers.append((200, orjson.dumps({"Item": ITEM})))
    args = {"TableName": "t", "Key": {"shard_id": {"S": "shardId-0"}}, "ConsistentRead": True}
    assert await client.call("get_item", **args) == {"Item": ITEM}
    headers, body = scripted.seen[0]
    assert body == args
    assert headers["X-Amz-Target"] == "DynamoDB_20120810.GetItem"
    assert headers["Content-Type"] == "application/x-amz-json-1.0"
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDTEST/")
    assert "/eu-west-1/dynamodb/aws4_request" in headers["Authorization"]


async def test_a_failed_condition_is_a_client_error_with_the_old_item(server: tuple[Scripted, DynamoDBClient]) -> None:
    scripted, client = server
    error = {
        "__type": "com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException",
        "message": "The conditional request failed",
        "Item": ITEM,
    }
    scripted.answers.append((400, orjson.dumps(error)))
    with pytest.raises(ClientError) as info:
        await client.call("update_item", TableName="t")
    response = info.value.response
    assert response["Error"] == {"Code": "ConditionalCheckFailedException", "Message": "The conditional request failed"}
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert response.get("Item") == ITEM  # type: ignore[typeddict-item]
    assert info.value.operation_name == "UpdateItem"


async def test_a_5xx_without_json_keeps_its_status_and_text(server: tuple[Scripted, DynamoDBClient]) -> None:
    scripted, client = server
    scripted.answers.append((503, b"<html>Service Unavailable</html>"))
    with pytest.raises(ClientError) as info:
        await client.call("scan", TableName="t")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert info.value.response["Error"]["Code"] == "503"
    assert "Service Unavailable" in info.value.response["Error"]["Message"]


@pytest.mark.parametrize("body", [b"<garbage", b"[1, 2]", b'{"Item": '])
async def test_a_garbled_200_is_a_network_error_not_an_answer(
    server: tuple[Scripted, DynamoDBClient], body: bytes
) -> None:
    scripted, client = server
    scripted.answers.append((200, body))
    with pytest.raises(aiohttp.ClientPayloadError):
        await client.call("get_item", TableName="t")
