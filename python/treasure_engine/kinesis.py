"""Kinesis I/O.

The data plane posts the bodies the Rust batcher wrote, as they are: signed by `_sigv4.Signer` (SigV4, with the
body's SHA-256 hashed in Rust without the GIL, `Request.body_sha256`) and sent by `_http.HttpClient`, a
lean HTTP/1.1 client on asyncio protocols (about 0.15 ms of the event loop's CPU less per request than aiohttp).
The control plane the producer needs (ListShards) takes the same signed path, with its own retries. Responses
are classified here; what each record's outcome means is decided in Rust.

Credentials come from botocore's chain. Its first link is the environment: when AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY are set, botocore's own `EnvProvider` reads them, which is what the whole chain would
return, without importing `botocore.session` (about 3 MiB resident: its client, docs and paginator modules).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
from typing import Any, NamedTuple, Self

import orjson
from botocore.credentials import Credentials, EnvProvider

from treasure_engine import _sigv4
from treasure_engine._aws import AUTH_ERRORS, MISSING_ERRORS, THROTTLE_ERRORS
from treasure_engine._http import Body, HttpClient
from treasure_engine.errors import AuthError, EndpointError, StreamNotFound

__all__ = ["KinesisClient", "Outcome", "Response", "Shard", "ShardInfo", "load_credentials", "resolve_region"]

log = logging.getLogger("treasure_engine.kinesis")

JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_PREFIX = "Kinesis_20131202."
# Control-plane calls (ListShards): attempts in all, and the backoff base and cap (full jitter).
CONTROL_ATTEMPTS = 5
CONTROL_BACKOFF_S = 0.05
CONTROL_BACKOFF_MAX_S = 2.0


Shard = tuple[str, int, int]
"""(shard_id, starting_hash_key, ending_hash_key)."""


class ShardInfo(NamedTuple):
    """A shard as ListShards describes it, open or closed."""

    shard_id: str
    parents: tuple[str, ...]
    """ParentShardId and AdjacentParentShardId (a merge has two), where present."""
    closed: bool
    """A reshard closed it: it has an ending sequence number and takes no new records."""
    starting_hash_key: int
    ending_hash_key: int
    """Its hash-key range, both ends included: where Kinesis puts a record whose MD5(partition key), or explicit
    hash key, falls (a closed shard's range is where its records were put)."""


class Outcome(enum.Enum):
    """What a PutRecords HTTP exchange amounted to."""

    OK = "ok"
    THROTTLED = "throttled"
    TRANSIENT = "transient"
    AUTH = "auth"
    MISSING = "missing"


class Response:
    """Status, body and classification of one data-plane call."""

    __slots__ = ("body", "error_type", "message", "outcome", "status")

    def __init__(self, status: int, body: bytes, outcome: Outcome, error_type: str, message: str) -> None:
        self.status = status
        self.body = body
        self.outcome = outcome
        self.error_type = error_type
        self.message = message

    @classmethod
    def classify(cls, status: int, body: bytes) -> Response:
        if status == 200:
            return cls(status, body, Outcome.OK, "", "")
        error_type, message = _error_of(body)
        return cls(
            status,
            body,
            _outcome_of(error_type, status),
            error_type or f"HTTP{status}",
            message or body[:200].decode(errors="replace"),
        )


def _outcome_of(error_type: str, status: int | None) -> Outcome:
    """What an error means for the producer, by its `__type` (or code) and HTTP status: the one place that
    decides, for the data plane and the control plane alike. Some endpoints (moto) answer signature failures
    in XML, which botocore's JSON parser reports as code "403": the status catches those."""
    if error_type in THROTTLE_ERRORS or status == 429:
        return Outcome.THROTTLED
    if error_type in AUTH_ERRORS or status in (401, 403):
        return Outcome.AUTH
    if error_type in MISSING_ERRORS:
        return Outcome.MISSING
    return Outcome.TRANSIENT


def _error_of(body: bytes) -> tuple[str, str]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        # moto answers some auth failures in XML.
        text = body.decode(errors="replace")
        for marker in ("<Code>", "<code>"):
            if marker in text:
                code = text.split(marker, 1)[1].split("<", 1)[0]
                msg = text.split("<Message>", 1)[1].split("<", 1)[0] if "<Message>" in text else text[:200]
                return code, msg
        return "", text[:200]
    if not isinstance(doc, dict):
        return "", ""
    kind = str(doc.get("__type", "") or doc.get("code", "")).rsplit("#", 1)[-1]
    message = str(doc.get("message", "") or doc.get("Message", ""))
    return kind, message


def resolve_region(region: str | None) -> str:
    """The configured region, else botocore's (environment, profile), else us-east-1."""
    if region:
        return region
    import botocore.session  # only when no region is configured: see the module docstring

    found = botocore.session.get_session().get_config_variable("region")
    return str(found) if found else os.environ.get("AWS_DEFAULT_REGION", "us-east-1")


class KinesisClient:
    """One stream's data plane and control plane (ListShards): signed posts through `_http.HttpClient`."""

    def __init__(
        self,
        *,
        region: str | None,
        endpoint_url: str | None,
        max_connections: int,
        request_timeout_s: float,
    ) -> None:
        self.region = resolve_region(region)
        self.endpoint_url = (endpoint_url or f"https://kinesis.{self.region}.amazonaws.com").rstrip("/")
        self._max_connections = max_connections
        self._timeout_s = request_timeout_s
        self._http: HttpClient | None = None
        self._credentials: Credentials | None = None
        self._signer = _sigv4.Signer("kinesis", self.region, self.endpoint_url + "/")

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        # The credential chain may read files or call the instance metadata service: keep it off the loop.
        self._credentials = await loop.run_in_executor(None, load_credentials)
        self._http = HttpClient(
            self.endpoint_url + "/",
            max_connections=self._max_connections,
            timeout_s=self._timeout_s,
            connect_timeout_s=5.0,
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _frozen_credentials(self) -> _sigv4.Credentials:
        if self._credentials is None:
            raise AuthError("no AWS credentials found (environment, shared files, instance role)")
        frozen = self._credentials.get_frozen_credentials()
        return _sigv4.Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    def sign(self, target: str, body: Body, payload_sha256: str | None = None) -> dict[str, str]:
        """SigV4 headers for a POST of `body` to the Kinesis JSON API; `payload_sha256`: the body's SHA-256 (hex)
        when the caller has it."""
        digest = payload_sha256 or _sigv4.sha256_hex(body)
        return self._signer.headers(self._frozen_credentials(), TARGET_PREFIX + target, JSON_CONTENT_TYPE, digest)

    async def call(self, target: str, body: Body, payload_sha256: str | None = None) -> Response:
        """Posts one signed data-plane request and classifies the answer (network errors -> TRANSIENT)."""
        if self._http is None:
            raise RuntimeError("KinesisClient is not open")
        headers = self.sign(target, body, payload_sha256)
        try:
            status, payload = await self._http.post(headers, body)
        except (TimeoutError, OSError) as e:
            return Response(0, b"", Outcome.TRANSIENT, type(e).__name__, str(e) or type(e).__name__)
        return Response.classify(status, payload)

    async def put_records(self, body: Body, payload_sha256: str | None = None) -> Response:
        return await self.call("PutRecords", body, payload_sha256)

    async def get_records(self, iterator: str, limit: int) -> Response:
        """One GetRecords call; the body is handed to the Rust parser as it came."""
        return await self.call("GetRecords", orjson.dumps({"ShardIterator": iterator, "Limit": limit}))

    async def get_shard_iterator(
        self,
        stream: str,
        shard_id: str,
        kind: str,
        *,
        sequence_number: str | None = None,
        timestamp: float | None = None,
    ) -> tuple[Response, str | None]:
        """A shard iterator of `kind` (TRIM_HORIZON, LATEST, AT_SEQUENCE_NUMBER, AFTER_SEQUENCE_NUMBER,
        AT_TIMESTAMP); the iterator is None unless the response is OK."""
        args: dict[str, Any] = {"StreamARN": stream} if stream.startswith("arn:") else {"StreamName": stream}
        args["ShardId"] = shard_id
        args["ShardIteratorType"] = kind
        if sequence_number is not None:
            args["StartingSequenceNumber"] = sequence_number
        if timestamp is not None:
            args["Timestamp"] = timestamp
        response = await self.call("GetShardIterator", orjson.dumps(args))
        if response.outcome is not Outcome.OK:
            return response, None
        try:
            iterator = orjson.loads(response.body)["ShardIterator"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return Response(response.status, response.body, Outcome.TRANSIENT, "MalformedResponse", "no iterator"), None
        return response, str(iterator)

    # --- control plane -----------------------------------------------------------------------------------

    async def _describe_shards(self, stream: str) -> list[dict[str, Any]]:
        """Every shard ListShards returns for the stream, all pages. Throttling and transient failures are
        retried with backoff (CONTROL_ATTEMPTS in all, as botocore's legacy retry mode would)."""
        args: dict[str, Any] = {"StreamARN": stream} if stream.startswith("arn:") else {"StreamName": stream}
        shards: list[dict[str, Any]] = []
        while True:
            page = await self._control_call("ListShards", args, stream)
            shards.extend(page.get("Shards", []))
            token = page.get("NextToken")
            if not token:
                return shards
            args = {"NextToken": token}

    async def _control_call(self, target: str, args: dict[str, Any], stream: str) -> dict[str, Any]:
        """One signed control-plane call (the same path as the data plane: no botocore service model is
        loaded, which kept about 10 MiB per process), its answer as a dict; typed errors."""
        body = orjson.dumps(args)
        response: Response | None = None
        for attempt in range(CONTROL_ATTEMPTS):
            if attempt:
                await asyncio.sleep(min(CONTROL_BACKOFF_MAX_S, CONTROL_BACKOFF_S * 2**attempt) * random.random())
            response = await self.call(target, body)
            if response.outcome is Outcome.OK:
                try:
                    doc = orjson.loads(response.body)
                except orjson.JSONDecodeError:
                    raise EndpointError(f"{target}: malformed response {response.body[:200]!r}") from None
                if not isinstance(doc, dict):
                    raise EndpointError(f"{target}: malformed response {response.body[:200]!r}")
                return doc
            if response.outcome not in (Outcome.THROTTLED, Outcome.TRANSIENT):
                break
        assert response is not None
        raise _control_error(response, target, stream)

    async def list_open_shards(self, stream: str) -> list[Shard]:
        """Open shards of the stream (closed parents of a reshard excluded), sorted by hash range."""
        shards: list[Shard] = []
        for s in await self._describe_shards(stream):
            if "EndingSequenceNumber" in s.get("SequenceNumberRange", {}):
                continue
            rng = s["HashKeyRange"]
            shards.append((s["ShardId"], int(rng["StartingHashKey"]), int(rng["EndingHashKey"])))
        if not shards:
            raise StreamNotFound(f"stream {stream!r} has no open shard")
        shards.sort(key=lambda s: s[1])
        return shards

    async def list_all_shards(self, stream: str) -> list[ShardInfo]:
        """Every shard the stream still lists, open and closed, with its parents (for leases and resharding) and
        its hash-key range (for the consumer's check of KPL aggregates)."""
        shards = [
            ShardInfo(
                s["ShardId"],
                tuple(p for p in (s.get("ParentShardId"), s.get("AdjacentParentShardId")) if p),
                "EndingSequenceNumber" in s.get("SequenceNumberRange", {}),
                int(s["HashKeyRange"]["StartingHashKey"]),
                int(s["HashKeyRange"]["EndingHashKey"]),
            )
            for s in await self._describe_shards(stream)
        ]
        if not shards:
            raise StreamNotFound(f"stream {stream!r} has no shard")
        return shards


def load_credentials() -> Credentials | None:
    """botocore's default credential chain. The environment is its first link (the chain skips it only for a
    profile set on the session object, which this module never does), so when both environment variables are
    set, botocore's `EnvProvider` gives exactly what the chain would."""
    if os.environ.get(EnvProvider.ACCESS_KEY) and os.environ.get(EnvProvider.SECRET_KEY):
        found = EnvProvider().load()
        if found is not None:
            return found
    import botocore.session  # only when the environment holds no credentials (see above)

    return botocore.session.get_session().get_credentials()


def _control_error(response: Response, target: str, stream: str) -> Exception:
    what = f"{response.error_type}: {response.message}"
    if response.outcome is Outcome.MISSING:
        return StreamNotFound(f"stream {stream!r} not found: {response.message}")
    if response.outcome is Outcome.AUTH:
        return AuthError(what)
    return EndpointError(f"{target} failed after {CONTROL_ATTEMPTS} attempts: {what}")
