"""The lean SigV4 signer (treasure_engine._sigv4) against botocore's `SigV4Auth`: the same request, signed at the
same instant, must carry the same Authorization header, with and without a session token, for hosts with and
without a port. An endpoint that verifies signatures checks it end to end (tests/integration/test_signing.py)."""

from __future__ import annotations

import datetime
import hashlib
import os

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from treasure_engine._sigv4 import Credentials, Signer

NOW = 1_765_000_000.0  # 2025-12-06T05:46:40Z


def frozen_now(remove_tzinfo: bool = True) -> datetime.datetime:
    now = datetime.datetime.fromtimestamp(NOW, datetime.UTC)
    return now.replace(tzinfo=None) if remove_tzinfo else now


def botocore_headers(
    url: str, creds: Credentials, service: str, region: str, target: str, body: bytes
) -> dict[str, str]:
    request = AWSRequest(
        method="POST",
        url=url,
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": target,
            "X-Amz-Content-SHA256": hashlib.sha256(body).hexdigest(),
        },
    )
    SigV4Auth(BotoCredentials(creds.access_key, creds.secret_key, creds.token), service, region).add_auth(request)
    return dict(request.headers.items())


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:4567/", "https://kinesis.eu-west-1.amazonaws.com/", "https://[::1]:8443/"]
)
@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEXAMPLETOKEN=="])
def test_signature_matches_botocore(monkeypatch: pytest.MonkeyPatch, url: str, token: str | None) -> None:
    monkeypatch.setattr("botocore.auth.get_current_datetime", frozen_now)
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    body = os.urandom(1000)
    target = "Kinesis_20131202.PutRecords"
    expected = botocore_headers(url, creds, "kinesis", "eu-west-1", target, body)
    got = Signer("kinesis", "eu-west-1", url).headers(
        creds, target, "application/x-amz-json-1.1", hashlib.sha256(body).hexdigest(), now=NOW
    )
    assert got["Authorization"] == expected["Authorization"]
    assert got["X-Amz-Date"] == expected["X-Amz-Date"]
    assert got.get("X-Amz-Security-Token") == expected.get("X-Amz-Security-Token")


def test_the_signing_key_follows_the_day_and_the_secret() -> None:
    signer = Signer("dynamodb", "us-east-1", "http://127.0.0.1:8000")
    a = Credentials("AKID", "secret-a", None)
    day1 = signer.headers(a, "DynamoDB_20120810.GetItem", "application/x-amz-json-1.0", "0" * 64, now=NOW)
    day2 = signer.headers(a, "DynamoDB_20120810.GetItem", "application/x-amz-json-1.0", "0" * 64, now=NOW + 86_400)
    again = signer.headers(a, "DynamoDB_20120810.GetItem", "application/x-amz-json-1.0", "0" * 64, now=NOW)
    other = signer.headers(
        Credentials("AKID", "secret-b", None),
        "DynamoDB_20120810.GetItem",
        "application/x-amz-json-1.0",
        "0" * 64,
        now=NOW,
    )
    assert day1["Authorization"] == again["Authorization"]
    assert len({day1["Authorization"], day2["Authorization"], other["Authorization"]}) == 3
    assert signer.host == "127.0.0.1:8000"
