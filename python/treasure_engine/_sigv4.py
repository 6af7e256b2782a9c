"""AWS Signature Version 4 for the JSON-protocol POSTs the engine sends (Kinesis, DynamoDB).

botocore's `SigV4Auth` builds an `AWSRequest`, walks every header, hashes the body and derives the signing key
with four HMACs for every request: about 0.3 ms of CPU per request here, which on the consumer's DynamoDB calls
and the producer's PutRecords is most of what a request costs the event loop. This signer does only what these
requests need:

- a fixed set of signed headers (``content-type;host;x-amz-content-sha256;x-amz-date;x-amz-target``, plus
  ``x-amz-security-token`` with temporary credentials), all set by the signer itself;
- the body's SHA-256 given by the caller when it has one (a PutRecords body's is hashed in Rust, without the GIL,
  by `Request.body_sha256`), else hashed here;
- the signing key derived once per (secret, day, region, service), as the AWS SDKs cache it.

The result is the signature botocore computes for the same request (tests/unit/test_sigv4.py checks it against
botocore's, and tests/integration/test_signing.py against an endpoint that verifies signatures).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import NamedTuple
from urllib.parse import urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"


class Credentials(NamedTuple):
    """Frozen credentials (botocore's `ReadOnlyCredentials` has the same fields)."""

    access_key: str
    secret_key: str
    token: str | None


def sha256_hex(body: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(body).hexdigest()


class Signer:
    """Signs POSTs to one endpoint (`url`) of one service in one region."""

    def __init__(self, service: str, region: str, url: str) -> None:
        self.service = service
        self.region = region
        parts = urlsplit(url)
        # The Host header as botocore signs it and HTTP clients send it: the port only when it is not the
        # scheme's default, an IPv6 literal in brackets.
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None and parts.port != {"http": 80, "https": 443}.get(parts.scheme):
            host = f"{host}:{parts.port}"
        self.host = host
        self.path = parts.path or "/"
        self._key_for: tuple[str, str] | None = None  # (secret, day) the cached key was derived for
        self._key = b""

    def _signing_key(self, secret: str, day: str) -> bytes:
        if self._key_for != (secret, day):
            k = hmac.digest(("AWS4" + secret).encode(), day.encode(), "sha256")
            k = hmac.digest(k, self.region.encode(), "sha256")
            k = hmac.digest(k, self.service.encode(), "sha256")
            self._key = hmac.digest(k, b"aws4_request", "sha256")
            self._key_for = (secret, day)
        return self._key

    def headers(
        self,
        credentials: Credentials,
        target: str,
        content_type: str,
        payload_sha256: str,
        now: float | None = None,
    ) -> dict[str, str]:
        """The request's headers, signed: Host, Content-Type, X-Amz-Target, X-Amz-Date, X-Amz-Content-SHA256,
        X-Amz-Security-Token (temporary credentials only) and Authorization."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
        day = stamp[:8]
        signed = {
            "content-type": content_type,
            "host": self.host,
            "x-amz-content-sha256": payload_sha256,
            "x-amz-date": stamp,
            "x-amz-target": target,
        }
        if credentials.token:
            signed["x-amz-security-token"] = credentials.token
        names = ";".join(sorted(signed))
        canonical_headers = "".join(f"{k}:{signed[k].strip()}\n" for k in sorted(signed))
        canonical = f"POST\n{self.path}\n\n{canonical_headers}\n{names}\n{payload_sha256}"
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = f"{ALGORITHM}\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(credentials.secret_key, day), to_sign.encode(), "sha256").hexdigest()
        out = {
            "Host": self.host,
            "Content-Type": content_type,
            "X-Amz-Target": target,
            "X-Amz-Date": stamp,
            "X-Amz-Content-SHA256": payload_sha256,
            "Authorization": (
                f"{ALGORITHM} Credential={credentials.access_key}/{scope}, SignedHeaders={names}, Signature={signature}"
            ),
        }
        if credentials.token:
            out["X-Amz-Security-Token"] = credentials.token
        return out
