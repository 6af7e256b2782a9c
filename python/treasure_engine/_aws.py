"""The one table of AWS error codes (the `__type` of a JSON error body, or botocore's `Error.Code`), by what the
engine does about them: Kinesis and DynamoDB answer with the same families of codes."""

from __future__ import annotations

THROTTLE_ERRORS = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "KMSThrottlingException",
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
    }
)
"""Slow down and retry."""
TRANSIENT_ERRORS = frozenset(
    {
        "TransactionConflictException",
        "InternalServerError",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)
"""The service failed this call; the next may succeed (a 5xx status means the same)."""
AUTH_ERRORS = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "IncompleteSignatureException",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
        "AccessDeniedException",
        "AccessDenied",
        "ExpiredTokenException",
        "ExpiredToken",
        "InvalidClientTokenId",
        "NotAuthorized",
        "KMSAccessDeniedException",
    }
)
"""Credentials or permissions: retrying does not help (with a 401 or 403 status)."""
MISSING_ERRORS = frozenset({"ResourceNotFoundException", "ResourceInUseException"})
"""The stream (or table) is not there, or not ready."""
CONDITION_FAILED = "ConditionalCheckFailedException"
"""A DynamoDB conditional write lost: another worker wrote first."""
