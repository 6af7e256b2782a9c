"""The test infrastructure itself: emulators, the fault proxy, the reference reader."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import threading
from collections.abc import Callable

import aiobotocore.session
import aiohttp
import botocore.exceptions
import pytest
from aiohttp import web
from aws_kinesis_agg.aggregator import RecordAggregator
from tests.support.emulators import (
    REGION,
    Dynalite,
    Kinesalite,
    MotoServer,
    kinesis_client,
    list_shards,
    merge_shards,
    open_shards,
    split_shard,
)
from tests.support.faultproxy import FaultProxy, ThreadedFaultProxy
from tests.support.kinesis_reader import AggregateError, read_all

pytestmark = pytest.mark.integration


def _records(n: int, tag: str = "r") -> list[dict[str, object]]:
    return [{"PartitionKey": f"pk-{i}", "Data": f"{tag}-{i:06d}".encode().ljust(100, b".")} for i in range(n)]


def test_servers_serve_create_put_get(kinesis_endpoint: str, stream_factory: Callable[..., str]) -> None:
    stream = stream_factory(kinesis_endpoint, 2)
    client = kinesis_client(kinesis_endpoint)
    sent = _records(300)
    for i in range(0, len(sent), 100):
        resp = client.put_records(StreamName=stream, Records=sent[i : i + 100])
        assert resp["FailedRecordCount"] == 0
    got = read_all(kinesis_endpoint, stream)
    assert sorted(r["data"] for r in got) == sorted(r["Data"] for r in sent)  # type: ignore[type-var]
    assert {r["shard_id"] for r in got} == {s["ShardId"] for s in list_shards(kinesis_endpoint, stream)}
    for shard in {r["shard_id"] for r in got}:
        seqs = [int(r["sequence_number"]) for r in got if r["shard_id"] == shard]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)


def test_servers_stop_and_free_their_port(kinesalite: Kinesalite) -> None:
    for server in (Kinesalite(), MotoServer()):
        port = server.port
        kinesis_client(server.endpoint_url).list_streams()
        server.stop()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"{server!r} still listening"


def test_dynalite_serves_on_its_own_port_and_stops(dynalite: Dynalite) -> None:
    import boto3

    server = Dynalite()
    port = server.port
    assert port not in (0, 4567, dynalite.port)  # --port 0 honoured (dynalite's cli.js would take 4567)
    client = boto3.client(
        "dynamodb", endpoint_url=server.endpoint_url, region_name=REGION,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    assert client.list_tables()["TableNames"] == []
    server.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"{server!r} still listening"


def test_kinesalite_resharding_and_reader_follows_closed_shards(
    kinesalite: Kinesalite, stream_factory: Callable[..., str]
) -> None:
    ep = kinesalite.endpoint_url
    stream = stream_factory(ep, 1)
    client = kinesis_client(ep)
    client.put_records(StreamName=stream, Records=_records(50, "a"))
    (parent,) = open_shards(ep, stream)
    low, high = split_shard(ep, stream, parent["ShardId"])
    assert [s["ShardId"] for s in open_shards(ep, stream)] == [low, high]
    client.put_records(StreamName=stream, Records=_records(50, "b"))
    merged = merge_shards(ep, stream, low, high)
    client.put_records(StreamName=stream, Records=_records(50, "c"))
    got = read_all(ep, stream)
    assert len(got) == 150
    by_shard = {sid: [r["data"][:1] for r in got if r["shard_id"] == sid] for sid in (parent["ShardId"], low, high)}
    assert by_shard[parent["ShardId"]] == [b"a"] * 50
    assert sorted(by_shard[low] + by_shard[high]) == [b"b"] * 50
    assert [r["data"][:1] for r in got if r["shard_id"] == merged] == [b"c"] * 50


def test_reader_deaggregates_kpl_records(kinesalite: Kinesalite, stream_factory: Callable[..., str]) -> None:
    ep = kinesalite.endpoint_url
    stream = stream_factory(ep, 1)
    agg = RecordAggregator()
    for i in range(10):
        ehk = str(2**127) if i == 4 else None
        assert agg.add_user_record(f"pk-{i % 3}", f"user-{i}".encode(), explicit_hash_key=ehk) is None
    pk, ehk, blob = agg.clear_and_get().get_contents()
    client = kinesis_client(ep)
    client.put_record(StreamName=stream, PartitionKey=pk, Data=blob)
    client.put_record(StreamName=stream, PartitionKey="plain", Data=b"plain-record")
    got = read_all(ep, stream)
    assert [(r["sub_sequence_number"], r["partition_key"], r["data"]) for r in got[:10]] == [
        (i, f"pk-{i % 3}", f"user-{i}".encode()) for i in range(10)
    ]
    assert [r["explicit_hash_key"] for r in got[:10]] == [str(2**127) if i == 4 else None for i in range(10)]
    assert len({r["sequence_number"] for r in got[:10]}) == 1
    assert all(r["aggregated"] for r in got[:10])
    assert (got[10]["aggregated"], got[10]["data"], got[10]["partition_key"]) == (
        False,
        b"plain-record",
        "plain",
    )

    # A record with the KPL magic and a broken body is an error, not silently passed through.
    bad = blob[:-20] + b"\x00" * 4 + hashlib.md5(b"x").digest()
    client.put_record(StreamName=stream, PartitionKey="bad", Data=bad)
    with pytest.raises(AggregateError):
        read_all(ep, stream)


def test_fail_fraction_withholds_exactly_the_failed_records(
    kinesalite: Kinesalite, stream_factory: Callable[..., str], fault_proxy: ThreadedFaultProxy
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 4)
    fault_proxy.fail_fraction = 0.3
    client = kinesis_client(fault_proxy.endpoint_url)
    sent = _records(1000)
    ok, failed = set(), set()
    for i in range(0, len(sent), 500):
        batch = sent[i : i + 500]
        resp = client.put_records(StreamName=stream, Records=batch)
        assert len(resp["Records"]) == len(batch)
        assert resp["FailedRecordCount"] == sum(1 for r in resp["Records"] if "ErrorCode" in r)
        for entry, result in zip(batch, resp["Records"], strict=True):
            if "ErrorCode" in result:
                assert result["ErrorCode"] == "ProvisionedThroughputExceededException"
                assert result["ErrorMessage"].startswith("Rate exceeded for shard")
                assert "SequenceNumber" not in result
                failed.add(entry["Data"])
            else:
                assert result["SequenceNumber"]
                assert result["ShardId"].startswith("shardId-")
                ok.add(entry["Data"])
    present = [r["data"] for r in read_all(kinesalite.endpoint_url, stream)]
    assert len(present) == len(set(present))
    assert set(present) == ok
    snap = fault_proxy.snapshot()
    assert snap["records_withheld"] == len(failed)
    assert snap["records_forwarded"] == len(ok)
    assert 200 < len(failed) < 400
    assert snap["requests"]["PutRecords"] == 2
    assert {base64.b64decode(w["Data"]) for w in snap["withheld"]} == failed

    # Switched off at runtime: everything goes through again.
    fault_proxy.fail_fraction = 0.0
    assert client.put_records(StreamName=stream, Records=_records(10, "z"))["FailedRecordCount"] == 0


def test_fail_fraction_all_records(
    kinesalite: Kinesalite, stream_factory: Callable[..., str], fault_proxy: ThreadedFaultProxy
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 1)
    fault_proxy.set(fail_fraction=1.0, fail_error_code="InternalFailure")
    resp = kinesis_client(fault_proxy.endpoint_url).put_records(StreamName=stream, Records=_records(20))
    assert resp["FailedRecordCount"] == 20
    assert {r["ErrorCode"] for r in resp["Records"]} == {"InternalFailure"}
    assert read_all(kinesalite.endpoint_url, stream) == []
    assert fault_proxy.requests["PutRecords"] == 1


@pytest.mark.asyncio
async def test_async_proxy_with_aiobotocore(
    kinesalite: Kinesalite, stream_factory: Callable[..., str], async_fault_proxy: FaultProxy
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 2)
    async_fault_proxy.set(fail_fraction=0.5)
    async_fault_proxy.seed(7)
    session = aiobotocore.session.get_session()
    async with session.create_client(
        "kinesis", endpoint_url=async_fault_proxy.endpoint_url, region_name=REGION,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    ) as client:  # fmt: skip
        results = await asyncio.gather(
            *(client.put_records(StreamName=stream, Records=_records(100, f"t{t}")) for t in range(4))
        )
    n_failed = sum(r["FailedRecordCount"] for r in results)
    assert n_failed == async_fault_proxy.records_withheld > 0
    got = await asyncio.to_thread(read_all, kinesalite.endpoint_url, stream)
    assert len(got) == 400 - n_failed


def test_stall_holds_requests_and_drops_those_whose_client_left(
    kinesalite: Kinesalite, stream_factory: Callable[..., str], fault_proxy: ThreadedFaultProxy
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 1)
    fault_proxy.stall = True
    client = kinesis_client(fault_proxy.endpoint_url, timeout=0.5)
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        client.put_records(StreamName=stream, Records=_records(5))
    assert fault_proxy.faults["stall"] == 1

    # A request stalled while another thread lifts the stall is answered.
    slow = kinesis_client(fault_proxy.endpoint_url, timeout=10)
    timer = threading.Timer(0.3, lambda: fault_proxy.set(stall=False))
    timer.start()
    assert slow.put_records(StreamName=stream, Records=_records(3, "late"))["FailedRecordCount"] == 0
    timer.join()
    got = read_all(kinesalite.endpoint_url, stream)
    assert [r["data"][:4] for r in got] == [b"late"] * 3  # the timed-out request was never forwarded


def test_stall_after_writes_but_never_answers(
    kinesalite: Kinesalite, stream_factory: Callable[..., str], fault_proxy: ThreadedFaultProxy
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 1)
    fault_proxy.set(stall="after", fault_targets={"PutRecords"})
    client = kinesis_client(fault_proxy.endpoint_url, timeout=0.5)
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        client.put_records(StreamName=stream, Records=_records(5))
    client.describe_stream_summary(StreamName=stream)  # other targets unaffected
    assert len(read_all(kinesalite.endpoint_url, stream)) == 5  # written although never acknowledged


def test_down_modes(
    kinesalite: Kinesalite, stream_factory: Callable[..., str], fault_proxy: ThreadedFaultProxy
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 1)
    client = kinesis_client(fault_proxy.endpoint_url, timeout=2)
    fault_proxy.down = True
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        client.put_records(StreamName=stream, Records=_records(2))
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503

    fault_proxy.down = "reset"
    with pytest.raises((botocore.exceptions.ConnectionClosedError, botocore.exceptions.EndpointConnectionError)):
        client.put_records(StreamName=stream, Records=_records(2))

    fault_proxy.down = False
    port = fault_proxy.port
    fault_proxy.stop()  # connection refused while stopped; start() again keeps the port
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        client.put_records(StreamName=stream, Records=_records(2))
    fault_proxy.start()
    assert fault_proxy.port == port
    assert client.put_records(StreamName=stream, Records=_records(2, "up"))["FailedRecordCount"] == 0
    assert [r["data"][:2] for r in read_all(kinesalite.endpoint_url, stream)] == [b"up", b"up"]


def test_throttle_all_and_error_status(
    kinesalite: Kinesalite, stream_factory: Callable[..., str], fault_proxy: ThreadedFaultProxy
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 1)
    client = kinesis_client(fault_proxy.endpoint_url)
    fault_proxy.set(throttle_all=True, fault_targets={"PutRecords", "PutRecord"})
    with pytest.raises(client.exceptions.ProvisionedThroughputExceededException) as ei:
        client.put_records(StreamName=stream, Records=_records(2))
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    client.describe_stream_summary(StreamName=stream)  # not a fault target

    fault_proxy.set(throttle_all=False, error_status=500)
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        client.put_records(StreamName=stream, Records=_records(2))
    assert ei.value.response["Error"]["Code"] == "InternalFailure"
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500

    fault_proxy.reset_faults()
    assert client.put_records(StreamName=stream, Records=_records(2))["FailedRecordCount"] == 0
    assert len(read_all(kinesalite.endpoint_url, stream)) == 2
    snap = fault_proxy.snapshot()
    assert snap["faults"]["throttle"] == 1
    assert snap["faults"]["status_500"] == 1
    assert snap["records_forwarded"] == 2


@pytest.mark.asyncio
async def test_proxy_forwards_requests_unchanged() -> None:
    seen: list[tuple[dict[str, str], bytes, str]] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append((dict(request.headers), await request.read(), str(request.rel_url)))
        return web.Response(body=b'{"ok":1}', headers={"Content-Type": "application/x-amz-json-1.1", "X-Up": "1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with FaultProxy(f"http://127.0.0.1:{port}") as proxy:
            headers = {
                "Host": "kinesis.us-east-1.amazonaws.com",
                "X-Amz-Target": "Kinesis_20131202.PutRecords",
                "Content-Type": "application/x-amz-json-1.1",
                "Authorization": "AWS4-HMAC-SHA256 "
                "Credential=testing/20240101/us-east-1/kinesis/aws4_request, "
                "SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=abc",
                "X-Amz-Date": "20240101T000000Z",
            }
            body = b'{"StreamName":"s", "Records":[{"PartitionKey":"a","Data":"AA=="}]}'
            async with (
                aiohttp.ClientSession() as s,
                s.post(proxy.endpoint_url + "/?x=1", data=body, headers=headers) as resp,
            ):
                assert resp.status == 200
                assert resp.headers["X-Up"] == "1"
                assert await resp.read() == b'{"ok":1}'
            assert proxy.records_forwarded == 1
    finally:
        await runner.cleanup()
    ((up_headers, up_body, up_url),) = seen
    assert up_body == body
    assert up_url == "/?x=1"
    for k, v in headers.items():
        assert up_headers[k] == v
